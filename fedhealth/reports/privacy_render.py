"""Render a privacy budget report for a hospital's privacy officer: HTML, JSON, Markdown.

The HTML page embeds a plot of epsilon spent per site against each site's cap. Import these
names from :mod:`fedhealth.reports.privacy`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict
from pathlib import Path

from fedhealth.reports.privacy_data import PrivacyReport, Row, SiteSummary


def plot_png(report: PrivacyReport) -> bytes:
    """Plot cumulative epsilon per site against each site's cap (matplotlib, Agg backend).

    The x axis is the round (run reports) or the phase number (ledger reports); refused
    phases are marked with an x.

    Parameters
    ----------
    report : PrivacyReport
        The report to plot.

    Returns
    -------
    bytes
        A PNG image, 8 x 4.2 inches at 110 dpi.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for i, site in enumerate(report.sites):
        color = f"C{i % 10}"
        xs = [r.step if report.kind == "ledger" else r.round for r in site.rows]
        ax.plot(xs, [r.epsilon for r in site.rows], marker="o", color=color, label=site.site)
        ax.axhline(site.epsilon_cap, color=color, linestyle="--", linewidth=1)
        refused = [
            (x, r.epsilon) for x, r in zip(xs, site.rows, strict=True) if r.status == "refused"
        ]
        if refused:
            refused_x, refused_eps = zip(*refused, strict=True)
            ax.scatter(refused_x, refused_eps, marker="x", s=80, color=color, zorder=3)
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
    """Explain in plain words what the report's epsilon and delta mean for patients.

    Parameters
    ----------
    report : PrivacyReport
        The report; its smallest (epsilon cap, delta) pair is the one quoted.

    Returns
    -------
    str
        One paragraph, quoting ``exp(epsilon)`` as the bound on how much more or less likely
        any outcome is with or without one patient's scans; then :func:`unit_sentences`.

    Raises
    ------
    IndexError
        If the report has no site.
    """
    trained = [s for s in report.sites if any(r.status == "trained" for r in s.rows)]
    if not trained:
        return (
            "What these numbers mean for patients. No hospital trained the shared model with "
            "differential privacy in this report: every site refused (see the reasons) or "
            "trained without it. There is no epsilon to quote, and nothing here is a privacy "
            "guarantee." + unit_sentences(report)
        )
    eps, delta = sorted({(s.epsilon_cap, s.delta) for s in trained})[0]
    return (
        "What these numbers mean for patients. Each hospital trained the shared model with "
        "differential privacy, counting each patient as one record (all of a patient's scans "
        "together) unless said below. Epsilon measures the most that any one patient's presence "
        "in the training data can change what the shared model reveals: the smaller, the "
        "stronger the protection. "
        f"With a cap of epsilon = {eps:g} and delta = {delta:g}, anything an outsider could learn "
        "from the model is at most about "
        f"{_factor(eps)} times more (or less) likely whether or not a given patient's scans were "
        f"used, except with a probability of at most {delta:g}. This holds over everything the "
        "hospital has trained so far, in all runs recorded here, whatever the outsider knows. "
        "It holds against everyone who sees what a hospital sends: the coordinator, the other "
        "hospitals and whoever later gets the model, because each hospital adds its noise "
        "itself, from randomness no one else knows, and charges every update it releases; it "
        "does not cover the evaluation scores computed on a hospital's test patients, a patient "
        "treated at several hospitals (each hospital's budget counts on its own), or a "
        "hospital that trained without DP. "
        "Epsilon only grows: every training round spends a little more, and a hospital refuses "
        "to train once the next round would take it past its cap. 'Rounds left' is how many more "
        "rounds like the last one fit under the cap. The images themselves never leave the "
        "hospital; only its model update (masked inside the secure sum), the epsilon it spent "
        "and its ledger's standing do, unless its own policy releases more."
        + unit_sentences(report)
    )


