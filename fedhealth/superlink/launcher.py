"""The run launcher (``fedhealth server launch``): submit, follow, resubmit, report.

A run is submitted with ``flwr run`` and followed to the end with a deadline; when the
coordinator restarted under it, it is resubmitted (it resumes from its last checkpoint); at the
end the privacy report is written.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from fedhealth.errors import ConfigError, FederationError
from fedhealth.security.apps import project_dir
from fedhealth.service.process import flower_env
from fedhealth.superlink.control import CONNECTION, flwr_cli, server_log, write_connection
from fedhealth.superlink.settings import CoordinatorSettings

log = logging.getLogger("fedhealth.coordinator")


def launch(
    s: CoordinatorSettings,
    overrides: list[str],
    address: str | None = None,
    timeout: float | None = None,
    poll: float = 2.0,
    max_submissions: int = 5,
) -> int:
    """Submit the run, follow it, resubmit after a coordinator restart, write the report.

    The run gets a fixed name, so a run resubmitted after a coordinator restart finds its run
    directory and resumes from its last checkpoint.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (checked for role ``"launch"``).
    overrides : list of str
        Hydra overrides of the run config, e.g. ``["rounds=5", "strategy=fedprox"]``.
    address : str, optional
        ``host:port`` of the Control API (default None: ``127.0.0.1:<port>``).
    timeout : float, optional
        Seconds for the whole run (default None: ``rounds * (round_timeout + 60) + 300``).
    poll : float, optional
        Seconds between status polls (default 2.0).
    max_submissions : int, optional
        Submissions before giving up (default 5).

    Returns
    -------
    int
        0 when every round completed and the run was not stopped early; 1 otherwise (the
        ServerApp's log is printed).

    Raises
    ------
    FederationError
        The coordinator is unreachable or the run unfinished before the deadline, or every
        submission was used.
    """
    from fedhealth.config import compose
    from fedhealth.serverapp.runconfig import write_run_config

    cfg = compose(overrides)
    if not cfg.run_name:  # a fixed name, so a resubmitted run finds (and resumes) its directory
        cfg.run_name = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if not Path(cfg.run_root).expanduser().is_absolute():  # where the ServerApp writes it: under
        cfg.run_root = str((s.state / cfg.run_root).resolve())  # the coordinator's state dir
    home = s.state / "launcher"
    write_connection(s, home, address)
    env = flower_env(home, unbuffered=True)
    run_config = write_run_config(cfg, home / f"{cfg.run_name}.toml")
    if s.app_signature:
        add_signature(run_config, Path(s.app_signature), project_dir())
    timeout = timeout or cfg.rounds * (cfg.federation.round_timeout + 60) + 300
    deadline = time.monotonic() + timeout
    run_dir = Path(cfg.run_root) / cfg.run_name
    status, run_id = "not submitted", 0
    for submission in range(1, max_submissions + 1):
        _wait_reachable(env, deadline)
        done_before = _rounds_completed(run_dir)
        run_id = flwr_cli(
            env,
            ["run", str(project_dir()), CONNECTION, "--run-config", str(run_config)],
            timeout=300,
        )["run-id"]
        log.info(
            "run %s submitted as Flower run %s (submission %d)",
            cfg.run_name,
            run_id,
            submission,
            extra={"fields": {"event": "run.submitted", "run": cfg.run_name, "run_id": run_id}},
        )
        status, outage = _follow(env, run_id, deadline, poll)
        # A coordinator restarted under the run: either the launcher saw it go away, or it came
        # back so fast that the run is already marked failed; a failed run that made progress
        # is retried too (it resumes), one that failed before any round is not.
        progressed = _rounds_completed(run_dir) > done_before
        if status in ("finished:completed", "finished:stopped") or not (outage or progressed):
            break  # a run the operator stopped (flwr stop / server stop) is never resubmitted
        log.warning(
            "coordinator restarted during run %s (Flower run %s: %s); resubmitting, "
            "it resumes from its last checkpoint",
            cfg.run_name,
            run_id,
            status,
            extra={"fields": {"event": "run.resubmit", "run": cfg.run_name}},
        )
        try:
            flwr_cli(env, ["stop", str(run_id), CONNECTION])
        except FederationError:
            pass  # already finished or unknown after the restart
    else:
        raise FederationError(f"run {cfg.run_name}: gave up after {max_submissions} submissions")
    manifest = (
        json.loads((run_dir / "manifest.json").read_text())
        if (run_dir / "manifest.json").is_file()
        else {}
    )
    print(
        f"run {cfg.run_name}: Flower status {status}; {manifest.get('rounds_completed', 0)} of "
        f"{cfg.rounds} rounds; run directory {run_dir.resolve()}"
    )
    if "stopped" in manifest:
        print(f"run stopped early: {manifest['stopped']['reason']}")
    if cfg.privacy.enabled and (run_dir / "privacy.jsonl").is_file():
        from fedhealth.reports import privacy as privacy_report

        paths = privacy_report.write(privacy_report.load(run_dir), run_dir)
        print(f"privacy budget report: {paths['html'].resolve()} (+ .json, .md)")
        from fedhealth.runs.tracking import attach

        hint = attach(run_dir, paths.values())
        if hint:
            print(f"MLflow: {hint}")
    if status != "finished:completed":
        print(f"the ServerApp's log (flwr log {run_id}):\n{server_log(env, run_id)}")
    completed = (
        status == "finished:completed"
        and manifest.get("finished")
        and "stopped" not in manifest
        and manifest.get("rounds_completed") == cfg.rounds
    )
    return 0 if completed else 1


def add_signature(run_config: Path, signature: Path, project: Path) -> str:
    """Add a publisher's signature of the project's FAB to a run-config file.

    ``flwr run`` builds the FAB from ``project`` (the same bytes as ``fedhealth app build``);
    the signature travels as the run-config value
    :data:`~fedhealth.security.apps.SIGNATURE_KEY`, which each site verifies against the FAB
    bytes it receives.

    Parameters
    ----------
    run_config : Path
        The run's TOML run config; rewritten with the signature added.
    signature : Path
        ``<fab>.sig`` from ``fedhealth app sign``.
    project : Path
        The Flower App project that ``flwr run`` builds.

    Returns
    -------
    str
        The sha256 of the FAB that will be submitted.

    Raises
    ------
    ConfigError
        The signature is unreadable, or signs another build (the tree changed since).
    """
    from fedhealth.io import atomic_write_text
    from fedhealth.security.apps import SIGNATURE_KEY, build_fab, fab_sha256
    from fedhealth.security.signing import read_signature

    signed, sig = read_signature(signature)
    built = fab_sha256(build_fab(project))
    if built != signed:
        raise ConfigError(
            f"{signature}: signs FAB sha256 {signed[:16]}, but {project} now builds to "
            f"{built[:16]}; rebuild and sign again (fedhealth app build, fedhealth app sign)"
        )
    text = run_config.read_text(encoding="utf-8").rstrip("\n")
    atomic_write_text(run_config, f'{text}\n{SIGNATURE_KEY} = "{sig.to_text()}"\n')
    return built


def _rounds_completed(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "manifest.json").read_text())["rounds_completed"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait_reachable(env: dict[str, str], deadline: float) -> None:
    """Wait until the Control API answers; FederationError past ``deadline`` (monotonic)."""
    while True:
        try:
            flwr_cli(env, ["ls", CONNECTION, "--limit", "1"], timeout=30)
            return
        except FederationError as exc:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"coordinator not reachable before the deadline: {exc}"
                ) from exc
            time.sleep(2.0)


def _follow(env: dict[str, str], run_id: int, deadline: float, poll: float) -> tuple[str, bool]:
    """Poll the run's status until it finishes; (status, whether the coordinator went away)."""
    outage = False
    while time.monotonic() < deadline:
        try:
            runs = flwr_cli(env, ["ls", CONNECTION, "--run-id", str(run_id)], timeout=30)["runs"]
            status = runs[0]["status"] if runs else "unknown"
        except (FederationError, KeyError, IndexError):
            outage = True
            time.sleep(poll)
            continue
        if outage:  # the coordinator came back: the ServerApp that ran this run died with it
            return status, True
        if status.startswith("finished"):
            return status, False
        time.sleep(poll)
    raise FederationError(f"Flower run {run_id}: not finished before the deadline")
