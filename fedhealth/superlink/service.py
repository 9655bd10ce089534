"""The coordinator service (``fedhealth server run``): the SuperLink, supervised.

``flower-superlink`` runs with TLS, site authentication and its SQLite state database (message
objects in memory: :mod:`fedhealth.superlink.link`), restarted with backoff; the enrolled sites
are registered once it listens.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from fedhealth.errors import FederationError
from fedhealth.serverapp.enrolled import ENV_SITE_NAMES
from fedhealth.service.process import flower_env
from fedhealth.service.supervisor import Child, Supervisor, setup_json_logging
from fedhealth.superlink.control import write_connection
from fedhealth.superlink.enrolment import enrol_sites, enrolled_keys
from fedhealth.superlink.settings import CoordinatorSettings

log = logging.getLogger("fedhealth.coordinator")

ENROL_WAIT_S = 120.0  # for the SuperLink's port to open before enrolling


def superlink_argv(s: CoordinatorSettings) -> list[str]:
    """Build the SuperLink's command line.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.

    Returns
    -------
    list of str
        ``flower-superlink`` (through :mod:`fedhealth.superlink.link` unless ``object_store``
        is ``"database"``) with its gRPC Fleet API on ``host:port`` (the sites' one door),
        its Control and Runtime APIs on ``control_host:control_port`` (loopback), its database
        in the state directory, no runtime dependency installation, TLS plus SuperNode
        authentication (or ``--insecure``), and ``--isolation process``: ServerApps are
        started by :mod:`fedhealth.superlink.appexec`, approved ones only.
    """
    bin_dir = Path(sys.executable).parent
    link = (
        [str(bin_dir / "flower-superlink")]
        if s.object_store == "database"
        else [sys.executable, "-m", "fedhealth.superlink.link"]
    )
    argv = [
        *link,
        "--fleet-api-type",
        "grpc-rere",
        "--fleet-api-address",
        join_host_port(s.host, s.port),
        "--host",
        s.control_host,
        "--port",
        str(s.control_port),
        "--database",
        str((s.state / "superlink.db").resolve()),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "process",
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


def appexec_argv(s: CoordinatorSettings, approved: frozenset[str]) -> list[str]:
    """Build the ServerApp executor's command line (:mod:`fedhealth.superlink.appexec`).

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.
    approved : frozenset of str
        The FAB hashes whose ServerApp may run.

    Returns
    -------
    list of str
        ``python -m fedhealth.superlink.appexec`` on the Runtime API (``control_host:
        control_port``; TLS with the consortium CA unless insecure), the approved hashes,
        ``<state_dir>/apps.jsonl`` and this process as its parent.
    """
    argv = [
        sys.executable,
        "-m",
        "fedhealth.superlink.appexec",
        "--runtime-api-address",
        join_host_port(s.control_host, s.control_port),
        "--apps-log",
        str((s.state / "apps.jsonl").resolve()),
        "--parent-pid",
        str(os.getpid()),
        *(a for h in sorted(approved) for a in ("--approved-app", h)),
    ]
    if s.insecure:
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(Path(s.ca).resolve())]


def join_host_port(host: str, port: int) -> str:
    """Join a host and a port as gRPC addresses are written (``[::1]:9092`` for IPv6).

    Parameters
    ----------
    host : str
        Host name or IP address.
    port : int
        Port.

    Returns
    -------
    str
        ``host:port``, the host in brackets when it is an IPv6 address.
    """
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def wait_port(host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Parameters
    ----------
    host : str
        The host.
    port : int
        The port.
    timeout : float
        Seconds to wait at most.

    Raises
    ------
    FederationError
        The port did not open within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"{host}:{port} did not open within {timeout:.0f}s")


def run(s: CoordinatorSettings) -> int:
    """Supervise the SuperLink until SIGTERM; enrol the sites once it listens.

    ``<state_dir>/status.json`` says whether the coordinator is ``ready`` and which sites are
    enrolled; ``<state_dir>/coordinator.jsonl`` is its log. Everything the service, the
    SuperLink and its ServerApps create (state, database, logs, run directories) is
    owner-only: the umask is 077. Unless insecure, the ServerApps file every reply under the
    enrolled name of the node that sent it (:data:`~fedhealth.serverapp.enrolled.ENV_SITE_NAMES`).

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (checked for role ``"run"``).

    Returns
    -------
    int
        0 after a clean stop.
    """
    os.umask(0o077)
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
    env = flower_env(flwr_home, unbuffered=True)
    if not s.insecure:
        env[ENV_SITE_NAMES] = "enrolled"
    sup = Supervisor(s.state / "status.json", s.backoff_initial, s.backoff_max)
    sup.add(Child("superlink", superlink_argv(s), env, s.state))
    from fedhealth.superlink.appexec import default_approved

    approved = default_approved(s.approved_apps)
    sup.add(Child("serverapp-executor", appexec_argv(s, approved), env, s.state))

    def enrol() -> None:
        try:
            wait_port(s.control_host, s.control_port, ENROL_WAIT_S)
            wait_port("127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host, s.port, ENROL_WAIT_S)
            names = enrol_sites(s, env)
            enrolled = sorted(p.parent.name for p in enrolled_keys(s))
            sup.set_status(enrolled=enrolled, newly_enrolled=names, ready=True)
            log.info(
                "coordinator ready: Fleet API (gRPC) on %s:%d, Control API on %s:%d",
                s.host,
                s.port,
                s.control_host,
                s.control_port,
                extra={"fields": {"event": "ready"}},
            )
        except Exception as exc:  # noqa: BLE001 - reported, the operator fixes and restarts
            log.error("enrolment failed: %s", exc, extra={"fields": {"event": "enrol.failed"}})
            sup.set_status(ready=False, error=str(exc))

    threading.Thread(target=enrol, daemon=True).start()
    return sup.run()
