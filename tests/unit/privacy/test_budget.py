import pytest

from fedhealth.errors import BudgetExhausted
from fedhealth.privacy.accounting import epsilon
from fedhealth.privacy.budget import RoundRequest, SiteBudget, charge_round
from fedhealth.privacy.ledger import PrivacyLedger


def _request(run="run-1", rnd=1, total=3, fixed=0.0, accountant="rdp"):
    return RoundRequest(
        run=run,
        server_round=rnd,
        rounds_total=total,
        sample_rate=0.25,
        steps=8,
        max_grad_norm=1.0,
        accountant=accountant,
        fixed_noise=fixed,
    )


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.sqlite", "site-a") as opened:
        yield opened


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_fits_all_planned_rounds_inside_the_cap(ledger, tmp_path, accountant):
    budget = SiteBudget(8.0, 1e-5, tmp_path / "ledger.sqlite")
    entries = [
        charge_round(ledger, budget, _request(rnd=r, accountant=accountant), "fp", "site-a")
        for r in (1, 2, 3)
    ]
    assert len({e.noise_multiplier for e in entries}) == 1, "one plan per run"
    assert entries[-1].epsilon_after <= 8.0
    assert entries[-1].epsilon_after > 7.5, "the plan uses the budget, not a fraction of it"


def test_hard_stop_refuses_and_records_nothing(ledger, tmp_path):
    budget = SiteBudget(8.0, 1e-5, tmp_path / "ledger.sqlite")
    for r in (1, 2, 3):
        charge_round(ledger, budget, _request(rnd=r), "fp", "site-a")
    before = len(ledger.entries)
    with pytest.raises(BudgetExhausted, match="site-a.*round 4.*over the cap"):
        charge_round(ledger, budget, _request(rnd=4), "fp", "site-a")
    assert len(ledger.entries) == before


def test_a_second_run_plans_with_what_is_left(ledger, tmp_path):
    budget = SiteBudget(8.0, 1e-5, tmp_path / "ledger.sqlite")
    with PrivacyLedger(tmp_path / "fresh.sqlite") as fresh:
        unspent = charge_round(fresh, budget, _request(run="b", total=2), "fp", "site-a")
    first = charge_round(ledger, budget, _request(run="a", total=1, fixed=1.5), "fp", "site-a")
    second = charge_round(ledger, budget, _request(run="b", total=2), "fp", "site-a")
    assert second.noise_multiplier > unspent.noise_multiplier
    assert second.epsilon_after > first.epsilon_after
    assert second.epsilon_after == pytest.approx(
        epsilon([(1.5, 0.25, 8), (second.noise_multiplier, 0.25, 8)], 1e-5)
    )


def test_exhausted_budget_refuses_a_new_run(ledger, tmp_path):
    budget = SiteBudget(1.0, 1e-5, tmp_path / "ledger.sqlite")
    charge_round(ledger, budget, _request(run="a", total=1, fixed=20.0), "fp", "site-a")
    ledger.record("manual", 0, (0.6, 0.25, 50), 1.0, "rdp", 1e-5, 1.0, "fp")
    with pytest.raises(BudgetExhausted, match="cannot fit"):
        charge_round(ledger, budget, _request(run="c"), "fp", "site-a")


def test_a_replayed_round_is_charged_once_and_a_changed_model_again(ledger, tmp_path):
    budget = SiteBudget(8.0, 1e-5, tmp_path / "ledger.sqlite")
    first = charge_round(ledger, budget, _request(rnd=1), "fp", "site-a", "model-A")
    again = charge_round(ledger, budget, _request(rnd=1), "fp", "site-a", "model-A")
    assert again == first and len(ledger.entries) == 1
    with PrivacyLedger(tmp_path / "ledger.sqlite", "site-a") as reopened:  # durable
        assert reopened.release("run-1", 1, "model-A") == first
        assert reopened.release("run-1", 1, "model-B") is None
    other = charge_round(ledger, budget, _request(rnd=1), "fp", "site-a", "model-B")
    assert len(ledger.entries) == 2 and other.epsilon_after > first.epsilon_after
    charge_round(ledger, budget, _request(run="run-2", rnd=1), "fp", "site-a", "model-A")
    assert len(ledger.entries) == 3, "another run's round 1 is a new release"
