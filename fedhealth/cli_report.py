"""``fedhealth report privacy|training``: the reports for people."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_report_commands"]


def cmd_report_training(args: argparse.Namespace) -> int:
    """Run ``fedhealth report training``: Dice per site per round, losses, refusals, baselines."""
    from fedhealth.reports.training import write_training_report

    baselines: dict[str, Any] = {}
    for path in args.baselines:
        baselines.update(json.loads(Path(path).read_text()))
    for kind, path in write_training_report(args.path, baselines).items():
        print(f"{kind}: {path}")
    return 0


def cmd_report_privacy(args: argparse.Namespace) -> int:
    """Run ``fedhealth report privacy``: the budget report of a run directory or a ledger."""
    from fedhealth.reports import privacy as privacy_report

    report = privacy_report.load(args.path)
    out = args.out or (args.path if args.path.is_dir() else args.path.parent)
    paths = privacy_report.write(report, out)
    for site in report.sites:
        print(
            f"{site.site:<14} epsilon {site.epsilon_spent:.4f} of {site.epsilon_cap:g} "
            f"(delta {site.delta:g}, {site.accountant}); rounds left: {site.rounds_left}; "
            f"{site.status}"
        )
    verdict = "all agree within 1%" if report.all_agree else "NOT all confirmed"
    if report.withheld:
        kept = ", ".join(report.withheld)
        verdict = f"{'every recomputed epsilon agrees' if report.confirmed else verdict}; "
        verdict += f"history kept at the site (its ledger report recomputes it): {kept}"
    print(f"independent check (dp-accounting): {verdict}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0 if report.confirmed else 1


def add_report_commands(sub: Any) -> None:
    """Register ``report privacy`` and ``report training`` on the CLI's subparsers.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``fedhealth`` parser's subcommands.
    """
    report = sub.add_parser("report", help="reports for people").add_subparsers(
        dest="report_cmd", required=True
    )
    p = report.add_parser("privacy", help="privacy budget report (HTML, JSON, Markdown)")
    p.add_argument("path", type=Path, help="a run directory, a ledger.sqlite, or a ledger root")
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default: beside input)"
    )
    p.set_defaults(func=cmd_report_privacy)
    p = report.add_parser("training", help="training report of a run (HTML with plots, JSON)")
    p.add_argument("path", type=Path, help="a run directory")
    p.add_argument(
        "--baselines",
        type=Path,
        nargs="*",
        default=[],
        help="JSON files `fedhealth baseline centralized|local` printed",
    )
    p.set_defaults(func=cmd_report_training)
