"""The operator's view of runs on the coordinator host: ``fedhealth server status|logs``.

Read-only, from the run directories under the coordinator's run root (``<state_dir>/runs`` by
default, where the ServerApp writes them): each run's state, rounds, last Dice and sites
(``status``), and its per-round, per-site lines with refusals and why (``logs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError
from fedhealth.reports.progress import round_summary
from fedhealth.runs.rundir import read_jsonl, read_metrics

__all__ = ["run_lines", "runs_status"]


def runs_status(run_root: Path) -> list[dict[str, Any]]:
    """Summarise every run directory under ``run_root``, most recent first.

    Parameters
    ----------
    run_root : Path
        The folder holding run directories (each with a ``manifest.json``).

    Returns
    -------
    list of dict
        Per run: ``run``, ``state`` (``"finished"``, ``"stopped"`` or ``"running"``),
        ``rounds`` (completed) and ``planned``, ``dice`` (last weighted Dice, or None),
        ``sites`` (those in the last evaluated round), ``mlflow_run`` (or None).
    """
    rows = []
    runs = sorted(
        (p for p in run_root.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for manifest_path in runs:
        manifest = json.loads(manifest_path.read_text())
        evaluated = [
            line
            for line in read_metrics(manifest_path.parent)
            if (line.get("evaluate") or {}).get("sites")
        ]
        last = evaluated[-1]["evaluate"] if evaluated else {}
        state = (
            "stopped"
            if "stopped" in manifest
            else "finished"
            if manifest.get("finished")
            else "running"
        )
        rows.append(
            {
                "run": manifest.get("run", manifest_path.parent.name),
                "state": state,
                "rounds": manifest.get("rounds_completed", 0),
                "planned": manifest.get("rounds_planned"),
                "dice": (last.get("weighted") or {}).get("dice"),
                "sites": sorted(last.get("sites", {})),
                "mlflow_run": (manifest.get("mlflow") or {}).get("run_id"),
            }
        )
    return rows


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
    planned = json.loads((run_dir / "manifest.json").read_text()).get("rounds_planned", "?")
    refused: dict[int, list[str]] = {}
    for row in read_jsonl(run_dir / "privacy.jsonl"):
        if row.get("status") == "refused":
            refused.setdefault(int(row["round"]), []).append(
                f"{row['site']} ({row.get('reason', '?')})"
            )
    lines = []
    for line in read_metrics(run_dir):
        if not line.get("round"):
            continue
        evaluated = line.get("evaluate") or {}
        lines.append(
            round_summary(
                {
                    "round": line["round"],
                    "rounds": planned,
                    "dice": (evaluated.get("weighted") or {}).get("dice"),
                    "sites": {
                        s: m["dice"]
                        for s, m in (evaluated.get("sites") or {}).items()
                        if "dice" in m
                    },
                    "rejected": sorted((line.get("train") or {}).get("rejected", {})),
                    "refused": refused.get(int(line["round"]), []),
                }
            )
        )
    return lines


def command(cmd: str, run_root: Path, run: str = "", as_json: bool = False) -> int:
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
    rows = runs_status(run_root)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs under {run_root}")
    for r in rows:
        dice = "-" if r["dice"] is None else f"{r['dice']:.4f}"
        print(
            f"{r['run']:<24} {r['state']:<9} round {r['rounds']}/{r['planned']}  Dice {dice}  "
            f"sites {', '.join(r['sites']) or '-'}"
        )
    return 0
