"""``fedhealth site status`` for people: aligned ``key  value`` lines in plain words.

``fedhealth site status --json`` prints :func:`fedhealth.supernode.sitestatus.status` itself, for
machines; this module words the same report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["format_status"]


def format_status(report: Mapping[str, Any]) -> str:
    """Word a site's status report as aligned lines.

    Parameters
    ----------
    report : Mapping
        :func:`fedhealth.supernode.sitestatus.status`: ``site``, ``daemon`` (the daemon's
        ``status.json``, or a string such as ``"never started"``) and ``privacy``.

    Returns
    -------
    str
        A ``site <name>`` heading, then one ``  <key>  <value>`` line per known fact, keys
        padded to one column: the daemon's state and since when, coordinator, node id, run,
        activity, the last round trained, evaluated and failed, a budget refusal, children's
        restarts, and the privacy budget spent. No newline at the end.
    """
    rows: list[tuple[str, str]] = []
    daemon = report.get("daemon")
    if isinstance(daemon, Mapping):
        state = str(daemon.get("state", "unknown"))
        since = f" since {daemon['since']}" if daemon.get("since") else ""
        rows.append(("daemon", f"{state}{since} (pid {daemon.get('pid', '?')})"))
        if daemon.get("reason"):
            rows.append(("reason", str(daemon["reason"])))
        for key, label in (
            ("coordinator", "coordinator"),
            ("node_id", "node id"),
            ("run_id", "flower run"),
            ("isolation", "isolation"),
            ("ledger", "ledger"),
            ("activity", "activity"),
        ):
            if daemon.get(key) not in (None, ""):
                rows.append((label, str(daemon[key])))
        rows += _rounds(daemon)
        if daemon.get("last_refused_app"):
            rows.append(("app refused", f"FAB sha256 {daemon['last_refused_app']}"))
        children = daemon.get("children")
        if isinstance(children, Mapping) and children:
            rows.append(("restarts", "; ".join(_child(n, c) for n, c in sorted(children.items()))))
    else:
        rows.append(("daemon", str(daemon)))
    rows += _privacy(report.get("privacy"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(
        [f"site {report.get('site', '?')}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    )


def _rounds(daemon: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    trained = daemon.get("last_trained")
    if isinstance(trained, Mapping):
        loss = trained.get("loss")
        words = f"round {trained.get('round')}, loss " + (
            _num(loss, ".4f") if loss is not None else "not finite (diverged)"
        )
        if trained.get("epsilon") is not None:
            words += (
                f", epsilon {_num(trained['epsilon'], '.4f')} of "
                f"{_num(trained.get('epsilon_cap'), 'g')}"
            )
        rows.append(("last trained", f"{words} ({trained.get('at', '?')})"))
    evaluated = daemon.get("last_evaluated")
    if isinstance(evaluated, Mapping):
        rows.append(
            (
                "last evaluated",
                f"round {evaluated.get('round')}, Dice {_num(evaluated.get('dice'), '.4f')} "
                f"({evaluated.get('at', '?')})",
            )
        )
    failed = daemon.get("last_failed")
    if isinstance(failed, Mapping):
        rows.append(
            (
                "last failed",
                f"round {failed.get('round')}, {failed.get('phase')}: error "
                f"{failed.get('code')} ({failed.get('at', '?')})",
            )
        )
    budget = daemon.get("budget")
    if daemon.get("budget_exhausted") and isinstance(budget, Mapping):
        rows.append(
            (
                "budget",
                f"EXHAUSTED: refused round {budget.get('round')}, epsilon "
                f"{_num(budget.get('epsilon'), '.4f')} of {_num(budget.get('epsilon_cap'), 'g')} "
                f"({budget.get('at', '?')})",
            )
        )
    return rows


def _child(name: str, child: Any) -> str:
    if not isinstance(child, Mapping):
        return name
    exit_code = child.get("last_exit")
    last = f" (last exit {exit_code})" if exit_code is not None else ""
    return f"{name} {child.get('restarts', 0)}{last}"


def _privacy(privacy: Any) -> list[tuple[str, str]]:
    if not isinstance(privacy, Mapping):
        return []
    runs = privacy.get("runs")
    in_runs = f" in {len(runs)} run(s)" if isinstance(runs, list) else ""
    rows = [
        (
            "privacy",
            f"epsilon {_num(privacy.get('epsilon_spent'), '.4f')} of "
            f"{_num(privacy.get('epsilon_cap'), 'g')} spent, "
            f"{privacy.get('rounds_trained', 0)} round(s) trained{in_runs}",
        )
    ]
    last = privacy.get("last")
    if isinstance(last, Mapping):
        rows.append(
            ("last release", f"run {last.get('run')}, round {last.get('round')} ({last.get('at')})")
        )
    return rows


def _num(value: Any, spec: str) -> str:
    """``value`` formatted as ``spec``; ``?`` when it is no number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    return format(value, spec)
