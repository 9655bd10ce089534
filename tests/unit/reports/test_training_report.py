"""The training report: Dice per site per round, losses, refusals and why, plots drawn."""

from __future__ import annotations

import base64
import io
import json
import re

import matplotlib.image as mpimg
import numpy as np
import pytest

from fedhealth.cli import main
from fedhealth.reports.training import training_report, write_training_report


def _line(r: int, dice_a: float, dice_b: float | None) -> dict:
    sites = {"site-a": {"dice": dice_a, "dice-1": dice_a, "loss": 1 - dice_a, "num-examples": 4}}
    if dice_b is not None:
        sites["site-b"] = {"dice": dice_b, "dice-1": dice_b, "loss": 1 - dice_b, "num-examples": 2}
    return {
        "round": r,
        "train": {
            "sites": {},
            "weighted": {"loss": 1.0 / r},
            "rejected": {"site-c": "site site-c: non-finite update"} if r == 2 else {},
            "failed": 1 if r == 3 else 0,
            "secure_sum": {"num-examples": 30, "sites": 2, "loss": 1.0 / r},
        },
        "evaluate": {
            "sites": sites,
            "weighted": {"dice": dice_a if dice_b is None else (4 * dice_a + 2 * dice_b) / 6},
            "rejected": {},
            "failed": 0,
        },
    }


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-1"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"run": "run-1", "rounds_completed": 3}))
    lines = [{"round": 0}, _line(1, 0.1, 0.2), _line(2, 0.4, 0.3), _line(3, 0.7, None)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    refusal = {"round": 3, "site": "site-b", "status": "refused", "reason": "budget"}
    (run / "privacy.jsonl").write_text(json.dumps(refusal) + "\n")
    (run / "privacy-report.html").write_text("<html></html>")
    return run


def test_the_report_holds_every_round_every_site_and_why_a_site_was_out(run_dir):
    report = training_report(run_dir, {"centralized": {"site-a": 0.8, "pooled": 0.8}})
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["rounds"][1]["sites"]["site-b"] == {"dice": 0.3, "dice-1": 0.3}
    assert report["rounds"][1]["rejected"] == {"site-c": "site site-c: non-finite update"}
    assert report["rounds"][2]["refused"] == {"site-b": "budget"}
    assert report["rounds"][2]["failed"] == {"train": 1, "evaluate": 0}
    assert report["final"] == {"site-a": 0.7}
    assert report["cases"] == {"test": {"site-a": 4}, "training": 30}
    assert report["privacy_report"] == "privacy-report.html"


def test_the_html_embeds_drawn_plots_tables_and_the_privacy_link(run_dir):
    paths = write_training_report(run_dir, {"local:site-a": {"site-a": 0.65}})
    page = paths["html"].read_text()
    images = re.findall(r'<img id="(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in images] == ["dice", "loss"]
    for _, data in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        # drawn: coloured lines, not a blank canvas
        rgb = pixels[..., :3]
        assert (np.ptp(rgb, axis=2) > 0.3).mean() > 0.001
    assert '<a href="privacy-report.html">' in page
    assert "<td>site-b</td><td>budget</td>" in page and "non-finite update" in page
    assert "<th>local:site-a</th>" in page and "<td>0.6500</td>" in page
    assert "<tr><td>weighted</td><td>0.7000</td><td>4</td>" in page  # round 3: site-a alone
    assert json.loads(paths["json"].read_text())["final"] == {"site-a": 0.7}


def test_the_html_names_failures_and_refusals_of_rounds_that_never_completed(run_dir):
    page = write_training_report(run_dir)["html"].read_text()
    row = "<tr><td>3</td><td>failed (train)</td><td>1 site(s)</td><td>an error reply"
    assert row in page  # a count, said as one, with where to find the names
    refusals = [{"round": 1, "site": s, "status": "refused", "reason": "budget"} for s in "xy"]
    (run_dir / "privacy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refusals))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")  # none completed
    page = write_training_report(run_dir)["html"].read_text()
    assert "every site took part" not in page
    for site in "xy":
        assert f"<td>1</td><td>refused</td><td>{site}</td><td>budget</td>" in page


def test_report_training_command_merges_baseline_files(run_dir, tmp_path, capsys):
    base = tmp_path / "centralized.json"
    base.write_text(json.dumps({"centralized": {"site-a": 0.9, "pooled": 0.9}}))
    assert main(["report", "training", str(run_dir), "--baselines", str(base)]) == 0
    assert "training-report.html" in capsys.readouterr().out
    report = json.loads((run_dir / "training-report.json").read_text())
    assert report["baselines"] == {"centralized": {"site-a": 0.9, "pooled": 0.9}}
