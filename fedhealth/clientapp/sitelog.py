"""The ClientApp's log: human-readable lines that carry its site events to the site daemon.

Handlers report what they do with :func:`emit` (and :func:`emit_failure`); the handler that
:func:`install_site_logging` gives the ``fedhealth`` loggers writes each record as one human
line, and an event record's line ends with the event (:mod:`fedhealth.clientapp.events`). In a
deployment every ClientApp runs in its own process, Flower's ``flwr-clientapp`` (subprocess
isolation) or a child of :mod:`fedhealth.supernode.warm` (warm isolation); either way its stderr
is the SuperNode's or the executor's, which the site daemon's supervisor reads line by line.
"""

from __future__ import annotations

import logging
from typing import TextIO

from fedhealth.clientapp.events import Event, RoundFailed, event_fields, format_event
from fedhealth.errors import BudgetExhausted, site_error_code

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SITE_LOGGER = "fedhealth"  # every logger of the ClientApp is below it


def emit(
    logger: logging.Logger, event: Event, msg: str, *args: object, level: int = logging.INFO
) -> None:
    """Log ``msg % args`` for people, carrying ``event`` for the site daemon.

    The event travels as the record's ``fields`` attribute (``extra={"fields": ...}``, the
    project's structured-logging convention, also read by
    :class:`fedhealth.service.supervisor.JsonFormatter`).

    Parameters
    ----------
    logger : logging.Logger
        A logger below ``fedhealth``, e.g. ``fedhealth.site``.
    event : Event
        What happened, with its structured fields.
    msg : str
        The human-readable message (a %-format string); its wording is no contract.
    *args : object
        Arguments for ``msg``.
    level : int, optional
        Keyword-only. The record's level (default ``logging.INFO``).
    """
    logger.log(level, msg, *args, extra={"fields": event_fields(event)})


def emit_failure(
    logger: logging.Logger, exc: BaseException, *, site: str, server_round: int | None, phase: str
) -> None:
    """Emit :class:`~fedhealth.clientapp.events.RoundFailed` for ``exc``, unless over budget.

    A :class:`~fedhealth.errors.BudgetExhausted` was already reported where it was raised, as
    :class:`~fedhealth.clientapp.events.BudgetRefused` with the ledger's figures.

    Parameters
    ----------
    logger : logging.Logger
        The handler's logger.
    exc : BaseException
        What the phase raised.
    site : str
        Keyword-only. The site's name, or ``"unknown"``.
    server_round : int or None
        Keyword-only. The server round, None if the instruction was unreadable.
    phase : str
        Keyword-only. ``"train"``, ``"evaluate"`` or a secure-aggregation stage.
    """
    if isinstance(exc, BudgetExhausted):
        return
    code = site_error_code(exc)
    emit(
        logger,
        RoundFailed(site=site, round=server_round, phase=phase, code=code),
        "site %s round %s: %s failed (error %d)",
        site,
        server_round,
        phase,
        code,
        level=logging.WARNING,
    )


class EventFormatter(logging.Formatter):
    """Format records as :data:`HUMAN_FORMAT`; an event record's first line ends with the event.

    A record logged through :func:`emit` becomes ``<human text> [fedhealth-event] {...}``,
    one line whatever the message says (a multi-line message or a traceback continues on the
    next lines, after the event).
    """

    def __init__(self) -> None:
        super().__init__(HUMAN_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record``, appending its event (if any) to the first line.

        Parameters
        ----------
        record : logging.LogRecord
            The record to format.

        Returns
        -------
        str
            The human text; for an event record, its first line ends with
            :func:`~fedhealth.clientapp.events.format_event`.
        """
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict) or "event" not in fields:
            return text
        head, newline, tail = text.partition("\n")
        return f"{head} {format_event(fields)}{newline}{tail}"


def install_site_logging(stream: TextIO | None = None, *, events: bool = True) -> logging.Handler:
    """Give the ``fedhealth`` loggers a handler that prints events, unless they have one.

    Parameters
    ----------
    stream : TextIO, optional
        Where to write (default None: ``sys.stderr``).
    events : bool, optional
        Keyword-only. End each event record's line with its event for the site daemon
        (default True); False prints the human text alone (simulation: no daemon reads it).

    Returns
    -------
    logging.Handler
        The handler installed (level INFO, the ``fedhealth`` logger no longer propagating to
        the root logger; with ``events``, Flower's ``flwr`` logger neither: it prints through
        its own handler, and the root handler a library such as Opacus adds on import would
        print each of its lines a second time in the site daemon's log), or the first handler
        the ``fedhealth`` logger already had: then nothing changes, the process configured its
        own logging (a test, a simulation).
    """
    site_log = logging.getLogger(SITE_LOGGER)
    if site_log.handlers:
        return site_log.handlers[0]
    if events:
        logging.getLogger("flwr").propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EventFormatter() if events else logging.Formatter(HUMAN_FORMAT))
    site_log.addHandler(handler)
    site_log.setLevel(logging.INFO)
    site_log.propagate = False
    return handler


_LOG_FILE: dict[str, logging.Handler] = {}


def log_to_file(path: str) -> None:
    """Append this process's site log to ``path`` too (one such file per process at a time).

    A simulation's virtual sites run in Ray's worker processes, whose stderr goes to Ray's own
    log folder: with this, every site's lines (the data file that could not be read, a
    refusal and its limit) land in the run directory instead. Appends are whole lines; a
    worker that serves another run next writes to that run's file only.

    Parameters
    ----------
    path : str
        The log file (created, or appended to).
    """
    if path in _LOG_FILE:
        return
    site_log = logging.getLogger(SITE_LOGGER)
    for old in _LOG_FILE.values():
        site_log.removeHandler(old)
        old.close()
    _LOG_FILE.clear()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(HUMAN_FORMAT))
    handler.setLevel(logging.INFO)
    site_log.addHandler(handler)
    if site_log.getEffectiveLevel() > logging.INFO:
        site_log.setLevel(logging.INFO)
    _LOG_FILE[path] = handler
