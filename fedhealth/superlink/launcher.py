"""The run launcher (``fedhealth server launch``): submit, follow, resubmit, report.

A run is submitted with ``flwr run`` and followed to the end with a deadline, one labelled line
and a progress bar per completed round (read from the run directory's ``metrics.jsonl``); when the
coordinator restarted under it, it is resubmitted (it resumes from its last checkpoint), unless
the operator stopped it (``fedhealth server stop RUN``, or Flower's ``flwr stop``); at the end the
privacy report is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import CertError, ConfigError, FederationError
from fedhealth.reports.progress import ROUND_FIELD, RoundProgress, round_summary
from fedhealth.security.apps import project_dir
from fedhealth.service.process import flower_env
from fedhealth.superlink import launches
from fedhealth.superlink.control import CONNECTION, flwr_cli, server_log, write_connection
from fedhealth.superlink.runview import round_figures
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
        Seconds for the whole run (default None: ``rounds * (round deadline + 60) + 300``, the
        deadline from :func:`fedhealth.protocol.transport.round_deadline`).
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
    from fedhealth.serverapp.runconfig import write_run_config

    cfg = run_config_for(s, overrides)
    home = s.state / "launcher"
    write_connection(s, home, address)
    env = flower_env(home, unbuffered=True)
    run_config = write_run_config(cfg, home / f"{cfg.run_name}.toml")
    if s.app_signature:
        add_signature(run_config, Path(s.app_signature), project_dir())
    from fedhealth.protocol.transport import round_deadline

    timeout = timeout or cfg.rounds * (round_deadline(cfg) + 60) + 300
    deadline = time.monotonic() + timeout
    run_dir = Path(cfg.run_root) / cfg.run_name
    with RoundProgress(cfg.rounds) as progress:
        status, run_id = _submit_and_follow(
            env,
            home,
            run_config,
            run_dir,
            cfg.run_name,
            deadline,
            poll,
            max_submissions,
            progress,
            target=(address or f"{s.control_host}:{s.control_port}", "" if s.insecure else s.ca),
        )
    return _finish(env, cfg, run_dir, status, run_id, launches.stop_requested(home, cfg.run_name))


def _submit_and_follow(
    env: dict[str, str],
    home: Path,
    run_config: Path,
    run_dir: Path,
    run_name: str,
    deadline: float,
    poll: float,
    max_submissions: int,
    progress: RoundProgress,
    target: tuple[str, str] = ("", ""),
) -> tuple[str, int]:
    """Submit until the run finishes, is stopped, or fails without progress; (status, run id)."""
    status, run_id = "not submitted", 0
    for submission in range(1, max_submissions + 1):
        _wait_reachable(env, deadline, *target)
        done_before = _rounds_completed(run_dir)
        run_id = flwr_cli(
            env,
            ["run", str(project_dir()), CONNECTION, "--run-config", str(run_config)],
            timeout=300,
        )["run-id"]
        launches.record_submission(home, run_name, run_dir, run_id, first=submission == 1)
        log.info(
            "run %s submitted as Flower run %s (submission %d)",
            run_name,
            run_id,
            submission,
            extra={"fields": {"event": "run.submitted", "run": run_name, "run_id": run_id}},
        )
        status, outage = _follow(
            env, run_id, deadline, poll, lambda: _report_rounds(run_dir, progress)
        )
        # A coordinator restarted under the run: either the launcher saw it go away, or it came
        # back so fast that the run is already marked failed; a failed run that made progress
        # is retried too (it resumes), one that failed before any round is not.
        progressed = _rounds_completed(run_dir) > done_before
        stopped = status == "finished:stopped" or launches.stop_requested(home, run_name)
        if status == "finished:completed" or stopped or not (outage or progressed):
            _report_rounds(run_dir, progress)
            return status, run_id  # a run the operator stopped is never resubmitted
        log.warning(
            "coordinator restarted during run %s (Flower run %s: %s); resubmitting, "
            "it resumes from its last checkpoint",
            run_name,
            run_id,
            status,
            extra={"fields": {"event": "run.resubmit", "run": run_name}},
        )
        try:
            flwr_cli(env, ["stop", str(run_id), CONNECTION])
        except FederationError:
            pass  # already finished or unknown after the restart
    raise FederationError(f"run {run_name}: gave up after {max_submissions} submissions")


def _report_rounds(run_dir: Path, progress: RoundProgress) -> None:
    """Draw every round the run directory completed since the last call."""
    for figures in round_figures(run_dir)[len(progress.lines) :]:
        log.info(round_summary(figures), extra={ROUND_FIELD: figures})


def _finish(
    env: dict[str, str], cfg: Any, run_dir: Path, status: str, run_id: int, stop_asked: bool
) -> int:
    """Print the outcome, write the privacy report; 0 when every round completed."""
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
    elif stop_asked or status == "finished:stopped":
        print(f"run stopped by the operator (fedhealth server stop / flwr stop {run_id})")
    reports: list[Path] = []
    if cfg.privacy.enabled and (run_dir / "privacy.jsonl").is_file():
        from fedhealth.reports import privacy as privacy_report

        paths = privacy_report.write(privacy_report.load(run_dir), run_dir)
        print(f"privacy budget report: {paths['html'].resolve()} (+ .json, .md)")
        reports += paths.values()
    if (run_dir / "metrics.jsonl").is_file():
        from fedhealth.reports.training import write_training_report

        training = write_training_report(run_dir)
        print(f"training report: {training['html'].resolve()} (+ .json)")
        reports += training.values()
    if reports:
        from fedhealth.runs.tracking import attach

        hint = attach(run_dir, reports)
        if hint:
            print(f"MLflow: {hint}")
    if status not in ("finished:completed", "finished:stopped"):
        print(f"the ServerApp's log (flwr log {run_id}):\n{server_log(env, run_id)}")
    completed = (
        status == "finished:completed"
        and manifest.get("finished")
        and "stopped" not in manifest
        and manifest.get("rounds_completed") == cfg.rounds
    )
    return 0 if completed else 1


def run_config_for(s: CoordinatorSettings, overrides: list[str]) -> Any:
    """Compose the run config the launcher submits: a fixed name and an absolute run root.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (``state_dir``).
    overrides : list of str
        Hydra overrides of the run config.

    Returns
    -------
    Config
        ``run_name`` set (the UTC time when not given), so a resubmitted run finds its
        directory; a relative ``run_root`` resolved once, under the coordinator's
        ``state_dir``, so the ServerApp (which writes the run) and the launcher (which reads
        it) name the same directory whatever their working directories.
    """
    from fedhealth.config import compose

    cfg = compose(overrides)
    if not cfg.run_name:
        cfg.run_name = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if not Path(cfg.run_root).expanduser().is_absolute():
        cfg.run_root = str((s.state / cfg.run_root).resolve())
    return cfg


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


def _wait_reachable(env: dict[str, str], deadline: float, address: str = "", ca: str = "") -> None:
    """Wait until the Control API answers; FederationError past ``deadline`` (monotonic).

    A certificate that does not verify is not waited out: CertError at once, naming the CA
    the coordinator's certificate comes from and the CA this side trusts.
    """
    while True:
        try:
            flwr_cli(env, ["ls", CONNECTION, "--limit", "1"], timeout=30)
            return
        except FederationError as exc:
            if ca and address and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                _explain_certificate(address, ca)
            if time.monotonic() > deadline:
                raise FederationError(
                    f"coordinator not reachable before the deadline: {exc}"
                ) from exc
            time.sleep(2.0)


def _explain_certificate(address: str, ca: str) -> None:
    """Raise CertError naming both CAs when ``address`` presents a certificate ``ca`` rejects."""
    from fedhealth.security.tlsprobe import probe

    host, port = address.rsplit(":", 1)
    try:
        seen = probe(host.strip("[]"), int(port), ca)
    except (OSError, ValueError):
        return  # not reachable now: keep waiting
    if not seen.ok:
        raise CertError(f"the coordinator's Control API {address}: {seen.message}")


def _follow(
    env: dict[str, str],
    run_id: int,
    deadline: float,
    poll: float,
    each_poll: Callable[[], None] = lambda: None,
) -> tuple[str, bool]:
    """Poll the run's status until it finishes; (status, whether the coordinator went away)."""
    outage = False
    while time.monotonic() < deadline:
        each_poll()
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
