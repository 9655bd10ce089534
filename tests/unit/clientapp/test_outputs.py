"""Minimal outputs: what a train reply carries by default, and what a site's policy adds.

Also the privacy report's edge cases that minimal outputs and policy refusals bring: a site that
kept its DP history, a refusal with its reason, a run in which no site trained with DP.
"""

from __future__ import annotations

import json

import pytest

from fedhealth.clientapp import handlers
from fedhealth.clientapp.outputs import ALWAYS, released
from fedhealth.privacy.accounting import epsilon
from fedhealth.privacy.policy import SitePolicy
from fedhealth.protocol import keys as K
from fedhealth.reports import privacy as report
from tests.unit.clientapp.test_site_policy import _instruction

MEASURED = {
    K.LOSS: 0.7,
    K.STEPS: 4.0,
    K.TRAIN_SECONDS: 1.5,
    K.NUM_EXAMPLES: 6,
    K.EPSILON: 2.0,
    K.EPSILON_CAP: 8.0,
    K.DELTA: 1e-5,
    K.NOISE_MULTIPLIER: 1.1,
    K.SAMPLE_RATE: 0.5,
    K.DP_STEPS: 4,
    K.MAX_GRAD_NORM: 0.5,
    K.LEDGER_ENTRIES: 3,
    K.LEDGER_HEAD: 11,
    K.LEDGER_HEAD_PREV: 10,
}
ABOUT = {
    K.ACCOUNTANT: "rdp",
    K.HISTORY_NOISE: [1.1],
    K.HISTORY_RATE: [0.5],
    K.HISTORY_STEPS: [4],
    K.PRIVACY_UNIT: "patient",
}
POLICY_REASON = "policy: max_noise_multiplier"
HIDDEN = {K.LOSS, K.STEPS, K.TRAIN_SECONDS, K.NOISE_MULTIPLIER, K.SAMPLE_RATE, K.DP_STEPS}


def test_a_secure_reply_carries_only_the_spend_and_the_ledger_standing():
    metrics, about = released(MEASURED, ABOUT, SitePolicy(), secure=True)
    assert set(metrics) == set(ALWAYS)  # no loss, time, count, sample rate or noise
    assert about == {K.ACCOUNTANT: "rdp", K.PRIVACY_UNIT: "patient"}  # no history


def test_a_plain_reply_adds_only_the_count_fedavg_weights_by():
    metrics, _ = released(MEASURED, ABOUT, SitePolicy(), secure=False)
    assert set(metrics) == {*ALWAYS, K.NUM_EXAMPLES}


@pytest.mark.parametrize(
    ("item", "adds"),
    [
        ("loss", {K.LOSS}),
        ("train-seconds", {K.TRAIN_SECONDS}),
        ("num-examples", {K.NUM_EXAMPLES}),
        ("sample-rate", {K.SAMPLE_RATE, K.DP_STEPS, K.STEPS}),
        ("noise-multiplier", {K.NOISE_MULTIPLIER}),
    ],
)
def test_the_policy_release_list_adds_exactly_its_metrics(item, adds):
    metrics, about = released(MEASURED, ABOUT, SitePolicy(release=[item]), secure=True)
    assert set(metrics) == {*ALWAYS, *adds}
    assert K.HISTORY_NOISE not in about


def test_history_is_released_only_when_the_policy_says_so():
    _, about = released(MEASURED, ABOUT, SitePolicy(release=["history"]), secure=True)
    assert about[K.HISTORY_NOISE] == [1.1] and about[K.HISTORY_STEPS] == [4]


def test_a_real_train_reply_is_minimal(cohort, tmp_path, flower_identity):
    """The site's real handler, a plain DP train reply: nothing beyond the minimum leaves."""
    msg, context = _instruction(cohort / "site-0", tmp_path / "ledger")
    reply = handlers.handle(msg, context, "train")
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content[K.METRICS].items())
    assert set(metrics) == {*ALWAYS, K.NUM_EXAMPLES}, sorted(metrics)
    assert not HIDDEN & set(metrics)
    site = dict(reply.content[K.SITE].items())
    assert not {K.HISTORY_NOISE, K.HISTORY_RATE, K.HISTORY_STEPS} & set(site)


def _write(tmp_path, lines):
    (tmp_path / "privacy.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return report.load(tmp_path)


def test_a_site_that_kept_its_history_is_named_not_failed(tmp_path):
    kept = {"epsilon": 2.0, "epsilon_cap": 8.0, "delta": 1e-5, "accountant": "rdp"}
    full = {
        "epsilon": epsilon([(1.1, 0.25, 8)], 1e-5),
        "epsilon_cap": 8.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "noise_multiplier": 1.1,
        "sample_rate": 0.25,
        "dp_steps": 8,
        "history": [[1.1, 0.25, 8]],
    }
    rep = _write(
        tmp_path,
        [
            {"round": 1, "site": "a", "status": "trained", **kept},
            {"round": 1, "site": "b", "status": "trained", **full},
        ],
    )
    assert rep.withheld == ["a"] and rep.all_agree and rep.confirmed
    text = report.explanation(rep)
    assert "a kept its DP history at the site" in text
    assert "the coordinator, the other hospitals and whoever later gets the model" in text
    assert "does not cover the evaluation scores" in text
    wrong = {**full, "epsilon": 3.0 * full["epsilon"]}  # a reported epsilon that disagrees
    rep = _write(tmp_path, [{"round": 1, "site": "b", "status": "trained", **wrong}])
    assert not rep.confirmed


def test_a_simulated_site_that_releases_only_its_history_is_recomputed(tmp_path):
    """The simulation's sites release their history but not the round's noise or rate."""
    history = [[1.3, 0.25, 8], [1.1, 0.25, 8]]
    line = {"epsilon": epsilon([tuple(h) for h in history], 1e-5), "epsilon_cap": 8.0}
    line |= {"delta": 1e-5, "accountant": "rdp", "history": history}
    rep = _write(tmp_path, [{"round": 2, "site": "a", "status": "trained", **line}])
    (row,) = rep.sites[0].rows
    assert (row.noise_multiplier, row.sample_rate, row.steps) == (1.1, 0.25, 8)  # its last phase
    assert rep.all_agree and not rep.withheld and rep.sites[0].rounds_left is not None


def test_refusals_show_their_reason_and_a_run_nobody_trained_quotes_no_cap(tmp_path):
    rep = _write(
        tmp_path,
        [
            {
                "round": 1,
                "site": "a",
                "status": "refused",
                "reason": "policy: max_noise_multiplier",
            },
            {"round": 1, "site": "b", "status": "refused", "reason": "budget"},
        ],
    )
    by_site = {s.site: s for s in rep.sites}
    assert by_site["a"].status == "refused by its own policy (policy: max_noise_multiplier)"
    assert by_site["b"].status == "budget exhausted: site refused to train"
    text = report.explanation(rep)
    assert "No hospital trained the shared model with differential privacy" in text
    assert "cap of epsilon" not in text and not rep.confirmed
    page = report.to_markdown(rep)
    assert "refused (policy: max_noise_multiplier)" in page
    assert "| a | n/a | n/a | n/a |" in page  # no spend or cap quoted for a site that never trained
    assert "did not state its privacy unit" not in text
    assert "nothing to recompute" in page
