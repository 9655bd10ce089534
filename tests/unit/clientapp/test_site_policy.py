"""The site's own privacy policy, from its node config: DP required, and the privacy unit.

A train instruction is refused at the site, before anything is trained or charged, when it asks
for no DP at a site that requires DP, or for DP at a site whose datalist names no patients while
its privacy unit is the patient. A site that opts out says so in its reply.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedhealth.clientapp import handlers, local_round
from fedhealth.config import compose, site_settings
from fedhealth.errors import DPRequired, ErrorCode, PrivacyUnitMissing
from fedhealth.models import build_model
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.privacy.policy import SitePolicy
from fedhealth.protocol import keys as K
from tests.conftest import PLAIN_TRAIN_POLICY

OPT_OUT = SitePolicy(require_dp=False, require_secure_aggregation=False).to_json()

TINY = ["model.channels=[2,4]", "model.strides=[2]", "rounds=2", "train.local_epochs=1"]


def _anonymous(cohort: Path, tmp_path: Path) -> Path:
    """site-0's datalist without patient ids (a standard Decathlon dataset.json), paths absolute."""
    src = cohort / "site-0" / "dataset.json"
    raw = json.loads(src.read_text())
    for key in ("training", "test"):
        for entry in raw[key]:
            del entry["patient"]
            for field in ("image", "label"):
                entry[field] = str((src.parent / entry[field]).resolve())
    out = tmp_path / "anonymous"
    out.mkdir()
    (out / "dataset.json").write_text(json.dumps(raw))
    return out


def _instruction(
    data_dir: Path, ledger: Path, *, dp: bool = True, **node: str | bool
) -> tuple[Message, Context]:
    cfg = compose([*TINY, *([] if dp else ["privacy=off"])])
    settings = {**site_settings(cfg), K.SERVER_ROUND: 1, K.RUN_KEY: "policy-test"}
    content = RecordDict(
        {
            K.ARRAYS: ArrayRecord(build_model(cfg.model).state_dict()),
            K.CONFIG: ConfigRecord(settings),
        }
    )
    config = {
        K.NODE_DATA_DIR: str(data_dir),
        K.NODE_SITE_NAME: "hospital-a",
        K.NODE_LEDGER_DIR: str(ledger),
        K.NODE_EPSILON_CAP: 8.0,
        K.NODE_DELTA: 1e-5,
        K.NODE_POLICY: PLAIN_TRAIN_POLICY,
        **node,
    }
    context = Context(run_id=1, node_id=0, node_config=config, state=RecordDict(), run_config={})
    return Message(content, 0, "train"), context


@pytest.fixture
def no_training(monkeypatch):
    """Make any training attempt fail the test: a refusal must come before it."""

    def train(*args, **kwargs):
        raise AssertionError("the site trained although it should have refused")

    monkeypatch.setattr(local_round, "train", train)


def _ledger_rows(ledger: Path) -> int:
    path = ledger / "ledger.sqlite"
    if not path.exists():
        return 0
    with PrivacyLedger(path) as opened:
        return len(opened.entries)


def test_dp_on_a_datalist_without_patient_ids_is_refused(
    cohort, tmp_path, flower_identity, no_training
):
    data_dir = _anonymous(cohort, tmp_path)
    msg, context = _instruction(data_dir, tmp_path / "ledger")
    with pytest.raises(PrivacyUnitMissing) as info:
        handlers.prepare(msg, context, "train", None, None)
    text = str(info.value)
    assert "hospital-a" in text and str(data_dir / "dataset.json") in text
    assert "6 of 6" in text and "privacy_unit: scan" in text
    reply = handlers.handle(msg, context, "train")
    assert reply.has_error() and reply.error.code == ErrorCode.SITE_REFUSED_POLICY
    assert "dataset.json" not in reply.error.reason  # details stay in the site's log
    assert _ledger_rows(tmp_path / "ledger") == 0


