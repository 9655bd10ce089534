"""Contract test: the site's reply builder and the coordinator's checks use the same names.

A train reply is built by the site's own code (:func:`fedhealth.clientapp.handlers._reply`) from
a real instruction and a real ArrayRecord, and read back by the coordinator's own code (the
strategy's ``site_name``, :func:`~fedhealth.security.validation.validate_update` with the
strategy's ``TRAIN_METRICS``, the accounting check and the privacy row). Renaming any key on the
site's side only must make the coordinator refuse or misread the reply: that is what a literal
typed on one side would do, and what this test catches.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedhealth.clientapp import handlers, local_round
from fedhealth.config import compose, site_settings
from fedhealth.errors import BudgetExhausted, UpdateRejected
from fedhealth.protocol import keys as K
from fedhealth.protocol.replies import error_reply
from fedhealth.runs.rundir import RoundLog, RunDir
from fedhealth.security.validation import validate_accounting, validate_update
from fedhealth.serverapp.checks import privacy_row
from fedhealth.serverapp.replies import metrics_of, scalars, site_record, sort_replies
from fedhealth.serverapp.strategies import build_strategy
from fedhealth.serverapp.strategy import TRAIN_METRICS, site_name

SITE = "site-a"
NODE = 7
MAX_EXAMPLES = 100
SHAPES = {"conv.weight": (2, 1, 3, 3, 3), "conv.bias": (2,)}
HISTORY = {"noise": [1.1, 0.9], "rate": [0.25, 0.25], "steps": [8, 4]}


def _model(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    )


def _instruction(model: ArrayRecord) -> Message:
    content = RecordDict({K.ARRAYS: model, K.CONFIG: ConfigRecord({K.SERVER_ROUND: 1})})
    return Message(content, NODE, "train")


def _site_reply(keys: types.ModuleType | types.SimpleNamespace, ins: Message) -> Message:
    """A DP-trained site's train reply, every name taken from ``keys`` (the site's view)."""
    metrics = {
        keys.LOSS: 0.42,
        keys.NUM_EXAMPLES: 12,
        keys.STEPS: 12,
        keys.TRAIN_SECONDS: 1.5,
        keys.EPSILON: 2.5,
        keys.EPSILON_CAP: 8.0,
        keys.DELTA: 1e-5,
        keys.NOISE_MULTIPLIER: 0.9,
        keys.SAMPLE_RATE: 0.25,
        keys.DP_STEPS: 4,
        keys.MAX_GRAD_NORM: 0.5,
        keys.LEDGER_ENTRIES: 2,
        keys.LEDGER_HEAD: 0xABC,
        keys.LEDGER_HEAD_PREV: 0x123,
    }
    accounting = {
        keys.ACCOUNTANT: "rdp",
        keys.HISTORY_NOISE: HISTORY["noise"],
        keys.HISTORY_RATE: HISTORY["rate"],
        keys.HISTORY_STEPS: HISTORY["steps"],
        keys.PRIVACY_UNIT: "scan",
    }
    site = handlers.Site(name=SITE, data_dir=Path("/nonexistent"))
    return handlers._reply(ins, site, metrics, _model(1), accounting)


def _coordinator_reads(reference: ArrayRecord, reply: Message) -> tuple[str, dict, dict]:
    """What the coordinator takes from a train reply; raises UpdateRejected when it refuses."""
    name = site_name(reply)
    count = validate_update(reference, reply.content, MAX_EXAMPLES, name, TRAIN_METRICS)
    metrics = scalars(metrics_of(reply))
    about = site_record(reply)
    if K.EPSILON in metrics:
        validate_accounting(about, name)
    return name, {"count": count, "loss": metrics.get(K.LOSS)}, privacy_row(metrics, about)


EXPECTED_PRIVACY = {
    "epsilon": 2.5,
    "epsilon_cap": 8.0,
    "delta": 1e-5,
    "noise_multiplier": 0.9,
    "sample_rate": 0.25,
    "dp_steps": 4,
    "max_grad_norm": 0.5,
    "ledger_entries": 2,
    "ledger_head": "000000000000abc",
    "ledger_head_prev": "000000000000123",
    "accountant": "rdp",
    "privacy_unit": "scan",
    "history": [list(h) for h in zip(*HISTORY.values(), strict=True)],
}


@pytest.fixture
def reference(flower_identity) -> ArrayRecord:
    return _model(0)


def test_the_coordinator_reads_what_the_site_sends(reference):
    reply = _site_reply(K, _instruction(reference))
    name, figures, privacy = _coordinator_reads(reference, reply)
    assert name == SITE
    assert figures == {"count": 12, "loss": 0.42}
    assert privacy == EXPECTED_PRIVACY


def test_a_site_reply_passes_the_whole_strategy(tmp_path, reference, flower_identity):
    """The same reply through the guarded strategy: accepted, recorded under the site's name."""
    cfg = compose([f"run_root={tmp_path}", "sites=1", "strategy.min_sites=1", "rounds=1"])
    strategy = build_strategy(cfg, RunDir.create(cfg))

    class _Grid:
        def get_node_ids(self):
            return [NODE]

    (ins,) = strategy.configure_train(1, reference, ConfigRecord(), _Grid())
    arrays, _ = strategy.aggregate_train(1, [_site_reply(K, ins)])
    assert arrays is not None and set(arrays) == set(SHAPES)
    entry = strategy.run_dir.log(1)
    assert entry.rejected == {} and set(entry.train) == {SITE}
    assert entry.privacy[SITE] == EXPECTED_PRIVACY


