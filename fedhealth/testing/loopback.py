"""Real Flower processes on one machine: SuperLink, SuperNodes and the ``flwr`` CLI.

For the end-to-end tests and benchmarks: every wait has a deadline, every process group is
killed at the end (:func:`fedhealth.service.process.stop_groups`), each log kept for failures.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhealth.errors import FederationError, RunIncomplete
from fedhealth.service.process import BIN, flower_env, spawn, stop_groups

if TYPE_CHECKING:
    from fedhealth.config import Config

__all__ = [
    "BIN",
    "Procs",
    "flower_env",
    "flwr",
    "free_ports",
    "round_costs",
    "run_to_completion",
    "start_tls_superlink",
    "superlink_listen",
]


def free_ports(count: int) -> list[int]:
    """Pick ``count`` distinct free loopback ports.

    All sockets stay bound until every port is chosen, so the kernel cannot hand the same port
    out twice (as one-at-a-time probing can).

    Parameters
    ----------
    count : int
        How many ports.

    Returns
    -------
    list of int
        Port numbers, free on 127.0.0.1 a moment ago.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Procs:
    """A set of background processes, each leading its own process group.

    Each one's output goes to ``<workdir>/<name>.log``; :meth:`stop` ends every group.

    Parameters
    ----------
    workdir : Path
        Working directory of every process and home of their logs.
    env : dict of str to str
        The processes' environment (see :func:`flower_env`).
    """

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start a command of this environment's ``bin`` in the background.

        Parameters
        ----------
        name : str
            The process's name, for its log file and failure messages.
        args : list of str
            The command: ``args[0]`` is looked up in this environment's ``bin``
            (``flower-superlink``, ``fedhealth``, ``python``).

        Returns
        -------
        subprocess.Popen
            The process; it dies with this one (see :func:`fedhealth.service.process.spawn`).
        """
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = spawn(
                [str(BIN / args[0]), *args[1:]], cwd=self.workdir, env=self.env, stdout=out
            )
        self.running.append((name, proc, log))
        return proc

    def wait_port(self, port: int, timeout: float = 60.0) -> None:
        """Wait until something listens on ``127.0.0.1:port``.

        Parameters
        ----------
        port : int
            The port.
        timeout : float, optional
            Seconds to wait (default 60).

        Raises
        ------
        FederationError
            One of the processes exited, or the port did not open within ``timeout``; the
            message ends with every process's log tail.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc, _ in self.running:
                if proc.poll() is not None:
                    raise FederationError(
                        f"{name} exited with {proc.returncode} while waiting for port "
                        f"{port}:\n{self.logs()}"
                    )
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FederationError(f"port {port} not open after {timeout}s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        """Return the end of every process's log, each under a ``--- name ---`` line.

        Parameters
        ----------
        tail : int, optional
            Characters kept from the end of each log (default 3000).

        Returns
        -------
        str
            The log tails, in start order.
        """
        return "\n".join(
            f"--- {name} ---\n{log.read_text(errors='replace')[-tail:]}"
            for name, _, log in self.running
            if log.exists()
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process group, wait until ``timeout``, then SIGKILL what is left.

        Parameters
        ----------
        timeout : float, optional
            Seconds all processes together have to exit after SIGTERM (default 15).
        """
        stop_groups([proc for _, proc, _ in self.running], grace=timeout, kill_wait=5.0)


def node_policy(**fields: Any) -> str:
    """Write a ``flower-supernode --node-config`` item carrying a site policy, as the daemon does.

    Parameters
    ----------
    **fields
        :class:`~fedhealth.privacy.policy.SitePolicy` fields that differ from its defaults
        (e.g. ``require_dp=False`` for a ``privacy=off`` run).

    Returns
    -------
    str
        ``site-policy='{...}'``.

    Raises
    ------
    ConfigError
        A field is unknown or out of range.
    """
    from fedhealth.privacy.policy import SitePolicy
    from fedhealth.protocol.keys import NODE_POLICY

    policy = SitePolicy.from_mapping(fields, "node_policy")
    return f"{NODE_POLICY}='{policy.to_json()}'"


def superlink_listen(fleet: int, control: int) -> list[str]:
    """``flower-superlink`` arguments for its two listeners on loopback.

    Parameters
    ----------
    fleet : int
        The gRPC Fleet API's port (sites connect here).
    control : int
        The Control and Runtime APIs' port (``flwr`` and the ServerApp connect here).

    Returns
    -------
    list of str
        ``--fleet-api-type grpc-rere --fleet-api-address 127.0.0.1:<fleet> --host 127.0.0.1
        --port <control>``.
    """
    fleet_api = ["--fleet-api-type", "grpc-rere", "--fleet-api-address", f"127.0.0.1:{fleet}"]
    return [*fleet_api, "--host", "127.0.0.1", "--port", str(control)]


def start_tls_superlink(
    procs: Procs,
    keys: Path,
    port: int,
    flwr_home: Path,
    connection: str,
    control: int,
    database: Path | None = None,
    object_store: str = "memory",
) -> None:
    """Start a SuperLink with TLS and SuperNode authentication and wait for its ports.

    Also writes the ``flwr`` CLI's TLS connection to its Control API into
    ``flwr_home/config.toml``.

    Parameters
    ----------
    procs : Procs
        Where to start it (its log: ``superlink.log``).
    keys : Path
        The directory of :mod:`fedhealth.security.certs` (``ca.crt``, ``server.crt``,
        ``server.key``).
    port : int
        The gRPC Fleet API's port on 127.0.0.1 (sites).
    flwr_home : Path
        The ``flwr`` CLI's home (``FLWR_HOME`` of ``procs``' environment).
    connection : str
        The name of the connection in ``config.toml`` (``flwr ... <connection>``).
    control : int
        The Control and Runtime APIs' port on 127.0.0.1 (``flwr``, the ServerApp).
    database : Path or None, default None
        SQLite state file, as the service runs it; None: everything in memory.
    object_store : str, default "memory"
        With ``database``: message objects in memory (:mod:`fedhealth.superlink.link`, as the
        service runs it) or, ``"database"``, in the file too (``flower-superlink`` itself).

    Raises
    ------
    FederationError
        The SuperLink exited, or a port did not open within 60 s.
    """
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n[superlink.{connection}]\n'
        f'address = "127.0.0.1:{control}"\nroot-certificates = "{keys / "ca.crt"}"\n'
    )
    own = database and object_store == "memory"
    link = ["python", "-m", "fedhealth.superlink.link"] if own else ["flower-superlink"]
    procs.start(
        "superlink",
        [
            *link,
            *superlink_listen(port, control),
            "--ssl-ca-certfile",
            str(keys / "ca.crt"),
            "--ssl-certfile",
            str(keys / "server.crt"),
            "--ssl-keyfile",
            str(keys / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            *(["--database", str(database)] if database else []),
        ],
    )
    procs.wait_port(port)
    procs.wait_port(control)


def flwr(env: dict[str, str], args: list[str], cwd: Path, timeout: float) -> dict[str, Any]:
    """Run the ``flwr`` CLI with ``--format json`` and parse its answer.

    Parameters
    ----------
    env : dict of str to str
        The CLI's environment (its ``FLWR_HOME`` holds the connections).
    args : list of str
        The subcommand and its arguments, e.g. ``["ls", "bench"]``.
    cwd : Path
        Working directory.
    timeout : float
        Seconds the command may take.

    Returns
    -------
    dict
        The JSON object the CLI printed.

    Raises
    ------
    FederationError
        The CLI printed no JSON object; the message has its exit code and output tails.
    subprocess.TimeoutExpired
        It ran longer than ``timeout``.
    """
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        answer = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError as exc:
        raise FederationError(
            f"flwr {args[0]} gave no JSON (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        ) from exc
    if not isinstance(answer, dict):
        raise FederationError(f"flwr {args[0]} gave JSON but no object: {answer!r}"[:2000])
    return answer


def run_to_completion(
    env: dict[str, str],
    project: Path,
    connection: str,
    cfg: Config,
    work: Path,
    timeout: float = 3000,
) -> None:
    """Run ``cfg`` with ``flwr run --stream`` and check that Flower reports it completed.

    ``--stream`` exits 0 on a failed ServerApp too, so the run's status is asked afterwards.

    Parameters
    ----------
    env : dict of str to str
        The ``flwr`` CLI's environment.
    project : Path
        The Flower app directory (its ``pyproject.toml``).
    connection : str
        The SuperLink connection in the CLI's ``config.toml``.
    cfg : Config
        The run's configuration; its run config is written to ``work/<run_name>.toml``.
    work : Path
        Working directory.
    timeout : float, optional
        Seconds the whole run may take (default 3000).

    Raises
    ------
    RunIncomplete
        Flower's status of the run is not ``finished:completed``; the message names the run
        and has the status.
    FederationError
        A ``flwr`` command gave no JSON.
    subprocess.TimeoutExpired
        The run took longer than ``timeout``.
    """
    from fedhealth.serverapp.runconfig import write_run_config

    toml = write_run_config(cfg, work / f"{cfg.run_name}.toml")
    out = flwr(
        env,
        ["run", str(project), connection, "--stream", "--run-config", str(toml)],
        cwd=work,
        timeout=timeout,
    )
    status = flwr(env, ["ls", connection, "--run-id", str(out["run-id"])], cwd=work, timeout=60)
    if status["runs"][0]["status"] != "finished:completed":
        raise RunIncomplete(f"run {cfg.run_name}: {status}")


def round_costs(run_dir: Path) -> list[dict[str, float]]:
    """Split each round of a finished run into training and the rest.

    Parameters
    ----------
    run_dir : Path
        The run directory (its ``metrics.jsonl``).

    Returns
    -------
    list of dict
        Per round after the first line: ``round``, ``wall`` (seconds between the rounds'
        ``elapsed_s``), ``train`` (the slowest site's ``train-seconds``) and ``other`` (wall
        minus train), all in seconds.
    """
    from fedhealth.runs.rundir import read_metrics

    lines = read_metrics(run_dir)
    rows = []
    for prev, line in itertools.pairwise(lines):
        wall = line["elapsed_s"] - prev["elapsed_s"]
        train = max(r["train-seconds"] for r in line["train"]["sites"].values())
        rows.append({"round": line["round"], "wall": wall, "train": train, "other": wall - train})
    return rows
