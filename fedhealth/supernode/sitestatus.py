"""What the site daemon is doing, from what its children print; ``fedhealth site status``.

The daemon's state about its ClientApps comes only from site events
(:mod:`fedhealth.clientapp.events`): a line carrying one updates ``status.json`` by the event's
name and fields, whatever the human text around it says. Flower's own lines (the SuperNode's id,
a refused activation, a lost connection) are Flower's wording and are matched as such.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
from fedhealth.service.supervisor import Supervisor
from fedhealth.supernode.settings import SiteSettings

log = logging.getLogger("fedhealth.site")


class DaemonEvent(StrEnum):
    """The ``event`` field of the site daemon's own structured log records."""

    START = "site.start"
    INSECURE = "insecure"
    AUTH_REFUSED = "auth.refused"
    EVENT_UNREADABLE = "site.event.unreadable"
    APP_GATE = "app.gate"
    APP_REFUSED = "app.refused"


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


def watch_line(sup: Supervisor, child: str, line: str) -> None:
    """Update the daemon's status from one line a child printed.

    Parameters
    ----------
    sup : Supervisor
        The daemon's supervisor; :meth:`~fedhealth.service.supervisor.Supervisor.set_status`
        rewrites ``status.json``.
    child : str
        The child that printed it (``supernode`` or ``clientapp-executor``), for the log.
    line : str
        The line, ANSI colours removed.
    """
    try:
        event = parse_line(line)
    except EventError as exc:
        log.warning(
            "unreadable site event from %s: %s",
            child,
            exc,
            extra={"fields": {"event": DaemonEvent.EVENT_UNREADABLE.value, "child": child}},
        )
        return
    if event is not None:
        apply_event(sup, event)
    elif "APP REFUSED for run" in line:  # the app gate's own line (fedhealth.supernode.approval)
        log.error(
            "%s",
            line.split("fedhealth.supernode: ", 1)[-1].strip(),
            extra={"fields": {"event": DaemonEvent.APP_REFUSED.value}},
        )
        sup.set_status(last_refused_app=line.rsplit("FAB sha256 ", 1)[-1].split(" ", 1)[0])
    elif "SuperNode ID:" in line:
        sup.set_status(state="connected", node_id=line.rsplit(":", 1)[1].strip(), reason="")
    elif "Failed to activate SuperNode" in line or "not registered" in line.lower():
        log.error(
            "the coordinator refused to activate this site: its key is not enrolled, or "
            "the site's previous session has not expired yet (after a crash); retrying",
            extra={"fields": {"event": DaemonEvent.AUTH_REFUSED.value}},
        )
        sup.set_status(
            state="refused",
            reason="activation refused: key not enrolled, or the previous session not expired yet",
        )
    elif "Connection attempt failed" in line or "UNAVAILABLE" in line:
        sup.set_status(state="reconnecting")


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
