"""The attack suite: a hospital's security team runs it against its own install.

    python -m fedhealth.testing.attacks [--workdir DIR] [--json FILE]

It starts, on loopback, a TLS coordinator (``fedhealth server run``, a real SuperLink) and two
enrolled sites (``fedhealth site run`` on real NIfTI data from ``fedhealth data synth``, with a
canary planted in site-0's images), launches the consortium's real run, and tries each attack
against it: a row per attack with what was tried, the refusal expected, what happened and the
evidence. Then the privacy rows (:mod:`fedhealth.testing.attacks_privacy`): instructions a
curious coordinator can send the approved ClientApp (DP off, plain train, bounds, replays,
concurrent runs at the cap, a shortened ledger), against a site's own ledger. It exits 0 only
when every attack was refused; a row that could not be tried counts as not refused. The rows
are the threat model of ``DESIGN.md`` in executable form: every new entry point or instruction
field gets one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

from fedhealth.testing.attacks_apps import (
    exfiltration_scan,
    fab_sha256,
    freeze_release,
    unapproved_server_app,
    unapproved_site_app,
    write_apps,
)
from fedhealth.testing.attacks_evidence import plant_canary
from fedhealth.testing.attacks_lab import SITES, Lab
from fedhealth.testing.attacks_privacy import privacy_rows
from fedhealth.testing.attacks_rows import (
    Row,
    attacker_connections,
    control_attack,
    foreign_ca,
    operator_runs,
    plaintext,
    rogue_registration,
    unregistered_site,
)

__all__ = ["Row", "format_table", "main", "run_suite"]

RUN_NAME = "attack-suite"


def _project() -> Path:
    from fedhealth.security.apps import project_dir

    return project_dir()


def run_suite(workdir: Path, *, privacy: bool = True) -> list[Row]:
    """Build the consortium under ``workdir``, run every attack, stop everything.

    Parameters
    ----------
    workdir : Path
        Working directory (created; keys, data, logs, run directory).
    privacy : bool
        Keyword-only. Also run the privacy rows (:func:`privacy_rows`, against site-1's data and
        fresh ledgers; default True). The end-to-end tests run them on their own.

    Returns
    -------
    list of Row
        One per attack, in the table's order: the consortium's rows (ending with the check that
        its own run completed with both sites while attacked), then the privacy rows.
    """
    lab = Lab(workdir)
    lab.make_keys()
    lab.make_cohort()
    prints = plant_canary(lab.site_data("site-0"))
    apps = write_apps(lab.root / "apps", lab.markers, lab.received)
    lab.release = freeze_release(_project(), lab.root / "release")
    lab.site_approved = [fab_sha256(lab.release)]
    lab.coordinator_approved = [lab.site_approved[0], fab_sha256(apps["exfil"])]
    rows: list[Row] = []
    try:
        lab.start_coordinator()
        lab.start_sites()
        launcher = lab.launch(RUN_NAME)
        targets = attacker_connections(lab)
        run_id = _wait_run_id(lab)
        rows.append(rogue_registration(lab, targets))
        rows.append(control_attack(lab, targets, "ls", ["ls"]))
        rows.append(control_attack(lab, targets, "log", ["log", str(run_id), "--show"]))
        rows.append(control_attack(lab, targets, "stop", ["stop", str(run_id)]))
        rows.append(control_attack(lab, targets, "run", ["run", str(apps["exfil"])]))
        rows.append(plaintext(lab))
        rows.append(foreign_ca(lab))
        rows.append(unregistered_site(lab))
        real = _real_run(lab, launcher, run_id)
        rows.append(unapproved_site_app(lab, apps["exfil"], prints))
        rows.append(unapproved_server_app(lab, apps["rogue-server"]))
        rows.append(exfiltration_scan(lab, prints, _model_bytes(lab)))
        rows.append(real)
    finally:
        lab.stop()
    # what a curious coordinator can send the approved ClientApp, against a site's own ledger
    if privacy:
        rows += privacy_rows(lab.root / "privacy", lab.site_data("site-1"))
    for row in rows:
        row.evidence += [f"note: {n}" for n in lab.notes if "approv" in n and "app" in row.attack]
    return rows


def _wait_run_id(lab: Lab) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = operator_runs(lab)
        if runs:
            return int(runs[0]["run-id"])
        time.sleep(1.0)
    raise RuntimeError(f"the real run was not submitted within 120s:\n{lab.procs.logs()}")


def _real_run(lab: Lab, launcher: subprocess.Popen[bytes], run_id: int) -> Row:
    """Check the consortium's own run, attacked throughout: it must complete with both sites."""
    from fedhealth.runs.rundir import read_metrics

    row = Row(
        "the real run, unaffected",
        f"the consortium's run (Flower run {run_id}, `fedhealth server launch`) while the "
        "attacks above ran",
        "completes every round with exactly the two enrolled sites",
        check=True,
    )
    code = launcher.wait(timeout=480)
    status = next((r["status"] for r in operator_runs(lab) if int(r["run-id"]) == run_id), "?")
    try:
        lines = read_metrics(lab.runs / RUN_NAME)
    except (OSError, ValueError):
        lines = []
    sites = [sorted(line.get("train", {}).get("sites", {})) for line in lines[1:]]
    row.evidence += [
        f"launcher exit {code}; Flower status {status}",
        f"sites per round: {sites}",
        f"launcher: {lab.log('launch').strip().splitlines()[-1:] or ['(no output)']}",
    ]
    row.refused = code == 0 and status == "finished:completed" and sites == [sorted(SITES)]
    row.happened = "completed with both sites" if row.refused else "disturbed"
    return row


