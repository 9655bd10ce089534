"""The site daemon's log: JSON lines in a size-rotated file, one human line per event on stderr.

``<state_dir>/daemon.jsonl`` holds one JSON object per record
(:class:`fedhealth.service.jsonlog.JsonFormatter`: ``ts``, ``level``, ``logger``, ``msg`` and the
record's fields, a child's structured fields merged in, never a JSON string inside one). It is
rotated by size (``log_max_bytes``, ``log_backups`` of ``site.yaml``): ``daemon.jsonl.1`` is the
previous file, the oldest beyond the count is deleted, and a new file starts with a
``log.rotated`` record. stderr (a terminal, or the journal under systemd) gets the same records
as lines for people: ``2026-01-01 12:00:00Z INFO    supernode: SuperNode ID: 42``.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TextIO

from fedhealth.service.jsonlog import JsonFormatter

__all__ = ["HumanFormatter", "RotatingJsonHandler", "setup_site_logging"]

LOG_ROTATED = "log.rotated"


class HumanFormatter(logging.Formatter):
    """Format a record as one line for people: UTC time, level, who, words.

    Who is the child that printed the line (``supernode``, ``clientapp-executor``) or
    ``daemon``; a logged exception's traceback follows on the next lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` for a terminal.

        Parameters
        ----------
        record : logging.LogRecord
            The record to format.

        Returns
        -------
        str
            ``<YYYY-mm-dd HH:MM:SS>Z <LEVEL> <who>: <words>``.
        """
        fields = getattr(record, "fields", None)
        who = fields.get("child") if isinstance(fields, dict) else None
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        text = f"{when} {record.levelname:<7} {who or 'daemon'}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class RotatingJsonHandler(RotatingFileHandler):
    """A :class:`~logging.handlers.RotatingFileHandler` of JSON lines that says it rotated.

    Parameters
    ----------
    path : Path
        The log file (``daemon.jsonl``); its backups are ``daemon.jsonl.1`` (newest) to
        ``daemon.jsonl.<backups>``.
    max_bytes : int
        Rotate before a record would take the file to this many bytes (> 0).
    backups : int
        Rotated files kept (>= 1); the oldest beyond them is deleted.

    Raises
    ------
    ValueError
        ``max_bytes`` or ``backups`` is not positive (the stdlib would never rotate).
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        if max_bytes <= 0 or backups <= 0:
            raise ValueError(
                f"log rotation needs max_bytes > 0 and backups > 0: {max_bytes}, {backups}"
            )
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.setFormatter(JsonFormatter())

    def doRollover(self) -> None:  # noqa: N802 - the stdlib's name
        """Rotate the files, then start the new one with a ``log.rotated`` record."""
        super().doRollover()
        if self.stream is None:  # pragma: no cover - only with delay=True, never set here
            self.stream = self._open()
        record = logging.LogRecord(
            "fedhealth.site",
            logging.INFO,
            __file__,
            0,
            "log rotated at %d bytes: the previous lines are in %s.1 (%d backups kept)",
            (self.maxBytes, Path(self.baseFilename).name, self.backupCount),
            None,
        )
        record.fields = {"event": LOG_ROTATED}
        self.stream.write(self.format(record) + self.terminator)
        self.stream.flush()


def setup_site_logging(
    log_file: Path,
    *,
    level: int = logging.INFO,
    max_bytes: int = 10_000_000,
    backups: int = 5,
    stream: TextIO | None = None,
) -> RotatingJsonHandler:
    """Route the ``fedhealth`` loggers to ``log_file`` (JSON lines, rotated) and stderr (human).

    Parameters
    ----------
    log_file : Path
        The JSON-lines file (its directory is created).
    level : int, optional
        Keyword-only. The lowest level written, to both (default ``logging.INFO``: the
        children's per-message and per-poll lines, logged at DEBUG, are not written).
    max_bytes : int, optional
        Keyword-only. Rotate the file at this size in bytes (default 10 MB).
    backups : int, optional
        Keyword-only. Rotated files kept (default 5: at most 60 MB in all).
    stream : TextIO, optional
        Keyword-only. Where the human lines go (default None: ``sys.stderr``).

    Returns
    -------
    RotatingJsonHandler
        The file's handler.

    Raises
    ------
    ValueError
        ``max_bytes`` or ``backups`` is not positive.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = RotatingJsonHandler(log_file, max_bytes, backups)
    human = logging.StreamHandler(stream if stream is not None else sys.stderr)
    human.setFormatter(HumanFormatter())
    root = logging.getLogger("fedhealth")
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.propagate = False
    root.setLevel(level)
    root.addHandler(file_handler)
    root.addHandler(human)
    return file_handler
