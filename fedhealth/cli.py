"""The one ``fedhealth`` command.

    fedhealth simulate [overrides...]            N sites on Flower's simulation engine
    fedhealth data synth [overrides...]          write the synthetic multi-site cohort
    fedhealth baseline centralized|local [...]   the comparison points for federation
    fedhealth predict --model RUN --data D --out O   segment a hospital's scans (its own grid)
    fedhealth report privacy <run dir | ledger>  privacy budget report for a privacy officer
    fedhealth certs init|site|check              consortium CA, coordinator TLS, site keys
    fedhealth site run|check|status --config site.yaml        the hospital's daemon
    fedhealth server run|launch --config coordinator.yaml     the coordinator service, runs
    fedhealth app build|sign|keygen              approved app bundles: hash, publisher signature
    fedhealth server enrol|sites|revoke --config coordinator.yaml   site enrolment (operator)

Overrides are Hydra's: ``fedhealth simulate sites=4 rounds=5 strategy=fedprox``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from fedhealth.cli_data import add_data_commands
from fedhealth.cli_report import add_report_commands
from fedhealth.errors import FedHealthError
from fedhealth.protocol.keys import NUM_EXAMPLES

EXIT_USER_ERROR = 2


def _setup_logging(*, verbose: bool) -> None:
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's store: plugin lines
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _console(rounds: int) -> Callable[[Any], AbstractContextManager[object]]:
    """Progress bar on the terminal, every library's log lines in ``<run dir>/simulate.log``."""
    from fedhealth.reports.progress import RoundProgress, quiet_console

    @contextlib.contextmanager
    def console(run_dir: Any) -> Iterator[object]:
        log_file = run_dir.path.resolve() / "simulate.log"
        with quiet_console(log_file), RoundProgress(rounds):
            print(f"log: {log_file} (fedhealth simulate -v ... prints it here)", file=sys.stderr)
            yield log_file

    return console


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedhealth simulate``: the federation on the simulation engine, then its reports."""
    from fedhealth.config import compose
    from fedhealth.runs.rundir import read_metrics
    from fedhealth.simulation import simulate

    cfg = compose(args.overrides)
    if args.cfg:
        from fedhealth.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    print(
        f"fedhealth simulate: {cfg.sites} sites, {cfg.rounds} rounds, "
        f"strategy {cfg.strategy.name}, model {cfg.model.name}",
        flush=True,
    )
    run_dir = simulate(cfg, console=None if args.verbose else _console(cfg.rounds))
    evaluated = [
        line for line in read_metrics(run_dir.path) if line.get("evaluate", {}).get("sites")
    ]
    print(f"\nrun directory: {run_dir.path.resolve()}")
    if evaluated:
        last = evaluated[-1]
        print(
            f"final global model (round {last['round']}), whole-volume Dice on each site's "
            "test set:"
        )
        for site, row in sorted(last["evaluate"]["sites"].items()):
            per_class = [f"{k} {v:.4f}" for k, v in sorted(row.items()) if k.startswith("dice-")]
            classes = f"; {', '.join(per_class)}" if len(per_class) > 1 else ""
            print(f"  {site:<12} {row['dice']:.4f}  ({row[NUM_EXAMPLES]} patients{classes})")
        print(f"  {'weighted':<12} {last['evaluate']['weighted']['dice']:.4f}")
    else:
        print("no round's global model was evaluated")
    if "stopped" in run_dir.manifest:
        print(f"run stopped early: {run_dir.manifest['stopped']['reason']}")
    if cfg.privacy.enabled:
        from fedhealth.reports import privacy as privacy_report

        paths = privacy_report.write(privacy_report.load(run_dir.path), run_dir.path)
        print(f"privacy budget report: {paths['html'].resolve()} (+ .json, .md)")
    else:
        paths = {}
    from fedhealth.reports.training import write_training_report

    training = write_training_report(run_dir.path)
    print(f"training report: {training['html'].resolve()} (+ .json)")
    if cfg.tracking.enabled:
        from fedhealth.runs.tracking import attach

        hint = attach(run_dir.path, [*paths.values(), *training.values()])
        print(f"MLflow: {hint}" if hint else "MLflow: this run was not tracked (see the log)")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Run ``fedhealth certs init|site|check``: the consortium CA, coordinator TLS, site keys."""
    from fedhealth.security import certs

    directory: Path = args.dir
    if args.certs_cmd == "init":
        ca = certs.create_ca(directory, rotate=args.rotate)
        server = certs.create_server_cert(ca, directory, args.server_name, rotate=args.rotate)
        print(f"consortium CA: {directory / 'ca.crt'} (key {directory / 'ca.key'}, 0600)")
        print(f"coordinator TLS: {server} for {', '.join(args.server_name)}")
    elif args.certs_cmd == "site":
        for site in args.names:
            key, pub = certs.create_site_keys(directory, site, rotate=args.rotate)
            print(f"{site}: private {key} (0600, stays at the site), public {pub} (register it)")
    warnings = certs.expiry_warnings(directory)
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    if args.certs_cmd == "check":
        print(
            "certificates ok" if not warnings else f"{len(warnings)} certificate(s) need attention"
        )
        return 1 if warnings else 0
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    """Run ``fedhealth site run|check|status``: the hospital's daemon."""
    from fedhealth.supernode import daemon
    from fedhealth.supernode.preflight import check
    from fedhealth.supernode.settings import load
    from fedhealth.supernode.sitestatus import status

    settings = load(args.config, args.settings, insecure=args.insecure)
    if args.site_cmd == "run":
        return daemon.run(settings)
    if args.site_cmd == "check":
        items = check(settings)
        for item in items:
            print(f"{'PASS' if item.ok else 'FAIL'}  {item.name:<12} {item.detail}")
        failed = [i.name for i in items if not i.ok]
        print(
            f"site {settings.name}: "
            + (f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "ready")
        )
        return 1 if failed else 0
    report = status(settings)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    state = report["daemon"]
    if isinstance(state, dict):
        print(
            f"site {settings.name}: {state.get('state')} since {state.get('since')} "
            f"(pid {state.get('pid')}, coordinator {state.get('coordinator')})"
        )
        for key in (
            "activity",
            "last_trained",
            "last_evaluated",
            "last_failed",
            "budget",
            "reason",
        ):
            if state.get(key):
                print(f"  {key.replace('_', ' ')}: {state[key]}")
    else:
        print(f"site {settings.name}: daemon {state}")
    p = report["privacy"]
    print(
        f"  privacy: epsilon {p['epsilon_spent']:.4f} of {p['epsilon_cap']:g} spent in "
        f"{p['rounds_trained']} round(s)" + (f"; last: {p['last']}" if p.get("last") else "")
    )
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Run ``fedhealth server run|launch|enrol|sites|revoke``: the coordinator, enrolment."""
    from fedhealth.superlink.launcher import launch
    from fedhealth.superlink.service import run
    from fedhealth.superlink.settings import load

    if args.server_cmd == "run":
        return run(load(args.config, args.settings, insecure=args.insecure))
    if args.server_cmd in ("enrol", "sites", "revoke"):
        from fedhealth.superlink.operator import command

        cmd = "sites-json" if getattr(args, "json", False) else args.server_cmd
        settings = load(args.config, args.settings, insecure=args.insecure)
        return command(
            cmd, settings, name=getattr(args, "name", ""), key=getattr(args, "key", None)
        )
    if args.server_cmd in ("status", "logs"):
        from fedhealth.superlink.runview import command as view

        settings = load(args.config, args.settings, insecure=args.insecure, role="launch")
        root = args.run_root or settings.state / "runs"
        return view(args.server_cmd, root, getattr(args, "name", ""), getattr(args, "json", False))
    given = [f"{k}={v}" for k, v in (("ca", args.ca), ("state_dir", args.state_dir)) if v]
    settings = load(args.config, given, insecure=args.insecure, role="launch")
    return launch(settings, args.settings, args.address, args.timeout)


def cmd_app(args: argparse.Namespace) -> int:
    """Run ``fedhealth app build|sign|keygen``: app bundles sites can approve."""
    from fedhealth.superlink.appcmd import app_command

    return app_command(args.app_cmd, vars(args))


def _versions() -> str:
    from importlib.metadata import version

    from fedhealth import __version__

    stack = ", ".join(f"{p} {version(p)}" for p in ("flwr", "torch", "monai", "opacus"))
    return f"fedhealth {__version__} ({stack})"


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Help that states each option's default, when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``fedhealth`` argument parser with every subcommand."""
    parser = _Parser(prog="fedhealth", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging; simulate prints every library's lines here, not into its log file",
    )
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run N sites on Flower's simulation engine")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. sites=4 rounds=5")
    p.add_argument(
        "--cfg", choices=["job"], default=None, help="print the resolved config and exit (Hydra's)"
    )
    p.set_defaults(func=cmd_simulate)

    add_data_commands(sub)
    certs = sub.add_parser("certs", help="consortium CA, coordinator TLS cert, site auth keys")
    certs_sub = certs.add_subparsers(dest="certs_cmd", required=True)
    p = certs_sub.add_parser("init", help="create the consortium CA and the coordinator's TLS cert")
    p.add_argument(
        "--server-name",
        nargs="+",
        default=["localhost", "127.0.0.1", "::1"],
        help="DNS names / IP addresses sites use to reach the coordinator",
    )
    p = certs_sub.add_parser("site", help="create a site's SuperNode authentication key pair")
    p.add_argument("names", nargs="+")
    certs_sub.add_parser("check", help="warn about expired or soon-expiring certificates")
    for name, sp in certs_sub.choices.items():
        sp.add_argument("--dir", type=Path, default=Path("certs"), help="key directory")
        if name != "check":  # check only reads
            sp.add_argument(
                "--rotate",
                action="store_true",
                help="replace existing keys/certs (old files kept as .bak)",
            )
        sp.set_defaults(func=cmd_certs, rotate=False)

    site = sub.add_parser("site", help="the hospital's site daemon").add_subparsers(
        dest="site_cmd", required=True
    )
    for name, text in (
        ("run", "keep this site's SuperNode connected (until SIGTERM)"),
        ("check", "preflight: data, keys, ledger, coordinator"),
        ("status", "what the daemon is doing and what the site has spent"),
    ):
        p = site.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=None, help="site.yaml")
        p.add_argument(
            "--insecure", action="store_true", help="NO TLS, NO authentication (labs only)"
        )
        p.add_argument("settings", nargs="*", help="key=value overrides of site.yaml")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_site)

    server = sub.add_parser("server", help="the coordinator service").add_subparsers(
        dest="server_cmd", required=True
    )
    p = server.add_parser(
        "run", help="SuperLink with TLS, site enrolment, state db (until SIGTERM)"
    )
    p.add_argument("settings", nargs="*", help="key=value overrides of coordinator.yaml")
    p = server.add_parser("launch", help="submit a run, follow it to the end, write the report")
    p.add_argument("settings", nargs="*", help="Hydra overrides of the run config")
    p.add_argument(
        "--address",
        default=None,
        help="the Control API host:port (default: control_host:control_port of --config)",
    )
    p.add_argument("--ca", default=None, help="consortium CA certificate (default: from --config)")
    p.add_argument("--state-dir", default=None, help="where the launcher keeps its Flower config")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    p = server.add_parser("enrol", help="bind a site's public key to its name; register it")
    p.add_argument("name", help="the site's name (its metrics and privacy records)")
    p.add_argument("--key", type=Path, required=True, help="the site's public key (auth.pub)")
    p = server.add_parser("sites", help="enrolled sites: key fingerprint, node id, status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = server.add_parser("revoke", help="unregister a site's node and archive its key")
    p.add_argument("name", help="the enrolled site")
    p = server.add_parser("status", help="runs: state, round, last Dice, sites (read-only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = server.add_parser("logs", help="a run's per-round, per-site lines, refusals and why")
    p.add_argument("name", help="the run (its directory under the run root)")
    for name in ("status", "logs"):
        server.choices[name].add_argument(
            "--run-root", type=Path, default=None, help="default: <state_dir>/runs"
        )
    for name in ("enrol", "sites", "revoke", "status", "logs"):
        server.choices[name].add_argument("settings", nargs="*", help="overrides of --config")
    for p in server.choices.values():
        p.add_argument("--config", type=Path, default=None, help="coordinator.yaml")
        p.add_argument(
            "--insecure", action="store_true", help="NO TLS, NO site authentication (labs only)"
        )
        p.set_defaults(func=cmd_server)

    app = sub.add_parser("app", help="app bundles (FABs) sites approve").add_subparsers(
        dest="app_cmd", required=True
    )
    p = app.add_parser("build", help="build this project's FAB; print its path and sha256")
    p.add_argument("--out", type=Path, default=Path("dist"), help="output directory")
    p = app.add_parser("sign", help="sign a FAB with a publisher key (writes <fab>.sig)")
    p.add_argument("fab", type=Path, help="the .fab file")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (OpenSSH/PEM)")
    p.add_argument("--key-id", default="", help="the key's id (default: the key file's stem)")
    p = app.add_parser("keygen", help="create a publisher's Ed25519 key pair")
    p.add_argument("key_id", help="the key's id, as sites' trusted_publishers name it")
    p.add_argument("--dir", type=Path, default=Path("keys"), help="where to write the keys")
    for sp in app.choices.values():
        sp.set_defaults(func=cmd_app)

    add_report_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedhealth`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``fedhealth``; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: the subcommand's own, or 2 after a catalogued error, which is printed
        with its code and help text and without a traceback.
    """
    args = build_parser().parse_args(argv)
    _setup_logging(verbose=args.verbose)
    try:
        return int(args.func(args))
    except FedHealthError as exc:
        print(f"fedhealth: error {exc.describe()}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
