"""The training report of a run: how the global model learned, site by site, round by round.

``fedhealth report training <run dir>`` (and the end of ``fedhealth simulate``) writes
``training-report.html`` (self-contained, plots embedded as PNG) and ``training-report.json``
into the run directory, from what the run directory holds: ``metrics.jsonl`` (Dice per site per
round, loss curves, sites rejected, failed or refused and why), ``manifest.json`` and
``privacy.jsonl`` (refusals with their reasons); optionally the JSON ``fedhealth baseline``
prints (local-only and centralized Dice per site), to set the final Dice beside them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from fedhealth.runs.rundir import read_jsonl, read_metrics

__all__ = ["plot_dice_png", "plot_loss_png", "training_report", "write_training_report"]


def training_report(run_dir: Path | str, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect a run's training figures.

    Parameters
    ----------
    run_dir : Path or str
        The run directory.
    baselines : dict or None, default None
        ``fedhealth baseline``'s printed JSON (model -> site -> Dice, ``pooled``), merged from
        ``centralized`` and ``local`` runs; None: none.

    Returns
    -------
    dict
        ``run``, ``rounds`` (per round: ``round``, weighted ``dice``/``loss``, ``train_loss``,
        ``sites`` -> Dice (and ``dice-<k>``), ``rejected``/``failed``/``refused`` with reasons),
        ``final`` (site -> Dice of the last evaluated round), ``cases`` (site -> test cases
        scored; ``training`` the summed training examples when the secure sum released it),
        ``baselines``, ``privacy_report`` (file name, when written), ``refused`` (round ->
        site -> reason, rounds that never completed included).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` holds no ``manifest.json``.
    """
    path = Path(run_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    refused: dict[int, dict[str, str]] = {}
    for row in read_jsonl(path / "privacy.jsonl"):
        if row.get("status") == "refused":
            refused.setdefault(int(row["round"]), {})[str(row["site"])] = str(row.get("reason", ""))
    rounds, final, cases, training = [], {}, {}, None
    for line in read_metrics(path):
        if not line.get("round"):
            continue
        evaluated, trained = line.get("evaluate") or {}, line.get("train") or {}
        sites = {
            s: {k: v for k, v in m.items() if k.startswith("dice")}
            for s, m in (evaluated.get("sites") or {}).items()
        }
        rounds.append(
            {
                "round": line["round"],
                "dice": (evaluated.get("weighted") or {}).get("dice"),
                "loss": (evaluated.get("weighted") or {}).get("loss"),
                "train_loss": (trained.get("weighted") or {}).get("loss"),
                "sites": sites,
                "rejected": {**trained.get("rejected", {}), **evaluated.get("rejected", {})},
                "failed": {
                    "train": trained.get("failed", 0),
                    "evaluate": evaluated.get("failed", 0),
                },
                "refused": refused.get(int(line["round"]), {}),
            }
        )
        if sites:
            final = {s: m["dice"] for s, m in sites.items() if "dice" in m}
            cases = {s: m.get("num-examples") for s, m in (evaluated.get("sites") or {}).items()}
        training = (trained.get("secure_sum") or {}).get("num-examples", training)
    return {
        "run": manifest.get("run", path.name),
        "rounds_completed": manifest.get("rounds_completed"),
        "stopped": manifest.get("stopped"),
        "rounds": rounds,
        "final": final,
        "cases": {"test": cases, "training": training},
        "baselines": baselines or {},
        "refused": {str(r): sites for r, sites in sorted(refused.items())},
        "privacy_report": "privacy-report.html"
        if (path / "privacy-report.html").is_file()
        else None,
    }


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, 4.2), dpi=110)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # rounds are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_dice_png(report: dict[str, Any]) -> bytes:
    """Plot each site's Dice and the weighted Dice per round.

    Parameters
    ----------
    report : dict
        :func:`training_report`'s result.

    Returns
    -------
    bytes
        A PNG image, 8 x 4.2 inches at 110 dpi.
    """
    fig, ax = _figure()
    names = sorted({s for r in report["rounds"] for s in r["sites"]})
    for i, site in enumerate(names):
        points = [
            (r["round"], r["sites"][site]["dice"]) for r in report["rounds"] if site in r["sites"]
        ]
        ax.plot(*zip(*points, strict=True), marker="o", color=f"C{i % 10}", label=site)
    weighted = [(r["round"], r["dice"]) for r in report["rounds"] if r["dice"] is not None]
    if weighted:
        ax.plot(*zip(*weighted, strict=True), color="black", linewidth=2.5, label="weighted")
    ax.set_xlabel("round")
    ax.set_ylabel("Dice on the site's test set")
    ax.set_ylim(0, 1)
    ax.set_title("Global model's Dice per site per round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty report draws no legend
        ax.legend(fontsize=8)
    return _png(fig)


def plot_loss_png(report: dict[str, Any]) -> bytes:
    """Plot the weighted training loss and evaluation loss per round.

    Parameters
    ----------
    report : dict
        :func:`training_report`'s result.

    Returns
    -------
    bytes
        A PNG image, 8 x 4.2 inches at 110 dpi.
    """
    fig, ax = _figure()
    for key, label in (
        ("train_loss", "training loss (weighted)"),
        ("loss", "test loss (weighted)"),
    ):
        points = [(r["round"], r[key]) for r in report["rounds"] if r[key] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("Dice + cross-entropy loss")
    ax.set_title("Loss per round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty report draws no legend
        ax.legend(fontsize=8)
    return _png(fig)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def to_html(report: dict[str, Any]) -> str:
    """Render the report as one self-contained HTML page (plots embedded, every cell escaped).

    Parameters
    ----------
    report : dict
        :func:`training_report`'s result.

    Returns
    -------
    str
        The page.
    """
    dice = base64.b64encode(plot_dice_png(report)).decode()
    loss = base64.b64encode(plot_loss_png(report)).decode()
    models = sorted(report["baselines"])
    final_rows = [
        [site, _cell(d), _cell(report["cases"]["test"].get(site))]
        + [_cell(report["baselines"][m].get(site)) for m in models]
        for site, d in sorted(report["final"].items())
    ]
    weighted = [r["dice"] for r in report["rounds"] if r["dice"] is not None]
    if final_rows and weighted:  # the last evaluated round's, weighted by test cases
        cases = [c for c in report["cases"]["test"].values() if isinstance(c, int)]
        final_rows.append(
            ["weighted", _cell(weighted[-1]), _cell(sum(cases) if cases else None)]
            + [_cell(report["baselines"][m].get("pooled")) for m in models]
        )
    events = (
        [
            [str(r["round"]), "rejected", site, reason]
            for r in report["rounds"]
            for site, reason in sorted(r["rejected"].items())
        ]
        + [  # from the privacy table: also rounds every site refused (no metrics line)
            [server_round, "refused", site, reason]
            for server_round, sites in report.get("refused", {}).items()
            for site, reason in sorted(sites.items())
        ]
        + [
            [
                str(r["round"]),
                f"failed ({phase})",
                f"{n} site(s)",
                "an error reply, or no reply in time: the run's log names each site",
            ]
            for r in report["rounds"]
            for phase, n in r["failed"].items()
            if n
        ]
    )
    events.sort(key=lambda row: int(row[0]))  # by round; within one, as listed above
    link = html.escape(report["privacy_report"] or "")
    privacy = (
        f'<p>Privacy: <a href="{link}">the privacy budget report</a>.</p>'
        if link
        else "<p>No privacy budget report in this run directory (DP off).</p>"
    )
    run = html.escape(report["run"])
    stopped = report["stopped"]
    ended = f"; stopped early: {html.escape(str(stopped['reason']))}" if stopped else ""
    events_html = (
        _table(["round", "what", "site", "why"], events)
        if events
        else "<p>None: every site took part in every round.</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Training report: {run}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child, th:first-child {{ text-align: left; }}
</style></head><body>
<h1>Training report: {run}</h1>
<p>{report["rounds_completed"]} round(s) completed{ended};
training examples per round (secure sum): {_cell(report["cases"]["training"])}.</p>
<h2>Dice per site per round</h2>
<img id="dice" alt="Dice per site per round" src="data:image/png;base64,{dice}">
<h2>Loss</h2>
<img id="loss" alt="loss per round" src="data:image/png;base64,{loss}">
<h2>Final Dice per site</h2>
{_table(["site", "federated", "test cases", *models], final_rows)}
<h2>Sites rejected, refused or failed</h2>
{events_html}
{privacy}
</body></html>
"""


def write_training_report(
    run_dir: Path | str, baselines: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``training-report.html`` and ``training-report.json`` into the run directory.

    Parameters
    ----------
    run_dir : Path or str
        The run directory.
    baselines : dict or None, default None
        As :func:`training_report`.

    Returns
    -------
    dict of str to Path
        ``"html"`` and ``"json"`` -> the file written (atomically).
    """
    from fedhealth.io import atomic_write_text

    path = Path(run_dir)
    report = training_report(path, baselines)
    out = {"html": path / "training-report.html", "json": path / "training-report.json"}
    atomic_write_text(out["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(out["html"], to_html(report))
    return out
