"""What the launcher submitted, by run name: ``fedhealth server stop RUN`` and ``server status``.

``fedhealth server launch`` gives every run a fixed name; Flower knows it only by the numeric run
id of each submission. The launcher keeps one small JSON record per run,
``<state_dir>/launcher/runs/<run>.json``: the Flower run ids of its submissions, the run
directory, and, once the operator asked, the stop request. ``server stop RUN`` writes the request
first and then calls Flower's ``flwr stop``, so a launcher that sees its run end never resubmits
it, whatever status Flower reports after a stop.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError, FederationError
from fedhealth.io import atomic_write_text
from fedhealth.superlink.control import CONNECTION, flwr_cli

__all__ = ["read", "record_submission", "records", "request_stop", "stop_requested"]


def _path(home: Path, run: str) -> Path:
    if not run or "/" in run or run.startswith("."):
        raise ConfigError(f"run name {run!r}: not a run name (no slash, no leading dot)")
    return home / "runs" / f"{run}.json"


def read(home: Path, run: str) -> dict[str, Any]:
    """Return a run's launch record, or an empty dict when the launcher never submitted it.

    Parameters
    ----------
    home : Path
        The launcher's folder, ``<state_dir>/launcher``.
    run : str
        The run's name.

    Returns
    -------
    dict
        ``run``, ``run_dir``, ``flower_run_ids`` (list of int, oldest first), and once asked
        ``stop_requested`` (UTC ISO-8601 time).

    Raises
    ------
    ConfigError
        ``run`` is not a run name, or its record is not JSON.
    """
    path = _path(home, run)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConfigError(f"{path}: not a launch record ({exc})") from exc
    return record if isinstance(record, dict) else {}


def records(home: Path) -> dict[str, dict[str, Any]]:
    """Return every launch record under ``home``, by run name (unreadable ones skipped)."""
    out = {}
    for path in sorted((home / "runs").glob("*.json")):
        try:
            out[path.stem] = read(home, path.stem)
        except ConfigError:
            continue
    return out


def record_submission(
    home: Path, run: str, run_dir: Path, flower_run_id: int, first: bool = False
) -> None:
    """Add a submission's Flower run id to the run's record (written atomically).

    Parameters
    ----------
    home : Path
        The launcher's folder.
    run : str
        The run's name.
    run_dir : Path
        Where the ServerApp writes the run.
    flower_run_id : int
        The id ``flwr run`` answered.
    first : bool, default False
        The launcher's first submission: an earlier stop request of a run of the same name
        (now launched again, to resume it) is cleared.
    """
    record = read(home, run) or {"run": run, "flower_run_ids": []}
    if first:
        record.pop("stop_requested", None)
    record["run_dir"] = str(run_dir)
    record["flower_run_ids"] = [*record.get("flower_run_ids", []), int(flower_run_id)]
    _path(home, run).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_path(home, run), json.dumps(record, indent=2) + "\n")


def stop_requested(home: Path, run: str) -> bool:
    """Tell whether the operator asked to stop ``run`` (``fedhealth server stop``)."""
    return bool(read(home, run).get("stop_requested"))


def request_stop(home: Path, env: dict[str, str], run: str) -> tuple[int, str]:
    """Stop a run by name: record the request, then ask Flower to stop its latest submission.

    Parameters
    ----------
    home : Path
        The launcher's folder (where ``server launch`` recorded the run).
    env : dict of str to str
        The environment of ``flwr`` calls to the coordinator's Control API.
    run : str
        The run's name, or a Flower run id (digits) that the launcher did not submit.

    Returns
    -------
    tuple of (int, str)
        The Flower run id and the status Flower reports after the stop.

    Raises
    ------
    ConfigError
        No run of that name was launched from this state directory.
    FederationError
        Flower refused the stop (unknown run, already finished) or is unreachable.
    """
    record = read(home, run)
    if record:
        flower_run_id = int(record["flower_run_ids"][-1])
        record["stop_requested"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_text(_path(home, run), json.dumps(record, indent=2) + "\n")
    elif run.isdigit():
        flower_run_id = int(run)
    else:
        known = ", ".join(sorted(records(home))) or "none"
        raise ConfigError(
            f"no run named {run!r} was launched from {home} (runs launched there: {known}); "
            "give the run's name as `server launch run_name=...` set it, or a Flower run id"
        )
    flwr_cli(env, ["stop", str(flower_run_id), CONNECTION], timeout=60)
    try:
        runs = flwr_cli(env, ["ls", CONNECTION, "--run-id", str(flower_run_id)])["runs"]
        status = str(runs[0]["status"]) if runs else "unknown"
    except (FederationError, KeyError, IndexError):
        status = "unknown"
    return flower_run_id, status
