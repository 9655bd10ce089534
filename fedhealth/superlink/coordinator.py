"""The consortium's coordinator service and run launcher.

``fedhealth server run`` supervises ``flower-superlink`` with TLS, SuperNode authentication and
its SQLite state database, and enrols every site public key found under ``enrolled/sites/``.
``fedhealth server launch`` submits a run with ``flwr run``, follows it to the end with a
deadline, resubmits it (same run name: the ServerApp resumes from its last checkpoint) when the
coordinator restarted under it, and writes the privacy report.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError, FederationError
from fedhealth.service.settings import load_settings
from fedhealth.service.supervisor import Child, Supervisor, setup_json_logging
from fedhealth.supernode.daemon import service_env

log = logging.getLogger("fedhealth.coordinator")

CONNECTION = "coordinator"


@dataclass
class CoordinatorSettings:
    """The coordinator's ``coordinator.yaml`` (every key can also be given as ``key=value``)."""

    host: str = "0.0.0.0"  # where the SuperLink listens
    port: int = 9092  # one HTTP(S) port: sites (Fleet API), `flwr`/launch
    # (Control API) and the ServerApp (Runtime API)
    ca: str = ""  # consortium CA certificate
    cert: str = ""  # coordinator TLS certificate (SANs: the names sites use)
    key: str = ""  # its private key
    enrolled: str = ""  # directory with sites/<name>/auth.pub of every enrolled site
    state_dir: str = "coordinator"  # SuperLink database, Flower home, status, logs
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    insecure: bool = False  # plaintext, any site may join: labs only

    PATHS = ("ca", "cert", "key", "enrolled", "state_dir")

    def validate(self, role: str = "run") -> CoordinatorSettings:
        """``run`` needs the TLS files and the enrolment directory; ``launch`` only the CA."""
        needed = ("ca", "cert", "key", "enrolled") if role == "run" else ("ca",)
        if not self.insecure:
            missing = [k for k in needed if not getattr(self, k)]
            if missing:
                raise ConfigError(
                    f"coordinator config: {', '.join(missing)} required (TLS and "
                    "site enrolment); plaintext only with --insecure"
                )
            for key in needed[:-1] if role == "run" else needed:
                if not Path(getattr(self, key)).is_file():
                    raise ConfigError(f"coordinator config: {key}={getattr(self, key)}: not found")
        if not 0 < self.port < 65536:
            raise ConfigError(f"coordinator config: port={self.port}: not a port")
        return self

    @property
    def state(self) -> Path:
        return Path(self.state_dir)


def load(
    path: Path | None, overrides: list[str], insecure: bool = False, role: str = "run"
) -> CoordinatorSettings:
    settings = load_settings(
        CoordinatorSettings, path, overrides, CoordinatorSettings.PATHS, "coordinator"
    )
    settings.insecure = settings.insecure or insecure
    return settings.validate(role)


def write_connection(s: CoordinatorSettings, flwr_home: Path, address: str | None = None) -> None:
    """The ``flwr`` CLI's connection to the Control API (TLS with the consortium CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{s.port}"
    transport = (
        "insecure = true"
        if s.insecure
        else f"root-certificates = {json.dumps(str(Path(s.ca).resolve()))}"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{transport}\n'
    )


def superlink_argv(s: CoordinatorSettings) -> list[str]:
    bin_dir = Path(sys.executable).parent
    argv = [
        str(bin_dir / "flower-superlink"),
        "--host",
        s.host,
        "--port",
        str(s.port),
        "--database",
        str((s.state / "superlink.db").resolve()),
        "--disable-runtime-dependency-installation",
    ]
    if s.insecure:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile",
        str(Path(s.ca).resolve()),
        "--ssl-certfile",
        str(Path(s.cert).resolve()),
        "--ssl-keyfile",
        str(Path(s.key).resolve()),
        "--enable-supernode-auth",
    ]


def flwr_cli(env: dict[str, str], args: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """``flwr <args> --format json``; raises FederationError with Flower's own message."""
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=env.get("FLWR_HOME")
        )
    except subprocess.TimeoutExpired as exc:
        raise FederationError(
            f"flwr {' '.join(args[:2])}: no answer within {timeout:.0f}s"
        ) from exc
    out = done.stdout
    try:
        payload = json.loads(out[out.index("{") :])
    except ValueError as exc:
        raise FederationError(
            f"flwr {' '.join(args[:2])} failed (exit {done.returncode}): "
            f"{(done.stderr or out).strip()[-500:]}"
        ) from exc
    if not payload.get("success", True):
        raise FederationError(f"flwr {' '.join(args[:2])}: {payload.get('error-message', payload)}")
    return payload


