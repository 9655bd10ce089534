"""The operator's view of runs on the coordinator host: ``fedhealth server status|logs``.

Read-only, from the run directories under the coordinator's run root (``<state_dir>/runs`` by
default, where the ServerApp writes them): each run's state, rounds, last Dice and sites
(``status``), and its per-round, per-site lines with refusals and why (``logs``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError, FedHealthError
from fedhealth.reports.progress import round_summary
from fedhealth.runs.rundir import read_jsonl, read_metrics
from fedhealth.service.process import flower_env
from fedhealth.superlink.settings import CoordinatorSettings

__all__ = ["coordinator_view", "round_figures", "run_lines", "runs_status"]


def runs_status(
    run_root: Path,
    launched: dict[str, dict[str, Any]] | None = None,
    flower: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Summarise every run under ``run_root`` (and every launched run), most recent first.

    Parameters
    ----------
    run_root : Path
        The folder holding run directories (each with a ``manifest.json``).
    launched : dict, optional
        The launcher's records by run name (:func:`fedhealth.superlink.launches.records`):
        Flower run ids and stop requests. Default None: none.
    flower : dict of int to str, optional
        Flower's status of each run id (``running``, ``finished:stopped``, ...), when the
        coordinator answers. Default None: unknown.

    Returns
    -------
    list of dict
        Per run: ``run``, ``state`` (``"finished"``, ``"stopped"`` (early, for a catalogued
        reason), ``"stopped by the operator"``, ``"failed"``, ``"running"`` or
        ``"submitted"``), ``rounds`` (completed) and ``planned``, ``dice`` (last weighted Dice,
        or None), ``sites`` (those in the last evaluated round), ``mlflow_run`` (or None),
        ``flower_run_id`` and ``flower_status`` (or None).
    """
    launched, flower = launched or {}, flower or {}
    rows = []
    runs = sorted(
        (p for p in run_root.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for manifest_path in runs:
        manifest = json.loads(manifest_path.read_text())
        name = manifest.get("run", manifest_path.parent.name)
        evaluated = [
            line
            for line in read_metrics(manifest_path.parent)
            if (line.get("evaluate") or {}).get("sites")
        ]
        last = evaluated[-1]["evaluate"] if evaluated else {}
        rows.append(
            {
                "run": name,
                "rounds": manifest.get("rounds_completed", 0),
                "planned": manifest.get("rounds_planned"),
                "dice": (last.get("weighted") or {}).get("dice"),
                "sites": sorted(last.get("sites", {})),
                "mlflow_run": (manifest.get("mlflow") or {}).get("run_id"),
                **_state(manifest, launched.pop(name, {}), flower),
            }
        )
    for name, record in launched.items():  # submitted; the ServerApp has not written yet
        row = {"run": name, "rounds": 0, "planned": None, "dice": None, "sites": []}
        rows.append({**row, "mlflow_run": None, **_state({}, record, flower)})
    return rows


def _state(
    manifest: dict[str, Any], record: dict[str, Any], flower: dict[int, str]
) -> dict[str, Any]:
    ids = record.get("flower_run_ids") or [None]
    status = flower.get(ids[-1]) if ids[-1] is not None else None
    if "stopped" in manifest:
        state = "stopped"
    elif manifest.get("finished"):
        state = "finished"
    elif record.get("stop_requested") or status == "finished:stopped":
        state = "stopped by the operator"
    elif status in ("finished:failed", "finished:completed"):
        state = "failed"  # Flower says finished, but the run never wrote its end
    else:
        state = "running" if manifest else "submitted"
    return {"state": state, "flower_run_id": ids[-1], "flower_status": status}


def round_figures(run_dir: Path) -> list[dict[str, Any]]:
    """Read a run's completed rounds as the figures the progress bar and the logs draw.

    Parameters
    ----------
    run_dir : Path
        The run directory (``manifest.json``, ``metrics.jsonl``, ``privacy.jsonl``).

    Returns
    -------
    list of dict
        One per completed round, oldest first: ``round``, ``rounds`` (planned), ``dice``
        (weighted, or None), ``sites`` (site -> Dice), ``rejected`` and ``refused`` (with why);
        empty while the run directory does not exist yet.
    """
    try:
        planned = json.loads((run_dir / "manifest.json").read_text()).get("rounds_planned", "?")
    except (OSError, ValueError):
        return []
    refused: dict[int, list[str]] = {}
    for row in read_jsonl(run_dir / "privacy.jsonl"):
        if row.get("status") == "refused":
            refused.setdefault(int(row["round"]), []).append(
                f"{row['site']} ({row.get('reason', '?')})"
            )
    figures = []
    for line in read_metrics(run_dir):
        if not line.get("round"):
            continue
        evaluated = line.get("evaluate") or {}
        figures.append(
            {
                "round": line["round"],
                "rounds": planned,
                "dice": (evaluated.get("weighted") or {}).get("dice"),
                "sites": {
                    s: m["dice"] for s, m in (evaluated.get("sites") or {}).items() if "dice" in m
                },
                "rejected": sorted((line.get("train") or {}).get("rejected", {})),
                "refused": refused.get(int(line["round"]), []),
            }
        )
    return figures


def run_lines(run_dir: Path) -> list[str]:
    """Render a run's rounds as labelled lines: Dice per site, and who was refused and why.

    Parameters
    ----------
    run_dir : Path
        The run directory.

    Returns
    -------
    list of str
        One line per completed round (:func:`~fedhealth.reports.progress.round_summary`).

    Raises
    ------
    ConfigError
        ``run_dir`` is not a run directory (no ``manifest.json``).
    """
    if not (run_dir / "manifest.json").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no manifest.json)")
    return [round_summary(figures) for figures in round_figures(run_dir)]


def coordinator_view(s: CoordinatorSettings, home: Path) -> dict[str, Any]:
    """Ask the running coordinator what only it knows: sites connected, each run's status.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (its Control API; ``enrolled`` for the sites).
    home : Path
        The launcher's folder (its Flower connection and run records).

    Returns
    -------
    dict
        ``coordinator`` (``"running"`` or ``"not running"``), ``sites`` (per enrolled site:
        ``name``, ``node_id``, ``status``, e.g. ``online``; None when the enrolment directory
        is not configured), ``launched`` (the launcher's records) and ``flower`` (Flower run
        id -> status; empty when the coordinator does not answer).
    """
    from fedhealth.superlink import launches, operator
    from fedhealth.superlink.control import CONNECTION, flwr_cli, write_connection

    view: dict[str, Any] = {
        "coordinator": "running" if operator.running(s) else "not running",
        "sites": None,
        "launched": launches.records(home),
        "flower": {},
    }
    with contextlib.suppress(FedHealthError):
        if not (s.state / "sites.json").is_file():  # read-only: never create the registry
            raise ConfigError(f"{s.state}: no site registry")
        view["sites"] = [
            {k: row[k] for k in ("name", "node_id", "status")} for row in operator.sites(s)
        ]
    if view["coordinator"] == "running":
        if not (home / "config.toml").is_file():
            write_connection(s, home)
        with contextlib.suppress(FedHealthError, KeyError, TypeError):
            runs = flwr_cli(flower_env(home), ["ls", CONNECTION], timeout=30)["runs"]
            view["flower"] = {int(r["run-id"]): str(r["status"]) for r in runs}
    return view


def command(
    cmd: str,
    run_root: Path,
    run: str = "",
    as_json: bool = False,
    live: dict[str, Any] | None = None,
) -> int:
    """Print ``server status`` or ``server logs RUN``.

    Parameters
    ----------
    cmd : str
        ``"status"`` or ``"logs"``.
    run_root : Path
        The coordinator's run root.
    run : str, default ""
        ``logs``: the run's name (its directory under ``run_root``).
    as_json : bool, default False
        ``status``: print JSON instead of a table.
    live : dict, optional
        ``status``: :func:`coordinator_view`'s answer (default None: run directories only).

    Returns
    -------
    int
        0.

    Raises
    ------
    ConfigError
        No such run (``logs``).
    """
    if cmd == "logs":
        for text in run_lines(run_root / run):
            print(text)
        return 0
    live = live or {}
    rows = runs_status(run_root, live.get("launched"), live.get("flower"))
    if as_json:
        summary = {k: live[k] for k in ("coordinator", "sites") if k in live}
        print(json.dumps({**summary, "runs": rows}, indent=2))
        return 0
    if "coordinator" in live:
        sites = live.get("sites")
        online = [x["name"] for x in sites or [] if x["status"] == "online"]
        others = [f"{x['name']} ({x['status']})" for x in sites or [] if x["status"] != "online"]
        print(f"coordinator: {live['coordinator']}")
        if sites is not None:
            print(f"sites online: {', '.join(online) or 'none'}")
            print(f"sites not online: {', '.join(others) or 'none'}")
    if not rows:
        print(f"no runs under {run_root}")
    for r in rows:
        dice = "-" if r["dice"] is None else f"{r['dice']:.4f}"
        flower = f"  Flower run {r['flower_run_id']}" if r["flower_run_id"] is not None else ""
        print(
            f"{r['run']:<24} {r['state']:<9} round {r['rounds']}/{r['planned'] or '?'}  "
            f"Dice {dice}  sites {', '.join(r['sites']) or '-'}{flower}"
        )
    return 0
