"""What the site daemon is doing, from what its children print; ``fedhealth site status``.

The daemon's state about its ClientApps comes only from site events
(:mod:`fedhealth.clientapp.events`): a line carrying one updates ``status.json`` by the event's
name and fields, whatever the human text around it says. Flower's own lines (the SuperNode's id,
a refused activation, a lost connection) are Flower's wording and are matched as such. The same
reading decides how the daemon logs each line, once (:func:`watch_line`): state changes at info
level, what repeats with every message or poll at debug level.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

from fedhealth.clientapp.events import (
    BudgetRefused,
    Evaluated,
    Event,
    RoundFailed,
    RoundStarted,
    Trained,
    parse_line,
)
from fedhealth.errors import EventError
from fedhealth.service.supervisor import Relayed, Supervisor
from fedhealth.supernode.childlines import read_child_line, relay
from fedhealth.supernode.settings import SiteSettings


class DaemonEvent(StrEnum):
    """The ``event`` field of the site daemon's own structured log records."""

    START = "site.start"
    INSECURE = "insecure"
    AUTH_REFUSED = "auth.refused"
    EVENT_UNREADABLE = "site.event.unreadable"
    APP_GATE = "app.gate"
    APP_REFUSED = "app.refused"
    CONNECTED = "site.connected"
    RECONNECTING = "site.reconnecting"
    RUN_STARTED = "site.run.started"


class LastTrained(TypedDict):
    """``last_trained`` in ``status.json``: the latest round the site trained."""

    round: int
    loss: float | None  # None: not finite (training diverged)
    at: str  # UTC, ISO 8601
    epsilon: NotRequired[float]
    epsilon_cap: NotRequired[float]


class LastEvaluated(TypedDict):
    """``last_evaluated`` in ``status.json``: the latest global model the site evaluated."""

    round: int
    dice: float
    at: str


class LastFailed(TypedDict):
    """``last_failed`` in ``status.json``: the latest phase that failed at the site."""

    round: int | None
    phase: str
    code: int  # the error code sent (fedhealth.errors.SITE_ERROR_CODES)
    at: str


class BudgetStatus(TypedDict):
    """``budget`` in ``status.json``: the round the site refused to train, and why."""

    round: int
    epsilon: float
    epsilon_cap: float
    at: str


def watch_line(sup: Supervisor, child: str, line: str) -> Relayed:
    """Update the daemon's status from one line a child printed; say how to log the line.

    Parameters
    ----------
    sup : Supervisor
        The daemon's supervisor; :meth:`~fedhealth.service.supervisor.Supervisor.set_status`
        rewrites ``status.json``.
    child : str
        The child that printed it (``supernode`` or ``clientapp-executor``), for the log.
    line : str
        The line, ANSI colours removed.

    Returns
    -------
    Relayed
        One record for the line (:func:`fedhealth.supernode.childlines.relay`): a site event
        at the level printed, its fields as fields; a state change Flower prints (connected,
        a run's first message, activation or app refused, connection lost or back) at info
        level or above with its ``event``; a repeat of the same state, and the lines every
        message or poll prints, at debug level.
    """
    read = read_child_line(line)
    try:
        event = parse_line(line)
    except EventError as exc:
        return Relayed(
            logging.WARNING,
            f"unreadable site event from {child}: {exc}",
            {"event": DaemonEvent.EVENT_UNREADABLE.value, "words": read.text},
        )
    if event is not None:
        apply_event(sup, event)
        return relay(read)
    text = read.text
    if "APP REFUSED for run" in text:  # the app gate's own line (fedhealth.supernode.approval)
        sup.set_status(last_refused_app=text.rsplit("FAB sha256 ", 1)[-1].split(" ", 1)[0])
        return relay(read, event=DaemonEvent.APP_REFUSED.value)
    if "SuperNode ID:" in text:
        node_id = text.rsplit(":", 1)[1].strip()
        sup.set_status(state="connected", node_id=node_id, reason="")
        return relay(read, event=DaemonEvent.CONNECTED.value, node_id=node_id)
    if "Connection successful after" in text:
        sup.set_status(state="connected", reason="")
        return relay(read, event=DaemonEvent.CONNECTED.value)
    run = _RUN.match(text) if read.source == "flwr" else None
    if run is not None:
        run_id = int(run[1])
        if sup.status.get("run_id") == run_id:
            return relay(read)  # chatter: every message of the run says it
        sup.set_status(run_id=run_id)
        return Relayed(
            logging.INFO,
            f"run {run_id}: first message from the coordinator",
            {"source": read.source, "event": DaemonEvent.RUN_STARTED.value, "run_id": run_id},
        )
    if "Failed to activate SuperNode" in text or "not registered" in text.lower():
        reason = "activation refused: key not enrolled, or the previous session not expired yet"
        sup.set_status(state="refused", reason=reason)
        return Relayed(
            logging.ERROR,
            "the coordinator refused to activate this site: its key is not enrolled, or "
            "the site's previous session has not expired yet (after a crash); retrying",
            {"source": read.source, "event": DaemonEvent.AUTH_REFUSED.value, "words": text},
        )
    if "Connection attempt failed" in text or "UNAVAILABLE" in text:
        if sup.status.get("state") == "reconnecting":
            return relay(read)._replace(level=logging.DEBUG)  # still down: said already
        sup.set_status(state="reconnecting")
        return relay(read, event=DaemonEvent.RECONNECTING.value)
    return relay(read)