def enrol_sites(s: CoordinatorSettings, env: dict[str, str]) -> list[str]:
    """Register every ``enrolled/sites/<name>/auth.pub`` not registered yet; returns the names."""
    if s.insecure or not s.enrolled:
        return []
    keys = sorted(Path(s.enrolled).glob("sites/*/auth.pub"))
    if not keys:
        log.warning("no site public keys under %s/sites/*/auth.pub: no site can join", s.enrolled)
    added = []
    for pub in keys:
        name = pub.parent.name
        try:
            flwr_cli(env, ["supernode", "register", str(pub), CONNECTION, "--name", name])
        except FederationError as exc:
            if "already in use" in str(exc):  # enrolled by an earlier start (state db)
                continue
            raise FederationError(f"enrolling site {name} ({pub}): {exc}") from exc
        added.append(name)
        log.info(
            "enrolled site %s (%s)",
            name,
            pub,
            extra={"fields": {"event": "site.enrolled", "site": name}},
        )
    return added


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"{host}:{port} did not open within {timeout:.0f}s")


def run(s: CoordinatorSettings) -> int:
    """Supervise the SuperLink until SIGTERM; enrol sites once it listens."""
    s.state.mkdir(parents=True, exist_ok=True)
    setup_json_logging(s.state / "coordinator.jsonl")
    if s.insecure:
        log.warning(
            "INSECURE MODE: no TLS and no site authentication; anyone who reaches port "
            "%d can join and read the global model. Never use this outside a lab.",
            s.port,
            extra={"fields": {"event": "insecure"}},
        )
    flwr_home = s.state / "flwr"
    write_connection(s, flwr_home)
    env = service_env(flwr_home)
    sup = Supervisor(s.state / "status.json", s.backoff_initial, s.backoff_max)
    sup.add(Child("superlink", superlink_argv(s), env, s.state))

    def enrol() -> None:
        try:
            wait_port("127.0.0.1", s.port, 120)
            names = enrol_sites(s, env)
            sup.set_status(
                enrolled=sorted(p.parent.name for p in Path(s.enrolled).glob("sites/*/auth.pub"))
                if s.enrolled
                else [],
                newly_enrolled=names,
                ready=True,
            )
            log.info(
                "coordinator ready on %s:%d", s.host, s.port, extra={"fields": {"event": "ready"}}
            )
        except Exception as exc:  # noqa: BLE001 - reported, the operator fixes and restarts
            log.error("enrolment failed: %s", exc, extra={"fields": {"event": "enrol.failed"}})
            sup.set_status(ready=False, error=str(exc))

    threading.Thread(target=enrol, daemon=True).start()
    return sup.run()


# -- launch ----------------------------------------------------------------------------------------
def project_dir() -> Path:
    """The Flower app project (pyproject.toml with [tool.flwr.app]) this package belongs to."""
    import fedhealth

    root = Path(fedhealth.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "server" / "server_app.py").is_file():
        raise ConfigError(
            f"{root}: the fedhealth project (pyproject.toml, server/, clients/) is "
            "not there; install fedhealth from its source tree (pip install -e .)"
        )
    return root


def launch(
    s: CoordinatorSettings,
    overrides: list[str],
    address: str | None = None,
    timeout: float | None = None,
    poll: float = 2.0,
    max_submissions: int = 5,
) -> int:
    """Submit the run, follow it, resubmit after a coordinator restart, write the report."""
    from fedhealth.config import compose
    from fedhealth.serverapp.runconfig import write_run_config

    cfg = compose(overrides)
    if not cfg.run_name:  # a fixed name, so a resubmitted run finds (and resumes) its directory
        cfg.run_name = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    home = s.state / "launcher"
    write_connection(s, home, address)
    env = service_env(home)
    run_config = write_run_config(cfg, home / f"{cfg.run_name}.toml")
    timeout = timeout or cfg.rounds * (cfg.federation.round_timeout + 60) + 300
    deadline = time.monotonic() + timeout
    run_dir = Path(cfg.run_root) / cfg.run_name
    status = "not submitted"
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
        if status == "finished:completed" or not (outage or progressed):
            break
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
    if status != "finished:completed":
        print(f"the ServerApp's log (flwr log {run_id}):\n{server_log(env, run_id)}")
    completed = (
        status == "finished:completed"
        and manifest.get("finished")
        and "stopped" not in manifest
        and manifest.get("rounds_completed") == cfg.rounds
    )
    return 0 if completed else 1


def _rounds_completed(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "manifest.json").read_text())["rounds_completed"])
    except (OSError, ValueError, KeyError):
        return -1


def server_log(env: dict[str, str], run_id: int, tail: int = 4000) -> str:
    cmd = [str(Path(sys.executable).parent / "flwr"), "log", str(run_id), CONNECTION, "--show"]
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=60, cwd=env.get("FLWR_HOME")
        )
    except subprocess.TimeoutExpired:
        return "(no log within 60s)"
    return (done.stdout + done.stderr)[-tail:]


def _wait_reachable(env: dict[str, str], deadline: float) -> None:
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
