"""16-bit transport and the round deadline: half the bytes, float32 at both ends, exact widening,
a secure sum never rounded, poisoned 16-bit bits refused, and a deadline that grows with the
model."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from strategy_replies import _reply

from fedhealth.config import compose
from fedhealth.errors import ConfigError, UpdateRejected
from fedhealth.protocol.npy import array_view
from fedhealth.protocol.packing import (
    PACKED_KEY,
    flatten,
    narrow,
    pack,
    packed_dtype,
    packed_key,
    packed_vector,
    repack,
    unflatten,
    unpack,
    widen,
)
from fedhealth.protocol.transport import (
    SAFETY,
    TRAIN_ALLOWANCE_S,
    model_values,
    round_deadline,
    wire_bytes,
)
from fedhealth.runs.rundir import RunDir
from fedhealth.security.validation import validate_update
from fedhealth.serverapp.strategies import build_strategy

LARGE = [
    "model.channels=[40,80,160,320,640]",
    "model.strides=[2,2,2,2]",
    "model.num_res_units=2",
]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def vector():
    rng = np.random.default_rng(0)
    return (rng.standard_normal(10_000) * np.logspace(-6, 2, 10_000)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrowing_rounds_to_nearest_as_torch_does_and_widening_is_exact(vector, dtype):
    stored = narrow(vector, dtype)
    assert stored.itemsize == 2
    wide = widen(stored, dtype)
    assert wide.dtype == np.float32
    expected = torch.from_numpy(vector).to(TORCH[dtype]).float().numpy()
    np.testing.assert_array_equal(wide, expected)
    # widening then narrowing again changes nothing: every 16-bit value is a float32
    np.testing.assert_array_equal(narrow(wide, dtype), stored)
    eps = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    normal = np.abs(vector) > {"float16": 6.2e-5, "bfloat16": 1e-30}[dtype]
    rel = np.abs(wide[normal] - vector[normal]) / np.abs(vector[normal])
    assert rel.max() <= eps


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_packed_model_is_half_the_bytes_and_unpacks_to_float32(dtype):
    state = {"w": torch.linspace(-3, 3, 4096).reshape(64, 64), "b": torch.ones(7) / 3}
    wide, narrow_record = pack(state), pack(state, dtype)
    assert (
        list(narrow_record.keys()) == [packed_key(dtype)] and packed_dtype(narrow_record) == dtype
    )
    payload = (4096 + 7) * 2
    assert len(narrow_record[packed_key(dtype)].data) < payload + 200
    assert len(wide[PACKED_KEY].data) > 2 * payload
    tensors = unpack(narrow_record, [("w", (64, 64)), ("b", (7,))])
    assert all(v.dtype == np.float32 for v in tensors.values())
    np.testing.assert_array_equal(tensors["b"], torch.full((7,), 1 / 3).to(TORCH[dtype]).float())
    assert repack(narrow_record, "float32")[PACKED_KEY].dtype == "float32"
    assert repack(wide, "float32") is wide


def test_float16_refuses_a_value_beyond_its_range_and_names_the_way_out():
    with pytest.raises(ConfigError, match="65504.*bfloat16"):
        pack({"w": torch.tensor([1.0, 70000.0])}, "float16")
    assert packed_vector(pack({"w": torch.tensor([1.0, 70000.0])}, "bfloat16"))[1] == 70144.0
    with pytest.raises(ConfigError, match="transport dtype 'int8'"):
        narrow(np.zeros(3, np.float32), "int8")


def test_array_view_reads_in_place_and_refuses_what_is_not_a_plain_npy():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(values)
    view = array_view(array)
    np.testing.assert_array_equal(view, values)
    assert not view.flags.writeable  # the record's own bytes, not a copy
    # an object-dtype .npy header followed by bytes that would be unpickled: written by hand,
    # nothing is pickled here and nothing may be unpickled by the code under test
    buffer = io.BytesIO()
    header = {"descr": "|O", "fortran_order": False, "shape": (1,)}
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(b"\x80\x04N.")  # a pickle stream: None
    poisoned = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(ConfigError, match="object arrays are never loaded"):
        array_view(poisoned, "round 2 update")
    short = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=array.data[:-8])
    with pytest.raises(ConfigError, match="not a .npy array"):
        array_view(short)


def test_a_secure_sum_mean_is_not_rounded_to_16_bits(vector):
    template = pack({"w": torch.from_numpy(vector)}, "float16")
    mean = flatten(pack({"w": torch.from_numpy(vector)}))
    back = unflatten(mean, template)
    assert packed_dtype(back) == "float32"
    np.testing.assert_array_equal(packed_vector(back), vector)


def _content(record):
    return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 3})})


def test_validation_refuses_nan_hidden_in_bfloat16_bits(vector):
    reference = pack({"w": torch.from_numpy(vector)}, "bfloat16")
    assert validate_update(reference, _content(reference), max_examples=10, site="site-1") == 3
    bits = narrow(vector, "bfloat16").copy()
    bits[17] = 0x7FC0  # a bfloat16 NaN
    poisoned = ArrayRecord({packed_key("bfloat16"): Array(bits)})
    with pytest.raises(UpdateRejected, match="site-1.*NaN or infinite.*bfloat16"):
        validate_update(reference, _content(poisoned), max_examples=10, site="site-1")


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_the_strategy_sends_16_bits_and_aggregates_in_float32(
    tmp_path, flower_identity, vector, name
):
    cfg = compose(
        [
            f"run_root={tmp_path}",
            "sites=3",
            "strategy.min_sites=2",
            f"strategy={name}",
            "federation.transport_dtype=float16",
            "federation.secure_aggregation=false",
        ]
    )
    strategy = build_strategy(cfg, RunDir.create(cfg))
    model = pack({"w": torch.from_numpy(vector)})
    messages = list(strategy.configure_train(1, model, ConfigRecord(), _Grid()))
    sent = [m.content.array_records["arrays"] for m in messages]
    assert len(sent) == 3 and all(s is sent[0] for s in sent)  # one record, pushed once
    assert packed_dtype(sent[0]) == "float16"
    rng = np.random.default_rng(1)
    updates = [
        vector + rng.standard_normal(vector.size).astype(np.float32) * 0.01 for _ in range(3)
    ]
    counts = [2, 3, 5]
    replies = []
    for i, (u, c) in enumerate(zip(updates, counts, strict=True)):
        reply = _reply(i + 1, f"site-{i}", {}, c)
        reply.content["arrays"] = pack({"w": torch.from_numpy(u)}, "float16")
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert packed_dtype(arrays) == "float32"  # kept, checkpointed and stepped in float32
    got = packed_vector(arrays)
    if name == "fedavg":
        wide = [widen(narrow(u, "float16"), "float16").astype(np.float64) for u in updates]
        expected = sum(c * w for c, w in zip(counts, wide, strict=True)) / sum(counts)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    else:  # FedAdam stepped from the float32 model it kept, not from the rounded one it sent
        assert strategy.strategy.current_arrays is not None
        np.testing.assert_array_equal(strategy.strategy.current_arrays[PACKED_KEY], vector)


def test_the_round_deadline_follows_the_model_size_and_the_link():
    tiny = compose([])
    assert round_deadline(tiny) < TRAIN_ALLOWANCE_S + 5
    large = compose(LARGE)
    values = model_values(large.model)
    assert 29_000_000 < values < 31_000_000
    down, up = wire_bytes(values, "float32", secure=True)
    expected = TRAIN_ALLOWANCE_S + SAFETY * 8 * (down + up) / 10e6
    assert round_deadline(large, values) == pytest.approx(expected)
    assert 950 < expected < 1000  # 240 MB both ways at 10 Mb/s, twice: 384 s more than 600
    half = compose(
        [*LARGE, "federation.transport_dtype=bfloat16", "federation.secure_aggregation=false"]
    )
    assert wire_bytes(values, "bfloat16", secure=False)[1] < up / 1.9
    assert round_deadline(half, values) < expected - 150
    fast = compose([*LARGE, "federation.site_link_mbps=1000"])
    assert round_deadline(fast, values) < TRAIN_ALLOWANCE_S + 5
    fixed = compose([*LARGE, "federation.round_timeout=90"])
    assert round_deadline(fixed, values) == 90.0
    # a secure sum's uplink is its uint32 field whatever the transport dtype
    assert wire_bytes(values, "float16", secure=True)[1] == up


@pytest.mark.parametrize(
    "override", ["federation.transport_dtype=float8", "federation.site_link_mbps=0"]
)
def test_transport_settings_out_of_range_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose([override])
    with pytest.raises(ConfigError, match="transport_dtype"):
        compose(["federation.transport_dtype=float16", "federation.pack_arrays=false"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_site_loads_the_wire_model_into_float32_parameters(flower_identity, dtype):
    from flwr.app import Message

    from fedhealth.clientapp.global_model import check_outgoing, model_from
    from fedhealth.models import build_model

    cfg = compose([])
    state = build_model(cfg.model).state_dict()
    msg = Message(RecordDict({"arrays": pack(state, dtype)}), dst_node_id=1, message_type="train")
    model = model_from(msg, cfg)  # built on the meta device, the message's tensors assigned
    loaded = model.state_dict()
    assert not any(t.is_meta for t in loaded.values())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    for key, value in state.items():
        expected = value.to(TORCH[dtype]).float() if dtype in TORCH else value
        assert torch.equal(loaded[key], expected), key
    # a secure sum's float32 update of a 16-bit model passes the site's own outgoing check
    check_outgoing(pack(loaded, "float32"), msg, "site-0")
    with pytest.raises(ConfigError, match="global model: packed array of shape .*needs 56404"):
        model_from(msg, compose(["model.channels=[8,16,64]"]))


@pytest.mark.parametrize(
    ("dtype", "value"),
    [("float32", "nan"), ("float16", "inf"), ("bfloat16", "-inf"), (None, "nan")],
)
def test_a_site_refuses_a_non_finite_global_model_naming_the_tensor(flower_identity, dtype, value):
    """Any wire dtype (None: one array per tensor): refused when loaded, before any charge."""
    from flwr.app import ArrayRecord, Message

    from fedhealth.clientapp.global_model import model_from
    from fedhealth.models import build_model

    cfg = compose([])
    state = build_model(cfg.model).state_dict()
    key = list(state)[3]
    state[key].view(-1)[-1] = float(value)
    record = ArrayRecord(state) if dtype is None else pack(state, dtype)
    msg = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")
    with pytest.raises(ConfigError, match=f"tensor '{re.escape(key)}' holds NaN or infinite"):
        model_from(msg, cfg)
    state[key].view(-1)[-1] = 0.0  # the same model, finite: loaded
    record = ArrayRecord(state) if dtype is None else pack(state, dtype)
    msg = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")
    assert torch.isfinite(model_from(msg, cfg).state_dict()[key]).all()


def test_a_network_with_a_non_persistent_buffer_is_built_for_real(flower_identity, monkeypatch):
    """Such a buffer is not in the state dict, so on the meta device nothing would fill it: the
    site builds the network again, for real, and loads the global model into it."""
    from flwr.app import Message

    from fedhealth.clientapp import global_model
    from fedhealth.models import build_model

    def with_buffer(model_cfg):
        net = build_model(model_cfg)
        net.register_buffer("window", torch.arange(4.0), persistent=False)
        return net

    cfg = compose([])
    state = build_model(cfg.model).state_dict()
    msg = Message(RecordDict({"arrays": pack(state)}), dst_node_id=1, message_type="train")
    monkeypatch.setattr(global_model, "build_model", with_buffer)
    model = global_model.model_from(msg, cfg)
    assert torch.equal(model.window, torch.arange(4.0))  # materialised, its own value
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