_RUN = re.compile(r"^\[RUN (\d+)(?:, ROUND [^\]]*)?\]$")


def apply_event(sup: Supervisor, event: Event) -> None:
    """Set the status fields a site event determines.

    Parameters
    ----------
    sup : Supervisor
        The daemon's supervisor.
    event : Event
        A site event: a started phase sets ``activity`` (``"train round 3 since ..."``);
        training sets ``last_trained``, evaluation ``last_evaluated``, a failure
        ``last_failed`` (each back to ``activity="idle"``); a budget refusal sets
        ``budget_exhausted`` and ``budget``.
    """
    now = _now()
    match event:
        case RoundStarted():
            activity = f"{event.phase} round {event.round} since {now}"
            sup.set_status(state="connected", activity=activity)
        case Trained():
            trained = LastTrained(round=event.round, loss=_finite(event.loss), at=now)
            if event.epsilon is not None:
                trained["epsilon"] = event.epsilon
            if event.epsilon_cap is not None:
                trained["epsilon_cap"] = event.epsilon_cap
            sup.set_status(activity="idle", last_trained=trained, budget_exhausted=False)
        case Evaluated():
            evaluated = LastEvaluated(round=event.round, dice=event.dice, at=now)
            sup.set_status(activity="idle", last_evaluated=evaluated)
        case BudgetRefused():
            budget = BudgetStatus(
                round=event.round, epsilon=event.epsilon, epsilon_cap=event.epsilon_cap, at=now
            )
            sup.set_status(
                activity="budget exhausted: refusing to train", budget_exhausted=True, budget=budget
            )
        case RoundFailed():
            failed = LastFailed(round=event.round, phase=event.phase, code=event.code, at=now)
            sup.set_status(activity="idle", last_failed=failed)


def status(s: SiteSettings) -> dict[str, Any]:
    """Report the daemon's last status (and whether it still runs) and the ledger's totals.

    Parameters
    ----------
    s : SiteSettings
        The site's settings (where ``status.json`` and the ledger are).

    Returns
    -------
    dict
        ``site``; ``daemon``: the last ``status.json`` (its ``state`` rewritten to
        ``"not running (...)"`` when the daemon's pid is gone without a clean stop), or
        ``"never started"``; ``privacy``: epsilon spent and cap, delta, rounds trained, runs,
        and the last entry, from the verified ledger.

    Raises
    ------
    fedhealth.errors.LedgerError
        The ledger exists but fails verification.
    """
    out: dict[str, Any] = {"site": s.name, "daemon": "never started"}
    status_file = s.state / "status.json"
    if status_file.is_file():
        daemon = json.loads(status_file.read_text())
        alive = _alive(int(daemon.get("pid", 0)))
        out["daemon"] = (
            daemon
            if alive or daemon.get("state") == "stopped"
            else {**daemon, "state": f"not running (last state {daemon.get('state')!r})"}
        )
    if s.ledger_path.exists():
        from fedhealth.privacy.ledger import PrivacyLedger

        with PrivacyLedger(s.ledger_path, s.name) as ledger:
            entries = ledger.verify()
        spent = entries[-1].epsilon_after if entries else 0.0
        out["privacy"] = {
            "epsilon_spent": spent,
            "epsilon_cap": s.epsilon_cap,
            "delta": s.delta,
            "rounds_trained": len(entries),
            "runs": sorted({e.run for e in entries}),
            "last": (
                {"run": entries[-1].run, "round": entries[-1].round, "at": entries[-1].created}
                if entries
                else None
            ),
        }
    else:
        out["privacy"] = {"epsilon_spent": 0.0, "epsilon_cap": s.epsilon_cap, "rounds_trained": 0}
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
