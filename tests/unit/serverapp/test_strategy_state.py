"""The guarded strategy as a wrapper: its saveable state, its delegation, its settings."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from strategy_replies import SHAPES, _arrays, _reply

from fedhealth.config import compose
from fedhealth.errors import CheckpointError, ConfigError
from fedhealth.runs.rundir import RunDir
from fedhealth.serverapp.strategies import build_strategy
from fedhealth.serverapp.strategy import GuardedStrategy


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def test_fedadam_resumes_with_its_moments(tmp_path, flower_identity):
    """A coordinator restarted after round 2 restores FedAdam's moments from the strategy
    checkpoint (safetensors, sha256-verified): round 3 then gives the model an uninterrupted run
    gives, which a FedAdam restarted without its moments does not."""
    from fedhealth.runs.checkpoint import CheckpointStore

    def make(name):
        cfg = compose(
            [
                f"run_root={tmp_path / 'runs'}",
                f"run_name={name}",
                "sites=4",
                "strategy=fedadam",
                "strategy.min_sites=2",
                "rounds=3",
            ]
        )
        return build_strategy(cfg, RunDir.create(cfg))

    rng = np.random.default_rng(11)
    initial = ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()})
    updates = [[(_arrays(rng), 3 + i) for i in range(3)] for _ in range(3)]

    def play(strategy, model, rounds):
        for r in rounds:
            assert list(strategy.configure_train(r, model, ConfigRecord(), _Grid()))
            replies = [_reply(i + 1, f"site-{i}", u, c) for i, (u, c) in enumerate(updates[r - 1])]
            model, _ = strategy.aggregate_train(r, replies)
        return model

    final = play(make("whole"), initial, [1, 2, 3])
    first = make("first")
    after_two = play(first, initial, [1, 2])
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(2, first.state_dict(), "strategy")
    assert {k.split("/")[0] for k in store.load(2, "strategy")} == {"m_t", "v_t"}

    resumed = make("resumed")
    resumed.load_state_dict(store.load(2, "strategy"))
    got = play(resumed, after_two, [3])
    cold = play(make("cold"), after_two, [3])
    for key in SHAPES:
        np.testing.assert_allclose(got[key].numpy(), final[key].numpy(), rtol=0, atol=1e-7)
    assert any(not np.allclose(cold[k].numpy(), final[k].numpy(), atol=1e-5) for k in SHAPES)


def _strategy(tmp_path, name, *extra):
    cfg = compose(
        [
            f"run_root={tmp_path / 'runs'}",
            f"run_name={name}",
            "sites=4",
            "strategy.min_sites=2",
            "rounds=3",
            *extra,
        ]
    )
    return build_strategy(cfg, RunDir.create(cfg))


def _play_round(strategy, server_round, rng):
    model = ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()})
    assert list(strategy.configure_train(server_round, model, ConfigRecord(), _Grid()))
    replies = [_reply(i + 1, f"site-{i}", _arrays(rng), 3 + i) for i in range(3)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_a_stateless_strategy_has_an_empty_state(tmp_path, flower_identity, name):
    strategy = _strategy(tmp_path, name, f"strategy={name}")
    assert isinstance(strategy, GuardedStrategy)
    _play_round(strategy, 1, np.random.default_rng(0))
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})  # nothing to restore, nothing refused
    with pytest.raises(CheckpointError, match="m_t/conv.bias"):
        strategy.load_state_dict({"m_t/conv.bias": np.zeros(4, np.float32)})


def test_fedadam_state_round_trips_through_a_checkpoint(tmp_path, flower_identity):
    from fedhealth.runs.checkpoint import CheckpointStore

    strategy = _strategy(tmp_path, "a", "strategy=fedadam")
    assert strategy.state_dict() == {}  # no moments before the first aggregation
    _play_round(strategy, 1, np.random.default_rng(1))
    state = strategy.state_dict()
    assert set(state) == {f"{m}/{k}" for m in ("m_t", "v_t") for k in SHAPES}
    assert all(state[f"m_t/{k}"].shape == s for k, s in SHAPES.items())
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(1, state, "strategy")
    other = _strategy(tmp_path, "b", "strategy=fedadam")
    other.load_state_dict(store.load(1, "strategy"))
    restored = other.state_dict()
    assert set(restored) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(restored[key], value)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        other.load_state_dict({"w_t/conv.bias": np.zeros(4, np.float32)})


def test_the_wrapper_delegates_to_the_flower_strategy(tmp_path, flower_identity):
    from flwr.serverapp.strategy import FedAdam

    strategy = _strategy(tmp_path, "a", "strategy=fedadam", "strategy.eta=0.05")
    assert isinstance(strategy.strategy, FedAdam) and strategy.strategy.eta == 0.05
    assert strategy.strategy.min_train_nodes == 2
    strategy.summary()  # the guards, then Flower's own summary


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_examples": 0},
        {"min_sites": 0},
        {"wait_timeout": 0.0},
        {"rejoin_wait": -1.0},
        {"last_round": -1},
    ],
)
def test_the_wrapper_refuses_out_of_range_settings(tmp_path, kwargs):
    from flwr.serverapp.strategy import FedAvg

    cfg = compose([f"run_root={tmp_path}", "sites=4"])
    settings = {"max_examples": 10, "min_sites": 2, "wait_timeout": 5.0, **kwargs}
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        GuardedStrategy(FedAvg(), run_dir=RunDir.create(cfg), **settings)


def test_folding_needs_an_evaluating_strategy(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    cfg = compose([f"run_root={tmp_path}", "sites=4"])
    with pytest.raises(ConfigError, match="fold_evaluate"):
        GuardedStrategy(
            FedAvg(fraction_evaluate=0.0),
            run_dir=RunDir.create(cfg),
            max_examples=10,
            min_sites=2,
            wait_timeout=5.0,
            fold_evaluate=True,
        )