def unit_sentences(report: PrivacyReport) -> str:
    """Say which sites protect less than "each patient as one record", and why.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        ``""`` when every site's privacy unit is the patient; otherwise one sentence per case,
        each starting with a space: sites whose unit is the scan ("per scan, not per
        patient"), sites that trained without DP by their own choice, sites whose reply did
        not state their unit.
    """
    by_unit = {
        unit: [s.site for s in report.sites if s.privacy_unit == unit and not s.dp_off]
        for unit in ("scan", "unstated")
    }
    out = ""
    if by_unit["scan"]:
        out += (
            f" At {', '.join(by_unit['scan'])}, each scan counted as one record (the site "
            "declared privacy_unit: scan): the guarantee there is per scan, not per patient, "
            "and a patient's k scans together are covered only at up to about k times that epsilon."
        )
    if off := [s.site for s in report.sites if s.dp_off]:
        out += (
            f" {', '.join(off)} trained at least one round without differential privacy: DP "
            "off by the site's own choice (site.yaml policy.require_dp: false); nothing in this "
            "report "
            "protects the patients of those rounds."
        )
    if seeded := [s.site for s in report.sites if s.noise_seeded]:
        out += (
            f" {', '.join(seeded)} drew its DP noise from a fixed seed of its own "
            "(site.yaml dp_noise_seed, a testing setting): whoever knows that seed can "
            "reproduce the noise, so the guarantee holds only against those who do not."
        )
    if report.withheld:
        out += (
            f" {', '.join(report.withheld)} kept its DP history at the site (its policy "
            "releases only the epsilon spent): the epsilon shown is as the site reported it, "
            "and the site's own ledger report (fedhealth privacy report <ledger>) recomputes it "
            "with Google's dp-accounting."
        )
    if by_unit["unstated"] and report.kind == "run":
        out += (
            f" {', '.join(by_unit['unstated'])} did not state its privacy unit; assume it "
            "counted each scan as one record unless its site.yaml says otherwise."
        )
    return out


def check_sentence(report: PrivacyReport) -> str:
    """Say what the independent accountant confirmed.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        Every recomputed epsilon agrees within 1% (naming the sites that kept their history),
        or a warning.
    """
    if not report.all_agree:
        return "WARNING: at least one epsilon could not be confirmed by the independent accountant."
    out = (
        "Every epsilon recomputed here agrees within 1% with Google's dp-accounting, an "
        "accountant independent of the one used in training."
    )
    if report.withheld:
        out += f" Not recomputed here (history kept at the site): {', '.join(report.withheld)}."
    return out


def _factor(eps: float) -> str:
    import math

    value = math.exp(eps)
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def to_json(report: PrivacyReport) -> str:
    """Render the report as JSON.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        Every field of the report, plus ``all_agree``, ``withheld`` and ``explanation``,
        indented by 2.
    """
    return json.dumps(
        {
            **asdict(report),
            "all_agree": report.all_agree,
            "withheld": report.withheld,
            "explanation": explanation(report),
        },
        indent=2,
    )


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


ROW_HEAD = [  # columns of the per-phase table
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
# columns of the per-site summary table
SUM_HEAD = ["site", "epsilon spent", "cap", "delta", "accountant", "rounds left", "status"]


def _sum_cells(s: SiteSummary) -> list[str]:
    trained = any(r.status == "trained" for r in s.rows)  # else no cap or delta was reported
    return [
        s.site,
        _fmt(s.epsilon_spent),
        _fmt(s.epsilon_cap) if trained or s.epsilon_cap else "n/a",
        _fmt(s.delta) if trained or s.delta else "n/a",
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
        f"{r.status} ({r.reason})" if r.reason else r.status,
        _fmt(r.noise_multiplier),
        _fmt(r.sample_rate),
        _fmt(r.steps),
        _fmt(r.max_grad_norm),
        _fmt(r.epsilon),
        _fmt(r.independent_epsilon),
        _fmt(r.agrees),
    ]


def to_markdown(report: PrivacyReport) -> str:
    """Render the report as Markdown: summary table, explanation, a row per phase.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        The document, ending with a newline.
    """

    def table(head: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    check = check_sentence(report)
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
                f"Independent check (Google dp-accounting): {check}",
            ]
        )
        + "\n"
    )


def to_html(report: PrivacyReport) -> str:
    """Render the report as one self-contained HTML page, the plot embedded as a PNG.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        The page; the source, the explanation and every table cell are HTML-escaped.
    """

    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    png = base64.b64encode(plot_png(report)).decode()
    check = check_sentence(report)
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
    """Write the report as HTML, JSON and Markdown, each file atomically.

    Parameters
    ----------
    report : PrivacyReport
        The report.
    out_dir : Path or str
        Directory for ``privacy-report.html``, ``.json`` and ``.md`` (created if missing;
        existing reports are replaced).

    Returns
    -------
    dict of str to Path
        ``"html"``, ``"json"`` and ``"md"`` -> the file written.
    """
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
