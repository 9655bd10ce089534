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
from fedhealth.reports.privacy_text import check_sentence, explanation


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
        _fmt(s.epsilon_spent) if trained or s.epsilon_spent else "n/a",
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
        _fmt(r.epsilon) if r.status == "trained" or r.epsilon else "-",
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
