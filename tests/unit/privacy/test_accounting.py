"""Every epsilon we compute must match Google's dp-accounting within 1%."""

import pytest

from fedhealth.privacy.accounting import epsilon, plan_noise
from fedhealth.privacy.independent import independent_epsilon

HISTORIES = [
    [(1.1, 0.25, 8)],
    [(1.1, 0.25, 8), (1.1, 0.25, 8), (1.1, 0.25, 8)],
    [(0.8, 0.125, 40), (2.0, 0.05, 200)],
    [(1.5, 0.01, 2000)],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_dp_accounting_within_one_percent(history, accountant):
    ours = epsilon(history, 1e-5, accountant)
    theirs = independent_epsilon(history, 1e-5, accountant)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_plan_is_the_smallest_noise_that_fits():
    sigma = plan_noise([], 0.25, 80, cap=8.0, delta=1e-5)
    assert epsilon([(sigma, 0.25, 80)], 1e-5) <= 8.0
    assert epsilon([(sigma * 0.97, 0.25, 80)], 1e-5) > 8.0


def test_plan_accounts_for_what_was_already_spent():
    fresh = plan_noise([], 0.25, 40, cap=8.0, delta=1e-5)
    spent = [(2.0, 0.25, 40)]
    assert 0 < epsilon(spent, 1e-5) < 8.0
    after = plan_noise(spent, 0.25, 40, cap=8.0, delta=1e-5)
    assert after > fresh
    assert epsilon([*spent, (after, 0.25, 40)], 1e-5) <= 8.0


def test_spent_budget_cannot_be_planned():
    spent = [(0.5, 0.5, 200)]
    assert epsilon(spent, 1e-5) > 8.0
    assert plan_noise(spent, 0.25, 8, cap=8.0, delta=1e-5) is None
