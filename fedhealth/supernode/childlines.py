"""Read what the site daemon's children print: level, source, words and structured fields.

The SuperNode prints Flower's console lines (``INFO :      SuperNode ID: 42``) and uvicorn's
(``INFO:     Started server process``); the paced launcher, the warm executor and the ClientApps
print Python's (``2026-01-01 12:00:00,000 INFO fedhealth.site: words``), a ClientApp's site events
at the end of the line (:mod:`fedhealth.clientapp.events`). :func:`read_child_line` takes the
child's own timestamp and level off, so the daemon's record states them once, and turns a line
that is a JSON object, or that ends with an event, into fields rather than text.
:func:`relay` says how the daemon logs a line: what repeats with every message or poll (Flower's
``Receiving:``/``Sent successfully``, uvicorn's and alembic's start-up lines, a warm task's
launch) at debug level only, so an idle site's log holds its state changes alone.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, NamedTuple

from fedhealth.clientapp.events import EVENT_MARKER
from fedhealth.service.supervisor import Relayed

__all__ = ["ChildLine", "is_chatter", "read_child_line", "relay"]

RESERVED = ("ts", "level", "logger", "msg", "child")
"""Keys of the daemon's own record: a child's field of that name is kept as ``<key>_``. A
child's ``event`` is the record's event."""

_LEVEL_NAMES = "DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL"
# Python's logging as the children configure it: "2026-01-01 12:00:00,000 INFO name: words"
_PYTHON = re.compile(
    rf"^\d{{4}}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?Z?\s+(?P<level>{_LEVEL_NAMES})\s+"
    r"(?P<source>[\w.\-]+):\s?(?P<text>.*)$"
)
# Flower's console handler: "INFO :      words" (FLWR_LOG_LEVEL=DEBUG adds a timestamp)
_FLOWER = re.compile(
    rf"^(?P<level>{_LEVEL_NAMES}) (?:\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)?:\s?(?P<text>.*)$"
)
# uvicorn's default format: "INFO:     words"
_UVICORN = re.compile(rf"^(?P<level>{_LEVEL_NAMES}):\s+(?P<text>.*)$")
_TIMES = ("ts", "time", "timestamp", "asctime", "created")
# A traceback's first and last line, printed without a logger (the lines between stay info)
_TRACEBACK = re.compile(
    r"^Traceback \(most recent call last\):$|^[A-Za-z_][\w.]*(Error|Exception|Exit)(: |$)"
)

# Lines that repeat with every message, task or poll, by the logger that prints them.
CHATTER: dict[str, re.Pattern[str]] = {
    "flwr": re.compile(
        r"^$|^\[RUN \d+(, ROUND [^\]]*)?\]$|^(Receiving|Sending): \S+ message \(ID: \w+\)$"
        r"|^(Received|Sent) successfully$|^FastAPI lifespan|^Start `flwr-clientapp` process"
    ),
    "fedhealth.warm": re.compile(r"^task \d+ run \d+: launched |^task \d+: pid \d+ exited 0 "),
    "httpx": re.compile(r'^HTTP Request: .* "HTTP/[\d.]+ [23]\d\d '),  # a failed one is not
}
QUIET_SOURCES = ("uvicorn", "alembic", "httpcore")
"""Libraries whose info lines (start-up, shutdown, access log) are all chatter."""


class ChildLine(NamedTuple):
    """One line a child printed, read.

    Parameters
    ----------
    level : int
        The level the child printed it at (INFO when the line does not say; ERROR for the
        first and last line of a traceback printed without a logger).
    source : str
        The child's logger: ``"flwr"`` (Flower's console), ``"uvicorn"``, a Python logger's name
        (``"fedhealth.site"``), the JSON line's ``logger``, or ``""`` (plain text).
    text : str
        The words: without the child's timestamp, level and logger, and without a trailing
        event.
    fields : dict
        The structured fields the line carried (a JSON line's keys, a site event's fields);
        JSON values, non-finite numbers as None.
    """

    level: int
    source: str
    text: str
    fields: dict[str, Any]


def read_child_line(line: str) -> ChildLine:
    """Read one line a child printed.

    Parameters
    ----------
    line : str
        The line, ANSI colours removed.

    Returns
    -------
    ChildLine
        Its level, source, words and fields. A line that is a JSON object gives its
        ``level``, ``logger`` and ``msg`` (or ``message``) as such, drops its timestamp and
        keeps every other key as a field; a line ending with ``[fedhealth-event] {...}`` keeps
        that object's keys as fields (``event`` included).
    """
    text = line.rstrip()  # a traceback keeps its indentation
    level, source = logging.INFO, ""
    for pattern, default_source in ((_PYTHON, ""), (_FLOWER, "flwr"), (_UVICORN, "uvicorn")):
        match = pattern.match(text)
        if match:
            level = _level(match["level"])
            source = match.groupdict().get("source") or default_source
            text = match["text"].strip()
            break
    else:
        if _TRACEBACK.match(text):
            level = logging.ERROR
    fields: dict[str, Any] = {}
    whole = _json_object(text) if text.lstrip().startswith("{") else None
    if whole is not None:
        level = _level(str(_pop(whole, "level", "levelname") or "")) or level
        source = str(_pop(whole, "logger", "name") or source)
        text = str(_pop(whole, "msg", "message") or "")
        fields = {_key(k): _plain(v) for k, v in whole.items() if k not in _TIMES}
    elif (marker := text.rfind(EVENT_MARKER)) != -1:
        event = _json_object(text[marker + len(EVENT_MARKER) :])
        if event is not None and "event" in event:
            text = text[:marker].rstrip()
            fields = {_key(k): _plain(v) for k, v in event.items()}
    return ChildLine(level, source, text, fields)


def is_chatter(read: ChildLine) -> bool:
    """Whether a line repeats with every message, task or poll rather than saying a change.

    Parameters
    ----------
    read : ChildLine
        The line, read.

    Returns
    -------
    bool
        True for an info (or debug) line of :data:`CHATTER` or of :data:`QUIET_SOURCES`;
        warnings and errors never are.
    """
    if read.level > logging.INFO:
        return False
    if read.source.partition(".")[0] in QUIET_SOURCES or read.level < logging.INFO:
        return True
    pattern = CHATTER.get(read.source)
    return pattern is not None and pattern.search(read.text) is not None


def relay(read: ChildLine, **fields: Any) -> Relayed:
    """Say how the daemon logs a line: chatter at debug level, anything else as printed.

    Parameters
    ----------
    read : ChildLine
        The line, read.
    **fields : Any
        More fields for the record (e.g. ``event``), over the line's own.

    Returns
    -------
    Relayed
        The level (DEBUG for :func:`is_chatter`), the words (the whole line when it had none)
        and the fields, with ``source``.
    """
    level = logging.DEBUG if is_chatter(read) else read.level
    extra = {"source": read.source} if read.source else {}
    return Relayed(level, read.text, {**extra, **read.fields, **fields})


def _level(name: str) -> int:
    name = name.upper()
    return logging.WARNING if name == "WARN" else logging.getLevelNamesMapping().get(name, 0)


def _pop(entry: dict[str, Any], *keys: str) -> Any:
    """Take the first of ``keys`` that ``entry`` has out of it (None: none)."""
    for key in keys:
        if key in entry:
            return entry.pop(key)
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _key(key: str) -> str:
    return f"{key}_" if key in RESERVED else key


def _plain(value: Any) -> Any:
    """Make a JSON value one JSON can hold: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
