"""Reference tests: the guarded strategy's aggregate against numpy, and its guards."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedhealth.config import compose
from fedhealth.errors import RunStopped
from fedhealth.federation.rundir import RunDir
from fedhealth.federation.strategy import build_strategy

SHAPES = {"conv.weight": (4, 1, 3, 3, 3), "conv.bias": (4,), "head.weight": (2, 4)}


def _arrays(rng, scale=1.0):
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _reply(node, name, arrays, count):
    ins = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"loss": 0.5, "num-examples": count}),
        "site": ConfigRecord({"name": name}),
    })
    return Message(content=content, reply_to=ins)


@pytest.fixture
def strategy(tmp_path, flower_identity):
    cfg = compose([f"run_root={tmp_path}", "sites=4", "strategy.min_sites=2"])
    strat = build_strategy(cfg, RunDir.create(cfg))
    strat._reference = ArrayRecord({k: Array(v) for k, v in _arrays(np.random.default_rng(0)).items()})
    return strat


def _aggregate(strategy, replies):
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}


def test_fedavg_round_equals_numpy_weighted_average(strategy):
    rng = np.random.default_rng(1)
    updates = [_arrays(rng) for _ in range(3)]
    counts = [5, 17, 40]
    got = _aggregate(strategy, [_reply(i + 1, f"site-{i}", u, c)
                                for i, (u, c) in enumerate(zip(updates, counts))])
    w = np.array(counts, dtype=np.float64) / sum(counts)
    for key in SHAPES:
        expected = sum(wi * u[key].astype(np.float64) for wi, u in zip(w, updates))
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6)


def test_aggregate_is_independent_of_arrival_order(strategy):
    rng = np.random.default_rng(2)
    replies = [_reply(i + 1, f"site-{i}", _arrays(rng), 3 + i) for i in range(4)]
    forward = _aggregate(strategy, replies)
    backward = _aggregate(strategy, list(reversed(replies)))
    for key in SHAPES:
        np.testing.assert_array_equal(forward[key], backward[key])


@pytest.mark.parametrize(
    "poison, reason",
    [
        (lambda a: {**a, "conv.bias": np.full(4, np.nan, np.float32)}, "NaN"),
        (lambda a: {**a, "head.weight": np.zeros((3, 4), np.float32)}, "head.weight"),
        (lambda a: {**a, "conv.bias": np.zeros(4, np.float64)}, "float64"),
        (lambda a: {k: v for k, v in a.items() if k != "conv.bias"}, "missing"),
        (lambda a: {**a, "extra": np.zeros(1, np.float32)}, "unexpected"),
    ],
)
def test_poisoned_update_is_dropped_and_the_round_goes_on(strategy, poison, reason):
    rng = np.random.default_rng(3)
    good = [_arrays(rng), _arrays(rng)]
    bad = poison(_arrays(rng))
    replies = [_reply(1, "site-a", good[0], 4), _reply(2, "site-b", good[1], 4),
               _reply(3, "site-evil", bad, 4)]
    got = _aggregate(strategy, replies)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], (good[0][key] + good[1][key]) / 2, rtol=1e-6)
    entry = strategy.run_dir.log(1)
    assert set(entry.rejected) == {"site-evil"} and reason in entry.rejected["site-evil"]


@pytest.mark.parametrize("count", [0, -3, 10**9, 2.5])
def test_example_count_is_bounded(strategy, count):
    rng = np.random.default_rng(4)
    replies = [_reply(1, "site-a", _arrays(rng), 4), _reply(2, "site-b", _arrays(rng), 4),
               _reply(3, "site-liar", _arrays(rng), count)]
    _aggregate(strategy, replies)
    assert "num-examples" in strategy.run_dir.log(1).rejected["site-liar"]


def test_too_few_valid_updates_stop_the_run_cleanly(strategy):
    rng = np.random.default_rng(5)
    ins = Message(RecordDict(), dst_node_id=9, message_type="train")
    failed = Message(Error(code=1001, reason="site data invalid"), reply_to=ins)
    refused = Message(Error(code=1004, reason="budget"), reply_to=Message(
        RecordDict(), dst_node_id=8, message_type="train"))
    with pytest.raises(RunStopped, match="1 valid update"):
        _aggregate(strategy, [_reply(1, "site-a", _arrays(rng), 4), failed, refused])
    assert strategy.run_dir.log(1).failed == {"train": 1, "evaluate": 0}
    assert strategy.run_dir.log(1).refused == ["node-8"]