def test_privacy_unit_scan_trains_and_the_reply_says_scan(cohort, tmp_path, flower_identity):
    msg, context = _instruction(
        _anonymous(cohort, tmp_path), tmp_path / "ledger", **{K.NODE_PRIVACY_UNIT: "scan"}
    )
    reply = handlers.handle(msg, context, "train")
    assert not reply.has_error(), reply.error
    assert reply.content[K.SITE][K.PRIVACY_UNIT] == "scan"
    assert K.DP_OFF_BY_SITE not in reply.content[K.SITE]
    assert reply.content[K.METRICS][K.NUM_EXAMPLES] == 6  # six scans, six records
    assert _ledger_rows(tmp_path / "ledger") == 1


def test_patient_ids_train_per_patient_and_the_reply_says_patient(
    cohort, tmp_path, flower_identity
):
    msg, context = _instruction(cohort / "site-0", tmp_path / "ledger")
    reply = handlers.handle(msg, context, "train")
    assert not reply.has_error(), reply.error
    assert reply.content[K.SITE][K.PRIVACY_UNIT] == "patient"


def test_dp_off_at_a_site_that_requires_dp_is_refused_before_training(
    cohort, tmp_path, flower_identity, no_training
):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    with PrivacyLedger(ledger / "ledger.sqlite", "hospital-a"):
        pass
    before = (ledger / "ledger.sqlite").read_bytes()
    msg, context = _instruction(cohort / "site-0", ledger, dp=False)  # require-dp: default
    with pytest.raises(DPRequired, match=r"privacy\.enabled=false.*require_dp: true"):
        handlers.prepare(msg, context, "train", None, None)
    reply = handlers.handle(msg, context, "train")
    assert reply.has_error() and reply.error.code == ErrorCode.SITE_REFUSED_POLICY
    assert (ledger / "ledger.sqlite").read_bytes() == before
    assert _ledger_rows(ledger) == 0
    # the refused field is the one detail the coordinator gets
    assert reply.error.reason.endswith("[policy: require_dp]"), reply.error.reason


def test_a_site_that_opts_out_trains_without_dp_and_its_reply_says_so(
    cohort, tmp_path, flower_identity
):
    ledger = tmp_path / "ledger"
    msg, context = _instruction(cohort / "site-0", ledger, dp=False, **{K.NODE_POLICY: OPT_OUT})
    reply = handlers.handle(msg, context, "train")
    assert not reply.has_error(), reply.error
    assert reply.content[K.SITE][K.DP_OFF_BY_SITE] is True
    assert K.EPSILON not in reply.content[K.METRICS]
    assert _ledger_rows(ledger) == 0


def test_evaluation_is_not_refused_by_the_dp_policy(cohort, tmp_path, flower_identity):
    msg, context = _instruction(cohort / "site-0", tmp_path / "ledger", dp=False)
    prepared = handlers.prepare(msg, context, "evaluate", None, None)
    assert prepared.site.policy.require_dp


def test_a_site_that_withholds_evaluation_refuses_it_and_folds_none(
    cohort, tmp_path, flower_identity
):
    """Dice of any model the coordinator sends is an uncharged statistic of the test cases."""
    withheld = SitePolicy(require_secure_aggregation=False, release=[]).to_json()
    msg, context = _instruction(cohort / "site-0", tmp_path / "ledger", **{K.NODE_POLICY: withheld})
    reply = handlers.handle(Message(msg.content, 0, "evaluate"), context, "evaluate")
    assert reply.has_error() and reply.error.code == int(ErrorCode.SITE_REFUSED_POLICY)
    assert reply.error.reason.endswith("[policy: release]"), reply.error.reason
    msg.content[K.CONFIG][K.EVALUATE_ROUND] = 0  # evaluation folded into a train instruction
    trained = handlers.handle(msg, context, "train")
    assert not trained.has_error(), trained.error
    folded = [k for k in trained.content[K.METRICS] if k.startswith(K.FOLDED_PREFIX)]
    assert folded == [f"{K.FOLDED_PREFIX}{K.EVALUATION_WITHHELD}"]  # said, not evaluated
    released, context = _instruction(cohort / "site-0", tmp_path / "released")  # the default
    released.content[K.CONFIG][K.EVALUATE_ROUND] = 0
    evaluated = handlers.handle(released, context, "train").content[K.METRICS]
    assert f"{K.FOLDED_PREFIX}{K.DICE}" in evaluated


