"""DP end to end on the simulation engine: ledgers that outlive runs, the hard stop, the report."""

from __future__ import annotations

import pytest

from fedhealth.cli import main
from fedhealth.config import compose
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.runs.rundir import read_jsonl, read_metrics
from fedhealth.simulation import simulate

pytestmark = pytest.mark.slow

DP = [
    "sites=3",
    "data.train_per_site=6",
    "data.test_per_site=3",
    "train.local_epochs=1",
    "privacy=dp",
    "privacy.epsilon=8.0",
    "strategy.min_sites=2",
]


def _overrides(cohort, tmp_path, name, *extra):
    return [
        *DP,
        f"data.root={cohort}",
        f"run_root={tmp_path / 'runs'}",
        f"run_name={name}",
        f"privacy.ledger_root={tmp_path / 'ledgers'}",
        *extra,
    ]


def _exhaust(tmp_path, site):
    with PrivacyLedger(tmp_path / "ledgers" / site / "ledger.sqlite", site) as ledger:
        ledger.record("earlier-run", 1, (0.5, 0.5, 200), 1.0, "rdp", 1e-5, 8.0, "earlier")
        assert ledger.entries[-1].epsilon_after > 8.0


def _ledger_rounds(tmp_path, site):
    with PrivacyLedger(tmp_path / "ledgers" / site / "ledger.sqlite") as ledger:
        return [(e.run, e.round) for e in ledger.entries]


def test_a_site_past_its_budget_refuses_and_the_run_goes_on(cohort, tmp_path):
    _exhaust(tmp_path, "site-1")
    run = simulate(compose(_overrides(cohort, tmp_path, "hard-stop", "rounds=2")))
    assert run.manifest["rounds_completed"] == 2 and "stopped" not in run.manifest
    for line in read_metrics(run.path)[1:]:
        assert set(line["train"]["sites"]) == {"site-0", "site-2"}
    table = read_jsonl(run.path / "privacy.jsonl")
    assert {(r["round"], r["site"], r["status"]) for r in table} == {
        (1, "site-0", "trained"),
        (1, "site-2", "trained"),
        (1, "site-1", "refused"),
        (2, "site-0", "trained"),
        (2, "site-2", "trained"),
        (2, "site-1", "refused"),
    }
    assert all(r["epsilon"] <= 8.0 for r in table if r["status"] == "trained")
    assert _ledger_rounds(tmp_path, "site-1") == [("earlier-run", 1)], "refusal trains nothing"
    assert len(_ledger_rounds(tmp_path, "site-0")) == 2


def test_the_run_stops_cleanly_when_too_few_sites_remain(cohort, tmp_path):
    _exhaust(tmp_path, "site-1")
    _exhaust(tmp_path, "site-2")
    run = simulate(compose(_overrides(cohort, tmp_path, "too-few", "rounds=2")))
    assert run.manifest["stopped"]["round"] == 1
    assert "fewer than the 2 required" in run.manifest["stopped"]["reason"]
    assert CheckpointStore(run.path / "checkpoints").rounds() == [0], "global model unchanged"
    refused = [
        r["site"] for r in read_jsonl(run.path / "privacy.jsonl") if r["status"] == "refused"
    ]
    assert sorted(refused) == ["site-1", "site-2"]


def test_a_second_run_continues_from_what_the_first_spent(cohort, tmp_path, capsys):
    first = simulate(
        compose(_overrides(cohort, tmp_path, "first", "rounds=1", "privacy.noise_multiplier=3.0"))
    )
    spent = {r["site"]: r["epsilon"] for r in read_jsonl(first.path / "privacy.jsonl")}
    assert main(["simulate", *_overrides(cohort, tmp_path, "second", "rounds=2")]) == 0
    second = read_jsonl(tmp_path / "runs" / "second" / "privacy.jsonl")
    for site, eps in spent.items():
        rows = [r for r in second if r["site"] == site]
        assert rows[0]["epsilon"] > eps, "the second run starts from the first run's spend"
        assert rows[-1]["epsilon"] <= 8.0
        assert len(rows[0]["history"]) == 2  # first run's phase + this one
        runs = {run for run, _ in _ledger_rounds(tmp_path, site)}
        assert len(runs) == 2
    out = capsys.readouterr().out
    html = tmp_path / "runs" / "second" / "privacy-report.html"
    assert f"privacy budget report: {html.resolve()}" in out
    page = html.read_text()
    assert all(f"site-{i}" in page for i in range(3)) and "data:image/png;base64," in page