# Every name the site's reply carries that the coordinator relies on. ``METRICS`` is not among
# them: the coordinator reads the reply's one MetricRecord whatever its name (a reply naming it
# otherwise is accepted on purpose, tests/unit/serverapp/test_malformed_replies.py).
SITE_SIDE_KEYS = [
    "ARRAYS",
    "SITE",
    "SITE_NAME",
    "NUM_EXAMPLES",
    "LOSS",
    "EPSILON",
    "EPSILON_CAP",
    "DELTA",
    "NOISE_MULTIPLIER",
    "SAMPLE_RATE",
    "DP_STEPS",
    "MAX_GRAD_NORM",
    "ACCOUNTANT",
    "HISTORY_NOISE",
    "HISTORY_RATE",
    "HISTORY_STEPS",
]


@pytest.mark.parametrize("key", SITE_SIDE_KEYS)
def test_a_key_renamed_on_the_site_side_only_is_caught(reference, monkeypatch, key):
    renamed = types.SimpleNamespace(**{**vars(K), key: f"{getattr(K, key)}-v2"})
    monkeypatch.setattr(handlers, "K", renamed)  # the site's modules see the new name only
    monkeypatch.setattr(local_round, "K", renamed)
    reply = _site_reply(renamed, _instruction(reference))
    try:
        read = _coordinator_reads(reference, reply)
    except UpdateRejected:
        return  # refused
    assert read != (SITE, {"count": 12, "loss": 0.42}, EXPECTED_PRIVACY)  # misread


def test_the_site_reply_builder_uses_the_protocol_module():
    """The monkeypatch above only bites if the site reads the names from the module at call
    time, as ``K.<NAME>``; a copy taken at import (``from keys import ARRAYS``) would not."""
    assert handlers.K is K and local_round.K is K


def test_an_error_reply_is_attributed_to_the_site_that_sent_it(flower_identity):
    """The site's error text starts ``site <name>: ``; the coordinator reads the name from it."""
    ins = Message(RecordDict(), NODE, "train")
    reply = error_reply(ins, BudgetExhausted("over the cap"), "train", SITE)
    entry = RoundLog()
    kept = sort_replies([reply], server_round=1, phase="train", entry=entry, node_names={})
    assert kept == [] and entry.refused == {SITE: "budget"}


def _constants(prefix: str = "") -> dict[str, str]:
    return {
        name: value
        for name, value in vars(K).items()
        if name.isupper() and name.startswith(prefix) and isinstance(value, str)
    }


RECORD_NAMES = ["ARRAYS", "METRICS", "CONFIG", "SITE", "SECAGG", "MASKED"]
INSTRUCTION_KEYS = ["SERVER_ROUND", "EVALUATE_ROUND", "RUN_KEY", "PROXIMAL_MU"]
METRIC_KEYS = ["NUM_EXAMPLES", "LOSS", "DICE", "STEPS", "TRAIN_SECONDS", "EVALUATION_WITHHELD"]
LEDGER_KEYS = ["LEDGER_ENTRIES", "LEDGER_HEAD", "LEDGER_HEAD_PREV"]
PRIVACY_KEYS = [
    "EPSILON",
    "EPSILON_CAP",
    "DELTA",
    "NOISE_MULTIPLIER",
    "SAMPLE_RATE",
    "DP_STEPS",
    "MAX_GRAD_NORM",
]
SITE_RECORD_KEYS = [
    "SITE_NAME",
    "ACCOUNTANT",
    "HISTORY_NOISE",
    "HISTORY_RATE",
    "HISTORY_STEPS",
    "PRIVACY_UNIT",
    "DP_OFF_BY_SITE",
    "DP_NOISE_SEEDED",
]
SECAGG_MARKERS = ["SECAGG_SUM", "SECAGG_SITES", "SECAGG_METRICS_ONLY"]
SECAGG_FIELDS = [
    "SECAGG_SITE_ID",
    "SECAGG_NEIGHBOURS",
    "SECAGG_THRESHOLD",
    "SECAGG_CLIP",
    "SECAGG_LEVELS",
    "SECAGG_MAX_EXAMPLES",
    "SECAGG_SIZE",
    "SECAGG_PUBLIC_C",
    "SECAGG_PUBLIC_S",
    "SECAGG_IDS",
    "SECAGG_TO",
    "SECAGG_FROM",
    "SECAGG_BLOBS",
    "SECAGG_SURVIVORS",
    "SECAGG_DROPPED",
    "SECAGG_OWNERS",
    "SECAGG_SHARES",
]
NODE_KEYS = list(_constants("NODE_"))


