"""Log as JSON lines: one object per record, with structured fields a status reader keys on.

Every long-running service (site daemon, coordinator) logs this way; a reader keys on the
``event`` field of a line, never on the wording of its message.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["JsonFormatter", "setup_json_logging"]


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line.

    The keys are ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``msg``, then
    every key of ``extra={"fields": {...}}`` given to the logging call, and ``exc`` with the
    traceback of a logged exception.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON.

        Parameters
        ----------
        record : logging.LogRecord
            The record to format.

        Returns
        -------
        str
            A JSON object, without a newline.
        """
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=False)


def setup_json_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Route the ``fedhealth`` loggers to stderr (and ``log_file``) as JSON lines.

    Parameters
    ----------
    log_file : Path, optional
        Also append the lines to this file (its directory is created). Default None: stderr
        only.
    level : int, optional
        The lowest level logged (default ``logging.INFO``).
    """
    root = logging.getLogger("fedhealth")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(level)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
