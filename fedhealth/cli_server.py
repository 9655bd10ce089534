"""``fedhealth server ...``: the coordinator service, runs, enrolment and the operator's view.

``server run`` (SuperLink with TLS and enrolment), ``server launch`` (submit a run, follow it,
write its reports), ``server status``, ``server logs RUN`` and ``server stop RUN`` (watch and stop
runs), ``server enrol NAME --key K``, ``server sites``, ``server revoke NAME`` (enrolment).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_server_commands", "cmd_server"]


def cmd_server(args: argparse.Namespace) -> int:
    """Run ``fedhealth server <command>``.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line (``server_cmd`` and its options).

    Returns
    -------
    int
        The command's exit status: 0 done; 1 a launched run did not complete every round.

    Raises
    ------
    FedHealthError
        A catalogued error (the CLI prints it and exits 2).
    """
    from fedhealth.superlink.settings import load

    given = [f"{k}={v}" for k, v in (("ca", args.ca), ("state_dir", args.state_dir)) if v]
    if args.server_cmd == "run":
        from fedhealth.superlink.service import run

        return run(load(args.config, args.settings, insecure=args.insecure))
    if args.server_cmd in ("enrol", "sites", "revoke"):
        from fedhealth.superlink.operator import command

        cmd = "sites-json" if getattr(args, "json", False) else args.server_cmd
        settings = load(args.config, args.settings, insecure=args.insecure)
        return command(
            cmd, settings, name=getattr(args, "name", ""), key=getattr(args, "key", None)
        )
    if args.server_cmd == "launch":
        from fedhealth.superlink.launcher import launch

        settings = load(args.config, given, insecure=args.insecure, role="launch")
        return launch(settings, args.settings, args.address, args.timeout)
    settings = load(args.config, [*args.settings, *given], insecure=args.insecure, role="launch")
    home = settings.state / "launcher"
    if args.server_cmd == "stop":
        return _stop(settings, home, args.name, args.address)
    from fedhealth.superlink.runview import command as view
    from fedhealth.superlink.runview import coordinator_view

    root = args.run_root or settings.state / "runs"
    live = coordinator_view(settings, home) if args.server_cmd == "status" else None
    return view(args.server_cmd, root, getattr(args, "name", ""), args.json, live)


def _stop(settings: Any, home: Path, run: str, address: str | None) -> int:
    from fedhealth.service.process import flower_env
    from fedhealth.superlink.control import write_connection
    from fedhealth.superlink.launches import request_stop

    write_connection(settings, home, address)
    flower_run_id, status = request_stop(home, flower_env(home), run)
    print(
        f"run {run}: stop sent to Flower run {flower_run_id} (now {status}); the launcher will "
        "not resubmit it, and its rounds so far stay in the run directory"
    )
    return 0


def add_server_commands(sub: Any) -> None:
    """Add ``server run|launch|status|logs|stop|enrol|sites|revoke`` to the CLI.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``fedhealth`` command's subcommands.
    """
    server = sub.add_parser("server", help="the coordinator service").add_subparsers(
        dest="server_cmd", required=True
    )
    p = server.add_parser(
        "run", help="SuperLink with TLS, site enrolment, state db (until SIGTERM)"
    )
    p.add_argument("settings", nargs="*", help="key=value overrides of coordinator.yaml")
    p = server.add_parser("launch", help="submit a run, follow it to the end, write the report")
    p.add_argument("settings", nargs="*", help="Hydra overrides of the run config")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    p = server.add_parser("enrol", help="bind a site's public key to its name; register it")
    p.add_argument("name", help="the site's name (its metrics and privacy records)")
    p.add_argument("--key", type=Path, required=True, help="the site's public key (auth.pub)")
    p = server.add_parser("sites", help="enrolled sites: key fingerprint, node id, status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = server.add_parser("revoke", help="unregister a site's node and archive its key")
    p.add_argument("name", help="the enrolled site")
    p = server.add_parser(
        "status", help="coordinator, sites online, runs: state, round, last Dice (read-only)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = server.add_parser("logs", help="a run's per-round, per-site lines, refusals and why")
    p.add_argument("name", help="the run (its directory under the run root)")
    p.set_defaults(json=False)
    p = server.add_parser(
        "stop", help="stop a run by name (or Flower run id); it is never resubmitted"
    )
    p.add_argument("name", help="the run's name (server launch run_name=...) or Flower run id")
    for name in ("status", "logs"):
        server.choices[name].add_argument(
            "--run-root", type=Path, default=None, help="default: <state_dir>/runs"
        )
    for name in ("launch", "status", "stop"):
        server.choices[name].add_argument(
            "--address",
            default=None,
            help="the Control API host:port (default: control_host:control_port of --config)",
        )
    for name in ("launch", "status", "logs", "stop"):
        server.choices[name].add_argument(
            "--ca", default=None, help="consortium CA certificate (default: from --config)"
        )
        server.choices[name].add_argument(
            "--state-dir", default=None, help="where the launcher keeps its runs and Flower config"
        )
    for name in ("enrol", "sites", "revoke", "status", "logs", "stop"):
        server.choices[name].add_argument("settings", nargs="*", help="overrides of --config")
    for p in server.choices.values():
        p.add_argument("--config", type=Path, default=None, help="coordinator.yaml")
        p.add_argument(
            "--insecure", action="store_true", help="NO TLS, NO site authentication (labs only)"
        )
        p.set_defaults(func=cmd_server, ca=None, state_dir=None, address=None)