def _model_bytes(lab: Lab) -> int:
    """Bytes of the global model (its round-0 checkpoint file), the size of one update."""
    found = sorted((lab.runs / RUN_NAME / "checkpoints").glob("round-*.safetensors"))
    return found[0].stat().st_size if found else 0


def format_table(rows: list[Row], width: int = 110) -> str:
    """Render the rows as a plain-text table (one block per attack).

    Parameters
    ----------
    rows : list of Row
        The suite's rows.
    width : int, optional
        Line width (default 110).

    Returns
    -------
    str
        The table, ending with the verdict line.
    """
    verdicts = {
        False: {True: "REFUSED", False: "NOT REFUSED", None: "NOT TRIED"},
        True: {True: "HELD", False: "NOT HELD", None: "NOT TRIED"},
    }
    out = []
    for i, row in enumerate(rows, 1):
        out.append(f"{i:>2}. {row.attack:<32} [{verdicts[row.check][row.refused]}]")
        for label, text in (("tried", row.tried), ("expected", row.expected)):
            out += textwrap.wrap(
                text, width, initial_indent=f"    {label:<9}", subsequent_indent=" " * 13
            )
        out += textwrap.wrap(
            row.happened, width, initial_indent="    happened ", subsequent_indent=" " * 13
        )
        for item in row.evidence:
            out += textwrap.wrap(
                item, width, initial_indent="    evidence ", subsequent_indent=" " * 13
            )
    attacks = [r for r in rows if not r.check]
    checks = [r for r in rows if r.check]
    refused = sum(r.refused is True for r in attacks)
    held = sum(r.refused is True for r in checks)
    out.append(
        f"\n{refused} of {len(attacks)} attacks refused, {held} of {len(checks)} checks held: "
        + ("PASS" if refused + held == len(rows) else "FAIL")
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the attack suite and print its table.

    Parameters
    ----------
    argv : list of str, optional
        ``[--workdir DIR] [--json FILE]`` (default None: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every attack was refused, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedhealth.testing.attacks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="working directory (default: a new temporary one, kept)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedhealth-attacks-"))
    if workdir.resolve().is_relative_to(_project()):
        parser.error(f"--workdir {workdir}: outside the project, or its files join the app's FAB")
    started = time.monotonic()
    rows = run_suite(workdir)
    print(format_table(rows))
    print(f"workdir {workdir.resolve()}; {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if rows and all(r.refused is True for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
