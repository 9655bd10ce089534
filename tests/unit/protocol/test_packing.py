"""The model packed into one float32 vector for the wire: lossless in both directions, refused
with a clear error when it does not fit the model config, and the same FedAvg either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedhealth.config import compose
from fedhealth.errors import ConfigError
from fedhealth.models import build_model
from fedhealth.protocol.packing import PACKED_KEY, is_packed, layout, pack, unpack


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return build_model(compose(["sites=2"]).model).state_dict()


def test_a_packed_model_loads_bit_identical_into_a_fresh_network(state):
    record = pack(state)
    assert list(record.keys()) == [PACKED_KEY] and is_packed(record)
    assert record[PACKED_KEY].shape == (sum(v.numel() for v in state.values()),)
    tensors = unpack(record, layout(state))
    assert list(tensors) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(tensors[key], value.numpy())
    model = build_model(compose(["sites=2"]).model)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_per_tensor_record_is_not_taken_for_a_packed_one(state):
    assert not is_packed(ArrayRecord(state))
    with pytest.raises(ConfigError, match="expected one packed array"):
        unpack(ArrayRecord(state), layout(state), "global model")


@pytest.mark.parametrize(
    "vector, why",
    [
        (np.zeros(10, np.float32), "shape \\(10,\\)"),
        (np.zeros((2, 3), np.float32), "shape \\(2, 3\\)"),
    ],
)
def test_a_packed_array_that_does_not_fit_the_model_is_refused(state, vector, why):
    with pytest.raises(ConfigError, match=f"round 3 global model: packed array of {why}"):
        unpack(ArrayRecord({PACKED_KEY: Array(vector)}), layout(state), "round 3 global model")
    right_size = np.zeros(sum(v.numel() for v in state.values()), np.float64)
    with pytest.raises(ConfigError, match="dtype float64"):
        unpack(ArrayRecord({PACKED_KEY: Array(right_size)}), layout(state))


def test_only_float32_models_are_packed_and_the_error_names_the_tensor():
    with pytest.raises(ConfigError, match="'steps' is int64"):
        pack({"w": torch.zeros(3), "steps": torch.zeros(1, dtype=torch.int64)})


def test_fedavg_of_packed_updates_is_fedavg_of_the_tensors(state):
    """FedAvg (and FedProx, FedAdam) works element by element, so averaging packed updates and
    unpacking gives the per-tensor average."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    updates = [
        {
            k: torch.from_numpy(rng.normal(size=tuple(v.shape)).astype(np.float32))
            for k, v in state.items()
        }
        for _ in range(3)
    ]
    counts = [5, 11, 2]

    def contents(records):
        return [
            RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": n})})
            for r, n in zip(records, counts, strict=True)
        ]

    packed = aggregate_arrayrecords(contents([pack(u) for u in updates]), "num-examples")
    per_tensor = aggregate_arrayrecords(contents([ArrayRecord(u) for u in updates]), "num-examples")
    vector = packed[PACKED_KEY].numpy().astype(np.float32)
    tensors = unpack(ArrayRecord({PACKED_KEY: Array(vector)}), layout(state))
    for key in state:
        expected = sum(
            n * u[key].numpy().astype(np.float64) for n, u in zip(counts, updates, strict=True)
        )
        np.testing.assert_allclose(tensors[key], expected / sum(counts), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tensors[key], per_tensor[key].numpy(), rtol=1e-6, atol=1e-7)
