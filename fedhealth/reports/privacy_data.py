"""The privacy report's data: rows per training phase, per-site summaries, and their loading.

Every epsilon read from a run directory or a ledger is recomputed from its recorded DP-SGD
parameters by Google's dp-accounting (:mod:`fedhealth.privacy.independent`), independently of
the Opacus accountant used in training (RDP, Mironov 2017, https://arxiv.org/abs/1702.07476;
or PRV, Gopi et al. 2021, https://arxiv.org/abs/2106.02848). Import these names from
:mod:`fedhealth.reports.privacy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from fedhealth.errors import FedHealthError
from fedhealth.privacy.accounting import Phase, rounds_left
from fedhealth.privacy.independent import agrees, independent_epsilon
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.runs.rundir import read_jsonl

DP_OFF = "dp off by the site's own choice"
"""Row status of a site that trained without DP under its own ``require_dp: false`` (the
coordinator's :data:`fedhealth.serverapp.checks.DP_OFF_STATUS`)."""


@dataclass
class Row:
    """One training phase of one site (a round of a run).

    Parameters
    ----------
    step : int
        1-based position of the phase in the site's rows.
    run : str
        The run's name.
    round : int
        The server round.
    status : str
        ``"trained"``, or what the site did instead (e.g. ``"refused"``).
    epsilon : float
        Epsilon spent after this phase, cumulative over all the site's phases.
    noise_multiplier : float or None, default None
        DP-SGD noise multiplier (trained phases).
    sample_rate : float or None, default None
        Poisson sampling rate (trained phases).
    steps : int or None, default None
        DP-SGD steps of the phase (trained phases).
    max_grad_norm : float or None, default None
        Per-record clipping bound, where recorded.
    independent_epsilon : float or None, default None
        Epsilon recomputed by dp-accounting, where the history is known.
    agrees : bool or None, default None
        Whether both epsilons agree within 1%.
    reason : str, default ""
        Why the site refused (``budget``, ``policy: <field>``), for a refused row.
    """

    step: int
    run: str
    round: int
    status: str
    epsilon: float
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    independent_epsilon: float | None = None
    agrees: bool | None = None
    reason: str = ""


@dataclass
class SiteSummary:
    """One site's budget and phases.

    Parameters
    ----------
    site : str
        The site's name.
    accountant : str
        ``"rdp"`` or ``"prv"``.
    delta : float
        The site's delta.
    epsilon_cap : float
        The site's epsilon cap.
    epsilon_spent : float
        Epsilon after the site's last row (0.0 with no row).
    rounds_left : int or None
        How many more phases like the last trained one fit under the cap (see
        :func:`rounds_left`); None without a trained phase and its history.
    status : str
        ``"within budget"``, ``"OVER BUDGET"``, ``"budget exhausted: site refused to
        train"`` or ``"DP off by the site's own choice"`` (no DP-trained phase).
    rows : list of Row, default []
        The site's phases, in order.
    privacy_unit : str, default "patient"
        What one DP record was at the site, as it reported: ``"patient"``, ``"scan"`` or
        ``"unstated"``.
    dp_off : bool, default False
        The site trained at least one round without DP, by its own policy.
    noise_seeded : bool, default False
        The site drew its DP noise from its own fixed seed (``dp_noise_seed``) in at least
        one round: reproducible by whoever knows that seed.
    """

    site: str
    accountant: str
    delta: float
    epsilon_cap: float
    epsilon_spent: float
    rounds_left: int | None
    status: str
    rows: list[Row] = field(default_factory=list)
    privacy_unit: str = "patient"
    dp_off: bool = False
    noise_seeded: bool = False


@dataclass
class PrivacyReport:
    """A privacy budget report over one or more sites.

    Parameters
    ----------
    source : str
        The run directory or ledger path(s) it was read from.
    kind : {"run", "ledger"}
        Read from a run directory's ``privacy.jsonl`` or from privacy ledgers.
    created : str
        UTC time it was made, ISO 8601 to the second.
    sites : list of SiteSummary
        One summary per site.
    """

    source: str
    kind: Literal["run", "ledger"]
    created: str
    sites: list[SiteSummary]

    @property
    def all_agree(self) -> bool:
        """Whether every trained phase that could be recomputed was, and agreed.

        A phase whose site kept its DP history at the site (its policy releases only the
        epsilon) is left out: :attr:`withheld` names those sites. False when no phase was
        recomputed.
        """
        trained = [r for s in self.sites for r in s.rows if r.status == "trained"]
        checked = [r for r in trained if r.independent_epsilon is not None]
        return bool(checked) and all(r.agrees is True for r in checked)

    @property
    def confirmed(self) -> bool:
        """Whether no recomputed epsilon disagrees, and every other one was kept at its site.

        True when :attr:`all_agree`, or when no recomputed phase disagrees and the phases not
        recomputed belong to sites that kept their history (:attr:`withheld`); False when a
        phase disagrees or nothing was trained.
        """
        rows = [r for s in self.sites for r in s.rows if r.status == "trained"]
        if not rows or any(r.agrees is False for r in rows):
            return False
        return self.all_agree or bool(self.withheld)

    @property
    def withheld(self) -> list[str]:
        """Sites whose trained phases came without their DP history (their policy kept it)."""
        return [
            s.site
            for s in self.sites
            if any(r.status == "trained" and r.independent_epsilon is None for r in s.rows)
        ]


def _summarize(
    site: str, accountant: str, delta: float, cap: float, rows: list[Row], history: list[Phase]
) -> SiteSummary:
    spent = rows[-1].epsilon if rows else 0.0
    trained = [r for r in rows if r.status == "trained"]
    left = None
    if trained and history:
        last = trained[-1]
        noise, rate, steps = last.noise_multiplier, last.sample_rate, last.steps
        if noise is None or rate is None or steps is None:
            raise FedHealthError(f"site {site}: trained phase {last.step} has no DP parameters")
        left = rounds_left(history, (noise, rate, steps), cap, delta, accountant)
    refused = [r for r in rows if r.status == "refused"]
    dp_off = any(r.status == DP_OFF for r in rows)
    status = "within budget" if spent <= cap else "OVER BUDGET"
    if refused and refused[-1].reason.startswith("policy"):
        status = f"refused by its own policy ({refused[-1].reason})"
    elif refused:
        status = "budget exhausted: site refused to train"
    elif left == 0 and spent <= cap:
        status = "budget used up: a next round like the last would pass the cap"
    if dp_off and not trained:
        status = "DP off by the site's own choice"
    return SiteSummary(site, accountant, delta, cap, spent, left, status, rows, dp_off=dp_off)


def _check(row: Row, history: list[Phase], delta: float, accountant: str) -> None:
    row.independent_epsilon = independent_epsilon(history, delta, accountant)
    row.agrees = agrees(row.epsilon, row.independent_epsilon)


def from_run_dir(run_dir: Path) -> PrivacyReport:
    """Build the report of a run from its ``privacy.jsonl`` (what the sites reported up).

    Each site's accountant, delta and cap are those of its last trained row; a trained row
    with a ``history`` is recomputed independently.

    Parameters
    ----------
    run_dir : Path
        The run directory.

    Returns
    -------
    PrivacyReport
        ``kind="run"``, sites in name order, rows in round order.

    Raises
    ------
    FedHealthError
        If ``privacy.jsonl`` is missing or has no row, or a trained row lacks its DP
        parameters.
    """
    rows_by_site: dict[str, list[dict[str, Any]]] = {}
    for line in read_jsonl(run_dir / "privacy.jsonl"):
        rows_by_site.setdefault(line["site"], []).append(line)
    if not rows_by_site:
        raise FedHealthError(f"{run_dir}: no privacy.jsonl rows (was DP enabled for this run?)")
    sites = []
    for site, lines in sorted(rows_by_site.items()):
        trained = [line for line in lines if line["status"] == "trained"]
        meta = trained[-1] if trained else {}
        accountant, delta = meta.get("accountant", "rdp"), float(meta.get("delta", 0.0))
        rows: list[Row] = []
        spent = 0.0
        history: list[Phase] = []
        for i, line in enumerate(sorted(lines, key=lambda x: x["round"])):
            if line["status"] == "trained":
                spent = float(line["epsilon"])
                # JSON arrays, as the site reported them: (noise, sample rate, steps) each
                history = cast(list[Phase], [tuple(h) for h in line.get("history", [])])
                # withheld unless the site's policy releases them; its history's last phase is
                # this round's (the site charged it before reporting)
                noise, rate, steps = (
                    line.get(k) for k in ("noise_multiplier", "sample_rate", "dp_steps")
                )
                if None in (noise, rate, steps) and history:
                    noise, rate, steps = history[-1]
                row = Row(
                    i + 1,
                    run_dir.name,
                    line["round"],
                    "trained",
                    spent,
                    noise,
                    rate,
                    steps,
                    line.get("max_grad_norm"),
                )
                if history:
                    _check(row, history, delta, accountant)
            else:
                row = Row(i + 1, run_dir.name, line["round"], line["status"], spent)
                row.reason = str(line.get("reason", ""))
            rows.append(row)
        summary = _summarize(
            site, accountant, delta, float(meta.get("epsilon_cap", 0.0)), rows, history
        )
        summary.privacy_unit = str(meta.get("privacy_unit", "unstated"))
        summary.noise_seeded = any(line.get("noise_seeded") is True for line in lines)
        sites.append(summary)
    return PrivacyReport(str(run_dir), "run", _now(), sites)


def from_ledgers(paths: list[Path]) -> PrivacyReport:
    """Build the report of one or more sites' privacy ledgers.

    Every entry is recomputed independently from the ledger's history up to it; a ledger
    without entries is left out.

    Parameters
    ----------
    paths : list of Path
        ``ledger.sqlite`` files.

    Returns
    -------
    PrivacyReport
        ``kind="ledger"``, one site per ledger with entries, rows in ledger order.

    Raises
    ------
    LedgerError
        If a ledger is unreadable or fails its hash chain.
    FedHealthError
        If no ledger has an entry.
    """
    sites = []
    for path in paths:
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries
            name = ledger.db.execute("SELECT value FROM meta WHERE key='site'").fetchone()[0]
        if not entries:
            continue
        rows: list[Row] = []
        history: list[Phase] = []
        for i, e in enumerate(entries):
            history.append(e.phase)
            row = Row(
                i + 1,
                e.run,
                e.round,
                "trained",
                e.epsilon_after,
                e.noise_multiplier,
                e.sample_rate,
                e.steps,
                e.max_grad_norm,
            )
            _check(row, list(history), e.delta, e.accountant)
            rows.append(row)
        last = entries[-1]
        sites.append(_summarize(name, last.accountant, last.delta, last.epsilon_cap, rows, history))
    if not sites:
        raise FedHealthError(f"no ledger entries in {', '.join(map(str, paths))}")
    return PrivacyReport(", ".join(map(str, paths)), "ledger", _now(), sites)


def load(path: Path | str) -> PrivacyReport:
    """Build the report of a run directory, a ledger file, or a directory of ledgers.

    Parameters
    ----------
    path : Path or str
        A ledger file; a run directory (holding ``privacy.jsonl`` or ``manifest.json``); a
        directory holding ``ledger.sqlite``; or a root whose subdirectories each hold one.

    Returns
    -------
    PrivacyReport
        As :func:`from_ledgers` or :func:`from_run_dir`.

    Raises
    ------
    FedHealthError
        If ``path`` is none of these, or as :func:`from_run_dir` and :func:`from_ledgers`.
    LedgerError
        As :func:`from_ledgers`.
    """
    path = Path(path)
    if path.is_file():
        return from_ledgers([path])
    if (path / "privacy.jsonl").is_file() or (path / "manifest.json").is_file():
        return from_run_dir(path)
    ledgers = sorted(path.glob("ledger.sqlite")) or sorted(path.glob("*/ledger.sqlite"))
    if ledgers:
        return from_ledgers(ledgers)
    raise FedHealthError(f"{path}: neither a run directory nor a privacy ledger")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
