"""The coordinator's Control API through Flower's ``flwr`` CLI: connection, JSON calls, logs.

Only the operator's host uses this: the Control API listens on loopback
(``control_host:control_port``, apart from the sites' gRPC Fleet API), with the consortium CA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedhealth.errors import FederationError
from fedhealth.superlink.settings import CoordinatorSettings

CONNECTION = "coordinator"  # the name of the ``flwr`` CLI connection in its config.toml


def write_connection(s: CoordinatorSettings, flwr_home: Path, address: str | None = None) -> None:
    """Write the ``flwr`` CLI's connection to the Control API (TLS with the consortium CA).

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (port, CA, insecure).
    flwr_home : Path
        The ``flwr`` CLI's home; ``config.toml`` is (over)written there.
    address : str, optional
        ``host:port`` of the Control API (default None: ``control_host:control_port``).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    address = address or f"{s.control_host}:{s.control_port}"
    transport = (
        "insecure = true"
        if s.insecure
        else f"root-certificates = {json.dumps(str(Path(s.ca).resolve()))}"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{transport}\n'
    )


def flwr_cli(env: dict[str, str], args: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and return its JSON answer.

    Parameters
    ----------
    env : dict of str to str
        The environment (its ``FLWR_HOME`` holds the connection; also the working directory).
    args : list of str
        The ``flwr`` subcommand and its arguments.
    timeout : float, optional
        Seconds to wait for the answer (default 60.0).

    Returns
    -------
    dict of str to Any
        Flower's JSON answer (its keys are Flower's: ``run-id``, ``runs``, ...).

    Raises
    ------
    FederationError
        No answer within ``timeout``, no JSON object in the output, or ``success`` false:
        with Flower's own message.
    """
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    what = f"flwr {' '.join(args[:2])}"
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=env.get("FLWR_HOME")
        )
    except subprocess.TimeoutExpired as exc:
        raise FederationError(f"{what}: no answer within {timeout:.0f}s") from exc
    out = done.stdout
    try:
        payload = json.loads(out[out.index("{") :])
    except ValueError as exc:
        raise FederationError(
            f"{what} failed (exit {done.returncode}): {(done.stderr or out).strip()[-500:]}"
        ) from exc
    if not isinstance(payload, dict):
        raise FederationError(f"{what}: answered {type(payload).__name__}, not a JSON object")
    if not payload.get("success", True):
        raise FederationError(f"{what}: {payload.get('error-message', payload)}")
    return payload


def server_log(env: dict[str, str], run_id: int, tail: int = 4000) -> str:
    """Fetch the tail of a run's ServerApp log (``flwr log <run_id> --show``).

    Parameters
    ----------
    env : dict of str to str
        The environment holding the ``flwr`` connection.
    run_id : int
        The Flower run.
    tail : int, optional
        How many characters of the end to keep (default 4000).

    Returns
    -------
    str
        The log's stdout and stderr, or ``"(no log within 60s)"``.
    """
    cmd = [str(Path(sys.executable).parent / "flwr"), "log", str(run_id), CONNECTION, "--show"]
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=60, cwd=env.get("FLWR_HOME")
        )
    except subprocess.TimeoutExpired:
        return "(no log within 60s)"
    return (done.stdout + done.stderr)[-tail:]
