"""Real Flower processes on one machine (SuperLink, SuperNodes, the ``flwr`` CLI), for the
end-to-end tests and benchmarks: every wait has a deadline, every process group is killed at
the end, and each process's log is kept for the failure message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedhealth.config import Config

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: all sockets stay bound until every port is
    chosen, so the kernel cannot hand the same port out twice (as one-at-a-time probing can).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # superlink spawns flower-superexec by name
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    return env


class Procs:
    """A set of background processes, each in its own session (so children die with it)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.workdir,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running.append((name, proc, log))
        return proc

    def wait_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc, _ in self.running:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"port {port} not open after {timeout}s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {name} ---\n{log.read_text(errors='replace')[-tail:]}"
            for name, _, log in self.running
            if log.exists()
        )

    def stop(self, timeout: float = 15.0) -> None:
        for _, proc, _ in self.running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc, _ in self.running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def start_tls_superlink(
    procs: Procs, keys: Path, port: int, flwr_home: Path, connection: str
) -> None:
    """A SuperLink with TLS and SuperNode authentication (certificates from
    :mod:`fedhealth.security.certs` in ``keys``) and the ``flwr`` CLI's TLS connection to it.
    """
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n[superlink.{connection}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{keys / "ca.crt"}"\n'
    )
    procs.start(
        "superlink",
        [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-ca-certfile",
            str(keys / "ca.crt"),
            "--ssl-certfile",
            str(keys / "server.crt"),
            "--ssl-keyfile",
            str(keys / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ],
    )
    procs.wait_port(port)


def flwr(env: dict[str, str], args: list[str], cwd: Path, timeout: float) -> dict:
    """Run the ``flwr`` CLI with ``--format json``; returns the parsed JSON."""
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        return json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError as exc:
        raise RuntimeError(
            f"flwr {args[0]} gave no JSON (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        ) from exc


def run_to_completion(
    env: dict[str, str],
    project: Path,
    connection: str,
    cfg: Config,
    work: Path,
    timeout: float = 3000,
) -> None:
    """``flwr run --stream`` of ``cfg`` (its run config written under ``work``); raises with the
    status unless Flower reports the run ``finished:completed`` (``--stream`` exits 0 on a
    failed ServerApp).
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
        raise RuntimeError(f"run {cfg.run_name}: {status}")


def round_costs(run_dir: Path) -> list[dict[str, float]]:
    """Per round of a finished run: wall seconds (between the rounds' ``elapsed_s``), the slowest
    site's ``train-seconds``, and the rest ("other").
    """
    from fedhealth.runs.rundir import read_metrics

    lines = read_metrics(run_dir)
    rows = []
    for prev, line in zip(lines, lines[1:]):
        wall = line["elapsed_s"] - prev["elapsed_s"]
        train = max(r["train-seconds"] for r in line["train"]["sites"].values())
        rows.append({"round": line["round"], "wall": wall, "train": train, "other": wall - train})
    return rows
