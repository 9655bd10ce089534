"""The one ``fedhealth`` command.

    fedhealth simulate [overrides...]            N sites on Flower's simulation engine
    fedhealth data synth [overrides...]          write the synthetic multi-site cohort
    fedhealth baseline centralized|local [...]   the comparison points for federation
    fedhealth predict --model RUN --data D --out O   segment a hospital's scans (its own grid)
    fedhealth report privacy <run dir | ledger>  privacy budget report for a privacy officer
    fedhealth report training <run dir>          training report: Dice per site, loss, plots
    fedhealth certs init|site|check              consortium CA, coordinator TLS, site keys
    fedhealth site run|check|status --config site.yaml        the hospital's daemon
    fedhealth server run|launch --config coordinator.yaml     the coordinator service, runs
    fedhealth app build|sign|keygen              approved app bundles: hash, publisher signature
    fedhealth server enrol|sites|revoke --config coordinator.yaml   site enrolment (operator)
    fedhealth server status|logs RUN|stop RUN    watch and stop runs (operator)
    fedhealth compose up [VAR=VALUE...]          the docker-compose topology (no engine: local)

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
from typing import Any, NoReturn

from fedhealth.cli_compose import add_compose_commands
from fedhealth.cli_data import add_data_commands
from fedhealth.cli_report import add_report_commands
from fedhealth.cli_server import add_server_commands
from fedhealth.errors import FedHealthError
from fedhealth.protocol.keys import NUM_EXAMPLES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


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
            print(f"log: {log_file} (fedhealth -v simulate ... prints it here)", file=sys.stderr)
            yield log_file

    return console


def _leave_interrupted() -> NoReturn:
    """End a Ctrl-C'd simulation now: exit 130 without waiting for Flower's threads.

    Flower's simulation leaves the ServerApp's thread polling and its Ray actor pool's
    workers blocked in ``ray.get`` on actors that died with the interrupt; the interpreter
    would join them at exit forever. Every file the run wrote is whole (atomic writes), and
    the same command resumes the run, so the process shuts Ray down (at most 15 s) and exits.
    """
    import os
    import threading

    print("fedhealth: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()

    def stop_ray() -> None:
        import ray

        ray.shutdown()

    stopping = threading.Thread(target=stop_ray, daemon=True)
    stopping.start()
    stopping.join(15)
    logging.shutdown()
    os._exit(EXIT_INTERRUPTED)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedhealth simulate``: the federation on the simulation engine, then its reports."""
    from fedhealth.config import compose
    from fedhealth.runs.rundir import read_metrics
    from fedhealth.simulation import SITES_LOG, simulate

    if args.info:
        from fedhealth.config import config_groups

        for group, options in config_groups().items():
            print(f"{group}: {', '.join(options)}")
        print("choose one with an override, e.g. strategy=fedprox model=segresnet privacy=off")
        return 0
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
    manifest = Path(cfg.run_root) / str(cfg.run_name) / "manifest.json"
    if cfg.run_name and manifest.is_file() and json.loads(manifest.read_text()).get("finished"):
        print(f"run {cfg.run_name} already finished: nothing trained; its results and reports")
    try:
        run_dir = simulate(cfg, console=None if args.verbose else _console(cfg.rounds))
    except KeyboardInterrupt:
        _leave_interrupted()
    evaluated = [
        line for line in read_metrics(run_dir.path) if line.get("evaluate", {}).get("sites")
    ]
    print(f"\nrun directory: {run_dir.path.resolve()}")
    if (run_dir.path / SITES_LOG).is_file():
        print(f"site logs: {run_dir.path.resolve() / SITES_LOG}")
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
    return 1 if "stopped" in run_dir.manifest else 0  # stopped early: reported, not complete


def cmd_certs(args: argparse.Namespace) -> int:
    """Run ``fedhealth certs init|site|check``: the consortium CA, coordinator TLS, site keys."""
    from cryptography import x509

    from fedhealth.security import certs
    from fedhealth.security.tlsprobe import describe

    directory: Path = args.dir
    if args.certs_cmd == "init":
        ca = certs.create_ca(
            directory,
            certs.unique_ca_name(args.consortium),
            rotate=args.rotate,
            organization=args.consortium,
        )
        server = certs.create_server_cert(ca, directory, args.server_name, rotate=args.rotate)
        print(f"consortium CA: {directory / 'ca.crt'} (key {directory / 'ca.key'}, 0600)")
        print(f"  {describe(ca.cert)}: sites compare this fingerprint")
        print(f"coordinator TLS: {server} for {', '.join(args.server_name)}")
    elif args.certs_cmd == "site":
        for site in args.names:
            key, pub = certs.create_site_keys(directory, site, rotate=args.rotate)
            print(f"{site}: private {key} (0600, stays at the site), public {pub} (register it)")
    warnings = certs.expiry_warnings(directory)
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    if args.certs_cmd == "check":
        if (directory / "ca.crt").is_file():
            ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            print(f"consortium CA {directory / 'ca.crt'}: {describe(ca_cert)}")
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
    from fedhealth.supernode.statustext import format_status

    print(format_status(report))
    return 0


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
    parser = _Parser(prog="fedhealth", description=(__doc__ or "").replace("``", "`"))
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
    p.add_argument(
        "--info", choices=["groups"], default=None, help="list the config groups and their options"
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
    p.add_argument(
        "--consortium",
        default="fedhealth consortium",
        help="the consortium's name: the CA's organisation; its common name adds the date and "
        "a random tag, so every CA is told apart",
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
            p.add_argument(
                "--json", action="store_true", help="print the status as JSON, for machines"
            )
        p.set_defaults(func=cmd_site)

    add_server_commands(sub)

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
    add_compose_commands(sub)
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
    except KeyboardInterrupt:  # Ctrl-C: what was written is kept (every write is atomic)
        print("fedhealth: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