@pytest.mark.parametrize(
    "group",
    [
        RECORD_NAMES,
        INSTRUCTION_KEYS,
        [*METRIC_KEYS, *PRIVACY_KEYS],
        [*SITE_RECORD_KEYS, *SECAGG_MARKERS],
        SECAGG_FIELDS,
        ["STAGE_ADVERTISE", "STAGE_SHARE", "STAGE_MASK", "STAGE_UNMASK"],
        NODE_KEYS,
    ],
    ids=["records", "instruction", "metrics", "site-record", "secagg", "stages", "node"],
)
def test_names_that_share_a_namespace_are_unique(group):
    values = [getattr(K, name) for name in group]
    assert len(group) > 1 and all(isinstance(v, str) and v for v in values)
    assert len(set(values)) == len(values), sorted(values)


def test_every_public_constant_is_in_a_checked_group_or_a_tuple_of_them():
    checked = {
        *RECORD_NAMES,
        *INSTRUCTION_KEYS,
        *METRIC_KEYS,
        *SITE_RECORD_KEYS,
        *SECAGG_MARKERS,
        *SECAGG_FIELDS,
        *NODE_KEYS,
        "STAGE_ADVERTISE",
        "STAGE_SHARE",
        "STAGE_MASK",
        "STAGE_UNMASK",
        *PRIVACY_KEYS,
        *LEDGER_KEYS,
    }
    prefixes = {"FOLDED_PREFIX", "SECAGG_MARKER_PREFIX"}
    values = {"SECURE_SUM_NAME", "RUN_CONFIG"}
    assert set(_constants()) == checked | prefixes | values
    assert set(K.STAGES) == {K.STAGE_ADVERTISE, K.STAGE_SHARE, K.STAGE_MASK, K.STAGE_UNMASK}
    assert K.PRIVACY_METRICS == tuple(getattr(K, n) for n in PRIVACY_KEYS)
    assert K.LEDGER_METRICS == tuple(getattr(K, n) for n in LEDGER_KEYS)


def test_prefixes_separate_what_they_must():
    """Folded evaluation metrics and secure-aggregation markers are told apart by prefix."""
    own_metrics = [getattr(K, n) for n in [*METRIC_KEYS, *PRIVACY_KEYS, *LEDGER_KEYS]]
    assert not any(m.startswith(K.FOLDED_PREFIX) for m in own_metrics)
    markers = [getattr(K, n) for n in SECAGG_MARKERS]
    assert all(m.startswith(K.SECAGG_MARKER_PREFIX) for m in markers)
    site_keys = [getattr(K, n) for n in SITE_RECORD_KEYS]  # a site's own: never stripped
    assert not any(k.startswith(K.SECAGG_MARKER_PREFIX) for k in site_keys)
    assert K.SECURE_SUM_NAME != SITE and not K.SECURE_SUM_NAME.startswith("node-")


def test_instruction_keys_do_not_collide_with_the_run_config_sent_with_them():
    settings = site_settings(compose([]))
    assert not set(settings) & {getattr(K, n) for n in INSTRUCTION_KEYS}


def test_a_site_that_withholds_evaluation_is_not_counted_as_failed(flower_identity):
    """Its policy's choice, folded or in an evaluate phase: no failure, no warning of one."""
    from fedhealth.errors import PolicyRefused
    from fedhealth.serverapp.checks import check_folded_evaluation

    entry = RoundLog()
    check_folded_evaluation(
        entry, SITE, {K.EVALUATION_WITHHELD: 1}, max_examples=10, server_round=1
    )
    check_folded_evaluation(entry, "other", {}, max_examples=10, server_round=1)  # sent none
    assert entry.failed["evaluate"] == 1 and SITE not in entry.evaluate
    ins = Message(RecordDict(), NODE, "evaluate")
    withheld = error_reply(ins, PolicyRefused("no", field="release"), "evaluate", SITE)
    broken = error_reply(ins, UpdateRejected("bad"), "evaluate", SITE)
    evaluated = RoundLog()
    kept = sort_replies(
        [withheld, broken], server_round=1, phase="evaluate", entry=evaluated, node_names={}
    )
    assert kept == [] and evaluated.failed["evaluate"] == 1 and not evaluated.refused