def test_a_bad_policy_value_in_the_node_config_is_refused(cohort, tmp_path, flower_identity):
    bad_policies = ('{"require_dp": "no"}', '{"min_secagg_sites": 1}', '{"colour": 1}', "{")
    for node in ({K.NODE_PRIVACY_UNIT: "visit"}, *({K.NODE_POLICY: p} for p in bad_policies)):
        msg, context = _instruction(cohort / "site-0", tmp_path / "ledger", **node)
        reply = handlers.handle(msg, context, "train")
        assert reply.error.code == ErrorCode.SITE_REFUSED_CONFIG


def test_simulated_sites_take_their_policy_from_the_privacy_config_block(cohort):
    from fedhealth.clientapp.instruction import Site

    context = Context(
        run_id=1, node_id=0, node_config={K.NODE_PARTITION_ID: 0}, state=RecordDict(), run_config={}
    )
    on, off = compose(TINY).privacy, compose([*TINY, "privacy=off"]).privacy
    assert Site.from_context(context, str(cohort), on).policy.require_dp is True
    assert Site.from_context(context, str(cohort), off).policy.require_dp is False
    assert Site.from_context(context, str(cohort), on).privacy_unit == "patient"


def test_the_coordinator_table_and_report_say_scan_and_dp_off(tmp_path):
    from fedhealth.privacy.accounting import epsilon
    from fedhealth.reports import privacy as report
    from fedhealth.runs.records import RoundLog
    from fedhealth.serverapp.checks import record_site

    metrics = {
        K.NUM_EXAMPLES: 6,
        K.LOSS: 0.5,
        K.EPSILON: epsilon([(1.1, 0.25, 8)], 1e-5),
        K.EPSILON_CAP: 8.0,
        K.DELTA: 1e-5,
        K.NOISE_MULTIPLIER: 1.1,
        K.SAMPLE_RATE: 0.25,
        K.DP_STEPS: 8,
        K.MAX_GRAD_NORM: 1.0,
    }
    scan = {
        K.SITE_NAME: "a",
        K.ACCOUNTANT: "rdp",
        K.HISTORY_NOISE: [1.1],
        K.HISTORY_RATE: [0.25],
        K.HISTORY_STEPS: [8],
        K.PRIVACY_UNIT: "scan",
    }
    entry = RoundLog()
    record_site(entry, "a", metrics, scan)
    record_site(entry, "b", {K.NUM_EXAMPLES: 6, K.LOSS: 0.5}, {K.DP_OFF_BY_SITE: True})
    record_site(entry, "c", {K.NUM_EXAMPLES: 6, K.LOSS: 0.5}, {})  # no claim: no privacy row
    assert entry.privacy["a"]["privacy_unit"] == "scan" and "c" not in entry.privacy
    lines = [  # as RunDir writes privacy.jsonl
        {"round": 1, "site": site, "status": "trained", **row}
        for site, row in entry.privacy.items()
    ]
    (tmp_path / "privacy.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    rep = report.load(tmp_path)
    text = report.explanation(rep)
    assert "At a, each scan counted as one record" in text and "per scan, not per patient" in text
    assert "b trained at least one round without differential privacy" in text
    assert "DP off by the site's own choice" in text
    by_site = {s.site: s for s in rep.sites}
    assert by_site["a"].privacy_unit == "scan" and by_site["b"].dp_off
    assert by_site["b"].status == "DP off by the site's own choice"
