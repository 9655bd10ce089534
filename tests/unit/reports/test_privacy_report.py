import base64
import io
import json
import re

import matplotlib.image as mpimg
import pytest

from fedhealth.cli import main
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.reports import privacy as report

SITES = {"hospital-a": [(1.4, 0.25, 8)] * 3, "hospital-b": [(2.0, 0.1, 20), (0.9, 0.1, 20)]}


@pytest.fixture
def ledger_root(tmp_path):
    for site, phases in SITES.items():
        with PrivacyLedger(tmp_path / site / "ledger.sqlite", site) as ledger:
            for rnd, phase in enumerate(phases, start=1):
                ledger.record("run-1", rnd, phase, 1.0, "rdp", 1e-5, 8.0, "fp")
    return tmp_path


def test_report_from_ledgers_has_every_site_plot_and_independent_check(ledger_root):
    rep = report.load(ledger_root)
    assert [s.site for s in rep.sites] == sorted(SITES)
    assert rep.all_agree
    for site in rep.sites:
        assert len(site.rows) == len(SITES[site.site])
        for row in site.rows:
            assert row.independent_epsilon == pytest.approx(row.epsilon, rel=0.01)
        assert site.rounds_left is not None and site.rounds_left >= 0
    paths = report.write(rep, ledger_root / "out")
    page = paths["html"].read_text()
    for site in rep.sites:
        assert site.site in page and f"{site.epsilon_spent:.4g}" in page
    assert "What these numbers mean for patients" in page
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    image = mpimg.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01  # not blank
    data = json.loads(paths["json"].read_text())
    assert data["all_agree"] and {s["site"] for s in data["sites"]} == set(SITES)
    markdown = paths["md"].read_text()
    assert all(f"| {site} |" in markdown for site in SITES)


def test_rounds_left_is_how_many_more_rounds_fit(ledger_root):
    rep = report.load(ledger_root / "hospital-a" / "ledger.sqlite")
    site = rep.sites[0]
    history = SITES["hospital-a"]
    from fedhealth.privacy.accounting import epsilon

    k = site.rounds_left
    assert k >= 1
    assert epsilon(history + [history[-1]] * k, 1e-5) <= 8.0
    assert epsilon(history + [history[-1]] * (k + 1), 1e-5) > 8.0


def test_run_dir_report_marks_refusals(tmp_path):
    rows = [
        {
            "round": 1,
            "site": "a",
            "status": "trained",
            "epsilon": 0.0,
            "epsilon_cap": 8.0,
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "sample_rate": 0.25,
            "dp_steps": 8,
            "max_grad_norm": 1.0,
            "accountant": "rdp",
            "history": [[1.1, 0.25, 8]],
        },
        {"round": 2, "site": "a", "status": "refused"},
    ]
    from fedhealth.privacy.accounting import epsilon

    rows[0]["epsilon"] = epsilon([(1.1, 0.25, 8)], 1e-5)
    (tmp_path / "privacy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rep = report.load(tmp_path)
    assert [r.status for r in rep.sites[0].rows] == ["trained", "refused"]
    assert rep.sites[0].status.startswith("budget exhausted")
    assert rep.all_agree


def test_cli_report_and_a_forged_figure_fails_the_check(ledger_root, capsys):
    assert main(["report", "privacy", str(ledger_root)]) == 0
    out = capsys.readouterr().out
    assert "hospital-a" in out and "all agree within 1%" in out
    (ledger_root / "forged").mkdir()
    (ledger_root / "forged" / "privacy.jsonl").write_text(
        json.dumps(
            {
                "round": 1,
                "site": "x",
                "status": "trained",
                "epsilon": 0.5,
                "epsilon_cap": 8.0,
                "delta": 1e-5,
                "noise_multiplier": 1.1,
                "sample_rate": 0.25,
                "dp_steps": 8,
                "accountant": "rdp",
                "history": [[1.1, 0.25, 8]],
            }
        )
        + "\n"
    )
    assert main(["report", "privacy", str(ledger_root / "forged")]) == 1


def test_an_independent_figure_above_the_cap_is_explained_not_left_bare(ledger_root):
    from fedhealth.reports.privacy_text import check_sentence

    rep = report.load(ledger_root)
    assert "above the cap" not in check_sentence(rep)
    site = rep.sites[0]
    site.epsilon_cap = site.rows[-1].independent_epsilon * 0.999  # dp-accounting 0.1% above
    sentence = check_sentence(rep)
    assert "above the cap at 1 site(s)" in sentence and site.site in sentence
    assert "+0.10%" in sentence and "Opacus" in sentence


def test_a_run_every_site_refused_for_budget_points_to_the_ledgers(tmp_path):
    from fedhealth.reports.privacy_text import explanation

    rows = [{"round": 1, "site": s, "status": "refused", "reason": "budget"} for s in "ab"]
    (tmp_path / "privacy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = explanation(report.load(tmp_path))
    assert "No hospital trained" in text
    assert "Refused for a spent budget: a, b." in text and "ledger.sqlite" in text
