"""Site events: what a ClientApp tells its site daemon, as data rather than prose.

The site daemon (:func:`fedhealth.supernode.sitestatus.watch_line`) learns what its ClientApps do
from the lines they print. Every event it reads is declared here once: its name
(:class:`SiteEvent`) and its fields (one frozen dataclass per event). On the wire an event is
the end of one printed line: :data:`EVENT_MARKER` then the event as one JSON object
(:func:`format_event`, read back by :func:`parse_line`). Whatever precedes the marker is for
people and free to change: the daemon never reads it. Handlers log events with
:func:`fedhealth.clientapp.sitelog.emit`, which puts them on that line.

    2026-01-01 12:00:00,000 INFO fedhealth.site: site a round 3: trained, loss 0.5000 \
[fedhealth-event] {"event":"site.round.trained","site":"a","round":3,"loss":0.5,...}

Torch-free, so the daemon and the light secure-aggregation stages import it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar

from fedhealth.errors import EventError

EVENT_MARKER = "[fedhealth-event] "

FieldValue = str | int | float | None


class SiteEvent(StrEnum):
    """The name of every event a ClientApp reports to its site daemon."""

    ROUND_STARTED = "site.round.started"
    TRAINED = "site.round.trained"
    EVALUATED = "site.round.evaluated"
    ROUND_FAILED = "site.round.failed"
    BUDGET_REFUSED = "site.budget.refused"


@dataclass(frozen=True, kw_only=True)
class RoundStarted:
    """A site started a phase of a round.

    Parameters
    ----------
    site : str
        The site's name.
    round : int
        The server round the phase belongs to (for a folded evaluation: the round whose global
        model is evaluated).
    phase : str
        ``"train"`` or ``"evaluate"``.
    """

    kind: ClassVar[SiteEvent] = SiteEvent.ROUND_STARTED
    site: str
    round: int
    phase: str


@dataclass(frozen=True, kw_only=True)
class Trained:
    """A site trained a round and validated the update it is about to send.

    Parameters
    ----------
    site : str
        The site's name.
    round : int
        The server round.
    loss : float
        Mean training loss of the round (Dice-CE, unitless; NaN when training diverged).
    epsilon : float, optional
        The site's total epsilon after this round, from its ledger (default None: DP off).
    epsilon_cap : float, optional
        The site's own cap on epsilon (default None: DP off).
    """

    kind: ClassVar[SiteEvent] = SiteEvent.TRAINED
    site: str
    round: int
    loss: float
    epsilon: float | None = None
    epsilon_cap: float | None = None


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """A site evaluated a global model on its test cases.

    Parameters
    ----------
    site : str
        The site's name.
    round : int
        The server round whose global model was evaluated.
    dice : float
        Mean Dice score over the site's test volumes, in [0, 1].
    loss : float
        Mean evaluation loss (unitless).
    """

    kind: ClassVar[SiteEvent] = SiteEvent.EVALUATED
    site: str
    round: int
    dice: float
    loss: float


@dataclass(frozen=True, kw_only=True)
class RoundFailed:
    """A phase failed at the site; the coordinator got the catalogued error reply.

    Parameters
    ----------
    site : str
        The site's name (``"unknown"`` when it failed before the site was known).
    round : int, optional
        The server round (default None: the instruction was unreadable).
    phase : str
        ``"train"``, ``"evaluate"`` or a secure-aggregation stage.
    code : int
        The error code sent (:data:`fedhealth.errors.SITE_ERROR_CODES`).
    """

    kind: ClassVar[SiteEvent] = SiteEvent.ROUND_FAILED
    site: str
    round: int | None = None
    phase: str
    code: int


@dataclass(frozen=True, kw_only=True)
class BudgetRefused:
    """A site refused to train: the round does not fit in its privacy budget.

    Parameters
    ----------
    site : str
        The site's name.
    round : int
        The server round refused.
    epsilon : float
        Epsilon the site's ledger records as spent so far.
    epsilon_cap : float
        The site's own cap on epsilon.
    """

    kind: ClassVar[SiteEvent] = SiteEvent.BUDGET_REFUSED
    site: str
    round: int
    epsilon: float
    epsilon_cap: float


Event = RoundStarted | Trained | Evaluated | RoundFailed | BudgetRefused
_KNOWN = frozenset(SiteEvent)
EVENT_TYPES: dict[SiteEvent, type[Event]] = {
    cls.kind: cls for cls in (RoundStarted, Trained, Evaluated, RoundFailed, BudgetRefused)
}


def event_fields(event: Event) -> dict[str, FieldValue]:
    """Return ``event`` as the flat mapping a log record carries.

    Parameters
    ----------
    event : Event
        One of the event dataclasses of this module.

    Returns
    -------
    dict of str to (str, int, float or None)
        ``{"event": <its SiteEvent value>, <field>: <value>, ...}``.
    """
    return {"event": event.kind.value, **asdict(event)}


def format_event(fields: Mapping[str, object]) -> str:
    """Write an event's fields as they end a printed line.

    Parameters
    ----------
    fields : Mapping of str to object
        ``{"event": <name>, <field>: <value>, ...}`` (:func:`event_fields`).

    Returns
    -------
    str
        :data:`EVENT_MARKER` and one compact JSON object (no newline: ``json`` escapes them).
    """
    return EVENT_MARKER + json.dumps(dict(fields), separators=(",", ":"), default=str)


def parse_line(line: str) -> Event | None:
    """Read the site event a printed line carries.

    Parameters
    ----------
    line : str
        One line a ClientApp printed (any prefix a relay added is skipped).

    Returns
    -------
    Event or None
        The event, or None when the line carries none that this version knows (an event of
        another component, or of a newer ClientApp, is not an error).

    Raises
    ------
    EventError
        The line carries a known event whose fields are missing or have the wrong type.
    """
    decoder = json.JSONDecoder()
    start = line.find(EVENT_MARKER)
    while start != -1:
        try:
            payload, _ = decoder.raw_decode(line, start + len(EVENT_MARKER))
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and "event" in payload:
            return from_fields(payload)
        start = line.find(EVENT_MARKER, start + 1)
    return None


def from_fields(fields: Mapping[str, object]) -> Event | None:
    """Build the event a mapping of fields describes, checking every field's type.

    Parameters
    ----------
    fields : Mapping of str to object
        ``{"event": <name>, <field>: <value>, ...}``, as :func:`event_fields` makes it; keys
        the event does not declare are ignored.

    Returns
    -------
    Event or None
        The event, or None for an event name this version does not know.

    Raises
    ------
    EventError
        A declared field without a default is missing, or a value has the wrong type.
    """
    name = fields.get("event")
    if not isinstance(name, str) or name not in _KNOWN:
        return None
    kind = SiteEvent(name)
    cls = EVENT_TYPES[kind]
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in fields:
            if field.default is dataclasses.MISSING:
                raise EventError(f"site event {name}: field {field.name!r} missing")
            continue
        value, options = fields[field.name], _options(cls, field.name)
        if not _matches(value, options):
            raise EventError(f"site event {name}: {field.name}={value!r} has the wrong type")
        # JSON from another writer may carry 8 for 8.0
        if isinstance(value, int) and not isinstance(value, bool) and float in options:
            value = float(value)
        values[field.name] = value
    return cls(**values)


def _options(cls: type[Event], name: str) -> tuple[object, ...]:
    """Return the types a field declares: ``float | None`` -> ``(float, NoneType)``."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _matches(value: object, options: tuple[object, ...]) -> bool:
    for option in options:
        if option is type(None) and value is None:
            return True
        if isinstance(value, bool):
            continue
        if option is float and isinstance(value, int | float):
            return True
        if option in (int, str) and type(value) is option:
            return True
    return False
