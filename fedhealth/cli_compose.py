"""``fedhealth compose up``: the docker-compose multi-site topology, with or without an engine.

With a Docker engine that answers, this is ``docker compose up`` of the file (the one-shot
``launch`` service's exit code is the command's). Without one, the same file runs as local
processes on loopback (:mod:`fedhealth.testing.compose`): the same commands, environment and
volumes, each volume a folder under ``--workdir``, each hospital's volumes mounted by that
hospital only; every published port is a free loopback port unless given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["add_compose_commands", "cmd_compose", "engine_answers"]


def engine_answers() -> bool:
    """Tell whether a Docker engine answers ``docker info`` within 10 s."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        done = subprocess.run([docker, "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def cmd_compose(args: argparse.Namespace) -> int:
    """Run ``fedhealth compose up``.

    Parameters
    ----------
    args : argparse.Namespace
        ``file``, ``workdir``, ``variables`` (``NAME=VALUE``), ``timeout``, ``local``.

    Returns
    -------
    int
        The ``launch`` service's exit code (0: every round completed and reported).

    Raises
    ------
    ConfigError
        A variable is not ``NAME=VALUE``.
    ComposeError
        The file is invalid or breaks the hospitals' isolation, a service failed (named, with
        its log), or the deadline passed.
    """
    from fedhealth.errors import ConfigError

    variables = {}
    for item in args.variables:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"compose variable {item!r}: expected NAME=VALUE")
        variables[name] = value
    if not args.local and engine_answers():
        env_args = [f"{k}={v}" for k, v in variables.items()]
        cmd = ["docker", "compose", "-f", str(args.file), "up", "--abort-on-container-exit"]
        print(f"a Docker engine answers: {' '.join(env_args + cmd)} --exit-code-from launch")
        return subprocess.call(
            [*cmd, "--exit-code-from", "launch"], env={**os.environ, **variables}
        )
    return _run_local(args.file, args.workdir, variables, args.timeout)


def _run_local(file: Path, workdir: Path, variables: dict[str, str], timeout: float) -> int:
    from fedhealth.testing import compose
    from fedhealth.testing.loopback import free_ports

    names = [n for n in compose.port_variables(file) if n not in variables]
    ports = dict(zip(names, map(str, free_ports(len(names))), strict=True))
    variables = {"FEDHEALTH_BIND_HOST": "127.0.0.1", **ports, **variables}
    print(
        f"no Docker engine: running {file} as local processes on loopback; volumes and logs "
        f"under {workdir.resolve()}"
    )
    result = compose.run(file, workdir, variables, timeout=timeout)
    code = result.exit_codes.get("launch")
    print(f"topology finished in {result.seconds:.0f} s; launch exit code {code}")
    for name, path in sorted(result.logs.items()):
        print(f"  log {name}: {path}")
    runs = result.volumes.get("runs")
    if runs is not None:
        for report in sorted(runs.glob("*/*-report.html")):
            print(f"  report: {report}")
    return 1 if code is None else int(code)


def add_compose_commands(sub: Any) -> None:
    """Add ``compose up`` to the CLI.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``fedhealth`` command's subcommands.
    """
    compose = sub.add_parser(
        "compose", help="the docker-compose topology; local processes without an engine"
    ).add_subparsers(dest="compose_cmd", required=True)
    p = compose.add_parser(
        "up", help="run the topology until its launch service ends; print reports and logs"
    )
    p.add_argument(
        "variables", nargs="*", help="compose variables, e.g. FEDHEALTH_ROUNDS=2 (see the file)"
    )
    p.add_argument(
        "--file",
        type=Path,
        default=Path("docker/docker-compose.yml"),
        help="the compose file",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("compose-run"),
        help="without an engine: where volumes (folders) and service logs go",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds until the launch service must end"
    )
    p.add_argument(
        "--local", action="store_true", help="local processes even when a Docker engine answers"
    )
    p.set_defaults(func=cmd_compose)
