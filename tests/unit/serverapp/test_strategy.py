"""Reference tests: the guarded strategy's aggregate against numpy, and its guards."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from strategy_replies import SHAPES, _arrays, _reply

from fedhealth.config import compose
from fedhealth.errors import RunStopped
from fedhealth.runs.rundir import RunDir, read_metrics
from fedhealth.serverapp.strategies import build_strategy


@pytest.fixture
def strategy(tmp_path, flower_identity):
    cfg = compose([f"run_root={tmp_path}", "sites=4", "strategy.min_sites=2"])
    strat = build_strategy(cfg, RunDir.create(cfg))
    strat._global = strat._reference = ArrayRecord(
        {k: Array(v) for k, v in _arrays(np.random.default_rng(0)).items()}
    )
    return strat


def _aggregate(strategy, replies):
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}


def test_fedavg_round_equals_numpy_weighted_average(strategy):
    rng = np.random.default_rng(1)
    updates = [_arrays(rng) for _ in range(3)]
    counts = [5, 17, 40]
    got = _aggregate(
        strategy,
        [
            _reply(i + 1, f"site-{i}", u, c)
            for i, (u, c) in enumerate(zip(updates, counts, strict=True))
        ],
    )
    w = np.array(counts, dtype=np.float64) / sum(counts)
    for key in SHAPES:
        expected = sum(wi * u[key].astype(np.float64) for wi, u in zip(w, updates, strict=True))
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
    replies = [
        _reply(1, "site-a", good[0], 4),
        _reply(2, "site-b", good[1], 4),
        _reply(3, "site-evil", bad, 4),
    ]
    got = _aggregate(strategy, replies)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], (good[0][key] + good[1][key]) / 2, rtol=1e-6)
    entry = strategy.run_dir.log(1)
    assert set(entry.rejected) == {"site-evil"} and reason in entry.rejected["site-evil"]


@pytest.mark.parametrize("count", [0, -3, 10**9, 2.5])
def test_example_count_is_bounded(strategy, count):
    rng = np.random.default_rng(4)
    replies = [
        _reply(1, "site-a", _arrays(rng), 4),
        _reply(2, "site-b", _arrays(rng), 4),
        _reply(3, "site-liar", _arrays(rng), count),
    ]
    _aggregate(strategy, replies)
    assert "num-examples" in strategy.run_dir.log(1).rejected["site-liar"]


def test_too_few_valid_updates_stop_the_run_cleanly(strategy):
    rng = np.random.default_rng(5)
    ins = Message(RecordDict(), dst_node_id=9, message_type="train")
    failed = Message(Error(code=1001, reason="site data invalid"), reply_to=ins)
    refused = Message(
        Error(code=1004, reason="budget"),
        reply_to=Message(RecordDict(), dst_node_id=8, message_type="train"),
    )
    with pytest.raises(RunStopped, match="1 valid update"):
        _aggregate(strategy, [_reply(1, "site-a", _arrays(rng), 4), failed, refused])
    assert strategy.run_dir.log(1).failed == {"train": 1, "evaluate": 0}
    assert strategy.run_dir.log(1).refused == {"node-8": "budget"}


def _folded(node, name, arrays, count, evaluation):
    reply = _reply(node, name, arrays, count)
    metrics = reply.content["metrics"]
    for key, value in evaluation.items():
        metrics[f"eval-{key}"] = value
    return reply


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def test_folded_evaluation_rides_with_the_next_train_message(tmp_path, flower_identity):
    """One message phase per round: round r's train instruction asks the sites to evaluate the
    model they receive (round r-1's), their results land in round r-1's metrics line, and only
    the last round has its own evaluate phase."""
    cfg = compose([f"run_root={tmp_path}", "sites=4", "strategy.min_sites=2", "rounds=3"])
    assert cfg.federation.fold_evaluate
    run_dir = RunDir.create(cfg)
    strategy = build_strategy(cfg, run_dir)
    rng = np.random.default_rng(7)
    model = ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()})
    first = list(strategy.configure_train(1, model, ConfigRecord(), _Grid()))
    assert first and all("evaluate-round" not in m.content["config"] for m in first)
    assert list(strategy.configure_evaluate(1, model, ConfigRecord(), _Grid())) == []
    assert (
        run_dir.end_round(
            1, {k: v.numpy() for k, v in model.items()}, defer_evaluate=strategy.folds(1)
        )
        == []
    )  # waits for round 2
    second = list(strategy.configure_train(2, model, ConfigRecord(), _Grid()))
    assert {m.content["config"]["evaluate-round"] for m in second} == {1}
    good = {"dice": 0.8, "loss": 0.3, "num-examples": 2}
    replies = [
        _folded(1, "site-a", _arrays(rng), 4, good),
        _folded(2, "site-b", _arrays(rng), 6, {**good, "dice": 0.4, "num-examples": 6}),
        _folded(3, "site-c", _arrays(rng), 5, {**good, "dice": 1.5}),  # out of range
        _reply(4, "site-d", _arrays(rng), 5),
    ]  # trained, evaluated nothing
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and not any(k.startswith("eval-") for k in metrics)
    assert set(run_dir.log(2).train) == {"site-a", "site-b", "site-c", "site-d"}
    assert set(run_dir.log(2).train["site-a"]) == {"loss", "num-examples"}
    written = run_dir.end_round(
        2, {k: v.numpy() for k, v in arrays.items()}, defer_evaluate=strategy.folds(2)
    )
    assert [line["round"] for line in written] == [1]
    evaluation = written[0]["evaluate"]
    assert set(evaluation["sites"]) == {"site-a", "site-b"}
    assert evaluation["weighted"]["dice"] == pytest.approx((0.8 * 2 + 0.4 * 6) / 8)
    assert "site-c" in evaluation["rejected"] and evaluation["failed"] == 1
    assert evaluation["with_round"] == 2
    # the last round: its own evaluate phase, its line written at once
    assert not strategy.folds(3)
    assert list(strategy.configure_evaluate(3, arrays, ConfigRecord(), _Grid()))
    third = list(strategy.configure_train(3, arrays, ConfigRecord(), _Grid()))
    assert {m.content["config"]["evaluate-round"] for m in third} == {2}
    written = run_dir.end_round(
        3, {k: v.numpy() for k, v in arrays.items()}, defer_evaluate=strategy.folds(3)
    )
    assert [line["round"] for line in written] == [2, 3]


def test_a_pending_line_survives_a_restart(tmp_path, flower_identity):
    cfg = compose([f"run_root={tmp_path}", "run_name=r", "sites=4", "rounds=3"])
    run_dir = RunDir.create(cfg)
    weights = {"w": np.ones(2, np.float32)}
    run_dir.end_round(0, weights)
    run_dir.log(1).train["site-a"] = {"loss": 0.5, "num-examples": 3}
    run_dir.end_round(1, weights, defer_evaluate=True)
    assert [ln["round"] for ln in read_metrics(run_dir.path)] == [0]
    # the coordinator dies; the run directory is reopened
    again = RunDir.create(cfg)
    assert again.resumed_from == 1 and again.pending["train"]["sites"] == {
        "site-a": {"loss": 0.5, "num-examples": 3}
    }
    again.log(1).evaluate["site-a"] = {"dice": 0.7, "loss": 0.2, "num-examples": 1}
    again.end_round(2, weights, defer_evaluate=True)
    lines = read_metrics(again.path)
    assert [ln["round"] for ln in lines] == [0, 1]
    assert lines[1]["train"]["sites"]["site-a"]["loss"] == 0.5
    assert lines[1]["evaluate"]["sites"]["site-a"]["dice"] == 0.7
    # died again right after writing line 2 but before the manifest said so: written once
    import json

    from fedhealth.io import append_line

    append_line(again.metrics, json.dumps({"round": 2, "evaluate": {}}))
    third = RunDir.create(cfg)
    assert third.resumed_from == 2 and [ln["round"] for ln in read_metrics(third.path)] == [0, 1]
    third.finish()  # a run that ends first writes the waiting line with what it has
    assert [ln["round"] for ln in read_metrics(third.path)] == [0, 1, 2]


class _ReturningGrid:
    """Four sites; after a round that lost one, it reconnects ``back_after`` seconds later."""

    def __init__(self, back_after: float) -> None:
        self.lost_at: float | None = None
        self.back_after = back_after

    def get_node_ids(self):
        import time

        if self.lost_at is not None and time.monotonic() - self.lost_at < self.back_after:
            return [1, 2, 3]
        return [1, 2, 3, 4]


@pytest.mark.parametrize("back_after, wait, expect", [(0.8, 5.0, 4), (60.0, 0.6, 3)])
def test_after_a_round_that_lost_a_site_the_next_waits_for_it_to_return(
    tmp_path, flower_identity, back_after, wait, expect
):
    import time

    cfg = compose(
        [
            f"run_root={tmp_path}",
            "sites=4",
            "strategy.min_sites=2",
            "rounds=3",
            f"federation.rejoin_wait={wait}",
        ]
    )
    strategy = build_strategy(cfg, RunDir.create(cfg))
    rng = np.random.default_rng(3)
    model = ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()})
    grid = _ReturningGrid(back_after)
    assert len(list(strategy.configure_train(1, model, ConfigRecord(), grid))) == 4
    lost = Message(
        Error(code=1001, reason="node went away"),
        reply_to=Message(RecordDict(), dst_node_id=4, message_type="train"),
    )
    strategy.aggregate_train(
        1, [*(_reply(i, f"site-{i}", _arrays(rng), 4) for i in (1, 2, 3)), lost]
    )
    grid.lost_at = time.monotonic()
    t0 = time.monotonic()
    sent = list(strategy.configure_train(2, model, ConfigRecord(), grid))
    assert len(sent) == expect
    assert time.monotonic() - t0 < wait + 1.5  # never longer than rejoin_wait
    t0 = time.monotonic()  # the round after a complete one does not wait
    strategy.aggregate_train(
        2,
        [
            _reply(m.metadata.dst_node_id, f"site-{m.metadata.dst_node_id}", _arrays(rng), 4)
            for m in sent
        ],
    )
    list(strategy.configure_train(3, model, ConfigRecord(), grid))
    assert time.monotonic() - t0 < 0.5
