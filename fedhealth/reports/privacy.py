"""Privacy budget report for a hospital's privacy officer: HTML (plots embedded), JSON, Markdown.

Input is either a run directory (its ``privacy.jsonl``, as reported up by the sites) or a site's
privacy ledger (``ledger.sqlite``, a directory holding one, or a root of ``site-*/`` ledgers).
Every epsilon is recomputed from the recorded parameters by Google's dp-accounting, and the
report shows both figures side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import FedHealthError
from fedhealth.privacy.accounting import Phase, epsilon
from fedhealth.privacy.independent import agrees, independent_epsilon
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.runs.rundir import read_jsonl

MAX_ROUNDS_LEFT = 10_000


@dataclass
class Row:
    """One training phase of one site (a round of a run)."""

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


@dataclass
class SiteSummary:
    site: str
    accountant: str
    delta: float
    epsilon_cap: float
    epsilon_spent: float
    rounds_left: int | None
    status: str
    rows: list[Row] = field(default_factory=list)


@dataclass
class PrivacyReport:
    source: str
    kind: str
    created: str
    sites: list[SiteSummary]

    @property
    def all_agree(self) -> bool:
        """True only if every trained phase was recomputed independently and agreed."""
        trained = [r for s in self.sites for r in s.rows if r.status == "trained"]
        return bool(trained) and all(r.agrees is True for r in trained)


def rounds_left(
    history: list[Phase], last: Phase, cap: float, delta: float, accountant: str
) -> int:
    """How many more phases like ``last`` fit within ``cap`` (exponential then binary search)."""

    def fits(k: int) -> bool:
        return epsilon([*history, (last[0], last[1], last[2] * k)], delta, accountant) <= cap

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_ROUNDS_LEFT and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_ROUNDS_LEFT:
        return MAX_ROUNDS_LEFT
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _summarize(
    site: str, accountant: str, delta: float, cap: float, rows: list[Row], history: list[Phase]
) -> SiteSummary:
    spent = rows[-1].epsilon if rows else 0.0
    trained = [r for r in rows if r.status == "trained"]
    left = None
    if trained and history:
        last = trained[-1]
        left = rounds_left(
            history, (last.noise_multiplier, last.sample_rate, last.steps), cap, delta, accountant
        )
    refused = any(r.status == "refused" for r in rows)
    status = (
        "budget exhausted: site refused to train"
        if refused
        else ("within budget" if spent <= cap else "OVER BUDGET")
    )
    return SiteSummary(site, accountant, delta, cap, spent, left, status, rows)


def _check(row: Row, history: list[Phase], delta: float, accountant: str) -> None:
    row.independent_epsilon = independent_epsilon(history, delta, accountant)
    row.agrees = agrees(row.epsilon, row.independent_epsilon)


def from_run_dir(run_dir: Path) -> PrivacyReport:
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
        rows, spent, history = [], 0.0, []
        for i, line in enumerate(sorted(lines, key=lambda x: x["round"])):
            if line["status"] == "trained":
                spent = float(line["epsilon"])
                history = [tuple(h) for h in line.get("history", [])]
                row = Row(
                    i + 1,
                    run_dir.name,
                    line["round"],
                    "trained",
                    spent,
                    line["noise_multiplier"],
                    line["sample_rate"],
                    line["dp_steps"],
                    line.get("max_grad_norm"),
                )
                if history:
                    _check(row, history, delta, accountant)
            else:
                row = Row(i + 1, run_dir.name, line["round"], line["status"], spent)
            rows.append(row)
        sites.append(
            _summarize(site, accountant, delta, float(meta.get("epsilon_cap", 0.0)), rows, history)
        )
    return PrivacyReport(str(run_dir), "run", _now(), sites)


def from_ledgers(paths: list[Path]) -> PrivacyReport:
    sites = []
    for path in paths:
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries
            name = ledger.db.execute("SELECT value FROM meta WHERE key='site'").fetchone()[0]
        if not entries:
            continue
        rows, history = [], []
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
    """A run directory, a ledger file, a directory with ``ledger.sqlite``, or a ledger root."""
    path = Path(path)
    if path.is_file():
        return from_ledgers([path])
    if (path / "privacy.jsonl").is_file() or (path / "manifest.json").is_file():
        return from_run_dir(path)
    ledgers = sorted(path.glob("ledger.sqlite")) or sorted(path.glob("*/ledger.sqlite"))
    if ledgers:
        return from_ledgers(ledgers)
    raise FedHealthError(f"{path}: neither a run directory nor a privacy ledger")


# -- rendering ------------------------------------------------------------------------------


def plot_png(report: PrivacyReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for i, site in enumerate(report.sites):
        color = f"C{i % 10}"
        xs = [r.step if report.kind == "ledger" else r.round for r in site.rows]
        ax.plot(xs, [r.epsilon for r in site.rows], marker="o", color=color, label=site.site)
        ax.axhline(site.epsilon_cap, color=color, linestyle="--", linewidth=1)
        refused = [(x, r.epsilon) for x, r in zip(xs, site.rows) if r.status == "refused"]
        if refused:
            ax.scatter(*zip(*refused), marker="x", s=80, color=color, zorder=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training phase (in order, all runs)" if report.kind == "ledger" else "round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("Privacy spent per site (dashed: each site's cap; x: refused)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def explanation(report: PrivacyReport) -> str:
    caps = sorted({(s.epsilon_cap, s.delta) for s in report.sites})
    eps, delta = caps[0]
    return (
        "What these numbers mean for patients. Each hospital trained the shared model with "
        "differential privacy, counting each patient as one record (all of a patient's scans "
        "together). Epsilon measures the most that any one patient's presence in the training "
        "data can change what the shared model reveals: the smaller, the stronger the protection. "
        f"With a cap of epsilon = {eps:g} and delta = {delta:g}, anything an outsider could learn "
        "from the model is at most about "
        f"{_factor(eps)} times more (or less) likely whether or not a given patient's scans were "
        f"used, except with a probability of at most {delta:g}. This holds over everything the "
        "hospital has trained so far, in all runs recorded here, whatever the outsider knows. "
        "Epsilon only grows: every training round spends a little more, and a hospital refuses "
        "to train once the next round would take it past its cap. 'Rounds left' is how many more "
        "rounds like the last one fit under the cap. The images themselves never leave the "
        "hospital; only model parameters and summary metrics do. Evaluation scores computed on "
        "the hospital's test patients are not covered by this budget."
    )


def _factor(eps: float) -> str:
    import math

    value = math.exp(eps)
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def to_json(report: PrivacyReport) -> str:
    return json.dumps(
        {**asdict(report), "all_agree": report.all_agree, "explanation": explanation(report)},
        indent=2,
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


ROW_HEAD = [
    "site",
    "#",
    "run",
    "round",
    "status",
    "noise multiplier",
    "sampling rate",
    "steps",
    "clip norm",
    "epsilon after",
    "epsilon (dp-accounting)",
    "agree within 1%",
]
SUM_HEAD = ["site", "epsilon spent", "cap", "delta", "accountant", "rounds left", "status"]


def _sum_cells(s: SiteSummary) -> list[str]:
    return [
        s.site,
        _fmt(s.epsilon_spent),
        _fmt(s.epsilon_cap),
        _fmt(s.delta),
        s.accountant,
        _fmt(s.rounds_left),
        s.status,
    ]


def _row_cells(site: str, r: Row) -> list[str]:
    return [
        site,
        str(r.step),
        r.run,
        str(r.round),
        r.status,
        _fmt(r.noise_multiplier),
        _fmt(r.sample_rate),
        _fmt(r.steps),
        _fmt(r.max_grad_norm),
        _fmt(r.epsilon),
        _fmt(r.independent_epsilon),
        _fmt(r.agrees),
    ]


def to_markdown(report: PrivacyReport) -> str:
    def table(head: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    return (
        "\n\n".join(
            [
                "# Privacy budget report",
                f"Source: `{report.source}` ({report.kind}); written {report.created}.",
                "## Summary",
                table(SUM_HEAD, [_sum_cells(s) for s in report.sites]),
                explanation(report),
                "## Every training phase",
                table(ROW_HEAD, [_row_cells(s.site, r) for s in report.sites for r in s.rows]),
                f"Independent check (Google dp-accounting): "
                f"{'every epsilon agrees within 1%' if report.all_agree else 'NOT every epsilon confirmed'}.",
            ]
        )
        + "\n"
    )


def to_html(report: PrivacyReport) -> str:
    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    png = base64.b64encode(plot_png(report)).decode()
    check = (
        "Every epsilon above agrees within 1% with Google's dp-accounting, an accountant "
        "independent of the one used in training."
        if report.all_agree
        else "WARNING: at least one epsilon could not be confirmed by the independent accountant."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy budget report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child, th:first-child {{ text-align: left; }}
p.explain {{ background: #f7f9fc; border-left: 4px solid #4a78c2; padding: 0.8em 1em; }}
</style></head><body>
<h1>Privacy budget report</h1>
<p>Source: <code>{html.escape(report.source)}</code> ({report.kind}); written {report.created}.</p>
<h2>Summary</h2>
{table(SUM_HEAD, [_sum_cells(s) for s in report.sites])}
<p class="explain">{html.escape(explanation(report))}</p>
<h2>Privacy spent over time</h2>
<img alt="epsilon per round per site against each cap" src="data:image/png;base64,{png}">
<h2>Every training phase</h2>
{table(ROW_HEAD, [_row_cells(s.site, r) for s in report.sites for r in s.rows])}
<p>{html.escape(check)}</p>
</body></html>
"""


def write(report: PrivacyReport, out_dir: Path | str) -> dict[str, Path]:
    from fedhealth.io import atomic_write_text

    out = Path(out_dir)
    paths = {
        "html": out / "privacy-report.html",
        "json": out / "privacy-report.json",
        "md": out / "privacy-report.md",
    }
    atomic_write_text(paths["html"], to_html(report))
    atomic_write_text(paths["json"], to_json(report))
    atomic_write_text(paths["md"], to_markdown(report))
    return paths


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
