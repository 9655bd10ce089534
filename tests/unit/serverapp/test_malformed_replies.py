"""Fuzz: the coordinator survives malformed replies.

A seeded generator builds well over 1000 malformed replies as real Flower messages: the
instruction comes from the strategy's own ``configure_train`` / ``configure_evaluate``, the reply
is ``Message(content, reply_to=instruction)`` as a SuperNode builds it, and it is serialised and
parsed back the way the SuperLink hands it to the ServerApp. Values protobuf cannot carry (a bool
or a string in a MetricRecord) are put in after that, as a bypassed deserialiser would.

Many bad replies per round are mixed with good ones and fed to the strategy
:func:`build_strategy` builds. Every bad reply must be rejected (or, for an error reply, dropped)
with a logged reason naming its site; the aggregate must be the good replies' alone; the round
log must still serialise; the next round must work.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedhealth.config import compose
from fedhealth.errors import RunStopped
from fedhealth.protocol.packing import pack
from fedhealth.runs.rundir import RunDir
from fedhealth.serverapp.strategies import build_strategy

SEED = 20250917
MAX_EXAMPLES = 1000
GOOD = {1_000_001 + i: f"site-{i}" for i in range(4)}  # node id -> site name
BAD_NODE = 2_000_000  # bad replies come from nodes 2_000_000.. (same digit count: no prefixes)
TINY = ["model.channels=[2,4]", "model.strides=[2]"]
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: "site-0\n" is no name
NUMPY = "numpy.ndarray"


# --------------------------------------------------------------------------- message plumbing


class FakeGrid:
    """What configure_* needs from a Grid: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def wire(msg: Message) -> Message:
    """The reply as the ServerApp receives it: protobuf bytes and back."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def header_only(descr: str, shape: tuple, size: int) -> bytes:
    """A .npy header for ``descr``/``shape``, padded with zero bytes to ``size`` bytes in all."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue().ljust(size, b"\0")


def lying(ref: np.ndarray, data: bytes, stype: str = NUMPY) -> Array:
    """An Array whose metadata claims the reference's dtype and shape, whatever ``data`` holds."""
    return Array(dtype=str(ref.dtype), shape=tuple(ref.shape), stype=stype, data=data)


def _bypass(record: Any, key: str, value: Any) -> None:
    record.__dict__["_data"][key] = value  # MetricRecord's type check, skipped on purpose


@dataclass
class Parts:
    """A reply's content, before it is assembled into a RecordDict."""

    arrays: dict[str, Array] | None
    metrics: dict[str, Any] | None
    site: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)
    tamper: Callable[[RecordDict], None] | None = None

    def content(self) -> RecordDict:
        rd = RecordDict()
        if self.arrays is not None:
            rd["arrays"] = ArrayRecord(dict(self.arrays))
        if self.metrics is not None:
            rd["metrics"] = MetricRecord(dict(self.metrics))
        if self.site is not None:
            rd["site"] = ConfigRecord(dict(self.site))
        for key, record in self.extra.items():
            rd[key] = record
        return rd


@dataclass
class Bad:
    kind: str
    node: int
    claimed: Any  # the name in its site record; None: none
    hints: tuple[str, ...]  # its rejection reason names at least one of these fields
    error: bool = False


class Gen:
    """Seeded generator of good and malformed replies for one phase."""

    def __init__(self, seed: int, phase: str):
        self.rng = np.random.default_rng(seed)
        self.phase = phase
        self.global_: dict[str, np.ndarray] = {}
        self.site_dtypes: dict[str, np.dtype] = {}  # sites reply in their model's dtypes
        self.counter = 0
        self._pool_for: dict | None = None
        self._pool: list[dict[str, Array]] = []

    # -- good replies
    def good_train(self) -> tuple[dict[str, np.ndarray], int, float]:
        dtypes = self.site_dtypes or {k: v.dtype for k, v in self.global_.items()}
        arrays = {
            k: (v + self.rng.normal(0, 0.05, v.shape)).astype(dtypes[k])
            for k, v in self.global_.items()
        }
        return arrays, int(self.rng.integers(1, 60)), float(self.rng.uniform(0.1, 2.0))

    def good_eval(self) -> dict[str, float | int]:
        return {
            "dice": float(self.rng.uniform(0, 1)),
            "loss": float(self.rng.uniform(0, 2)),
            "num-examples": int(self.rng.integers(1, 60)),
        }

    def key(self) -> str:
        return str(self.rng.choice(sorted(self.global_)))

    def pick(self, values: list) -> Any:
        return values[int(self.rng.integers(len(values)))]

    # -- one malformed reply
    def base(self) -> Parts:
        """A good reply's parts, for a defect to spoil (plausible arrays from a small pool)."""
        if self.phase == "train":
            if self._pool_for is not self.global_:
                self._pool_for = self.global_
                self._pool = [
                    {k: Array(v) for k, v in self.good_train()[0].items()} for _ in range(8)
                ]
            return Parts(
                dict(self.pick(self._pool)),
                {
                    "loss": float(self.rng.uniform(0.1, 2.0)),
                    "num-examples": int(self.rng.integers(1, 60)),
                    "steps": 3,
                },
                {},
            )
        return Parts(None, self.good_eval(), {})

    def bad(self, node: int, kind: str) -> tuple[Bad, Parts | Error]:
        self.counter += 1
        if kind == "error":
            code = self.pick([-1, 0, 1, 999, 1001, 1002, 1003, 1004, 1005, 2**31 - 1, -(2**31)])
            reason = self.pick(
                [
                    "",
                    "x" * 100_000,
                    "site site-0: forged name",
                    "a\nb\r\n\x00",
                    "site ../../etc: no",
                    "\u202e evil",
                ]
            )
            return Bad(kind, node, None, (), error=True), Error(code=code, reason=reason)
        parts = self.base()
        hints = DEFECTS[self.phase][kind](self, parts)
        scheme = self.pick(["unique", "unique", "bogus", "absent", "impersonate"])
        if scheme == "absent":  # no name; no site record at all unless the defect is in it
            parts.site, claimed = parts.site or None, None
        else:
            claimed = {
                "unique": f"bad-{self.counter}",
                "impersonate": self.pick(list(GOOD.values())),
                "bogus": self.pick(
                    [
                        "",
                        "x" * 65,
                        "../../etc/passwd",
                        "site 0",
                        "site-0\n",
                        "名前",
                        7,
                        2.5,
                        True,
                        b"site-0",
                        ["site-0"],
                    ]
                ),
            }[scheme]
            parts.site = {**(parts.site or {}), "name": claimed}
        return Bad(kind, node, claimed, hints), parts


# --------------------------------------------------------------------------- train defects


def _t_rename_key(g, p):
    k = g.key()
    p.arrays[k + ".renamed"] = p.arrays.pop(k)
    return ("keys",)


def _t_drop_key(g, p):
    p.arrays.pop(g.key())
    return ("keys",)


def _t_extra_key(g, p):
    p.arrays["extra.weight"] = Array(np.zeros(int(g.rng.integers(1, 4)), np.float32))
    return ("keys", "bytes")


def _t_many_arrays(g, p):
    spam = Array(np.zeros(8, np.float32))
    for i in range(int(g.rng.integers(50, 300))):
        p.arrays[f"spam.{i}"] = spam
    return ("keys", "bytes")


def _reshaped(a: np.ndarray) -> np.ndarray:
    """The same values under another shape (a 1-d array becomes a row)."""
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1)


def _t_wrong_shape(g, p):
    k = g.key()
    ref = g.global_[k]
    p.arrays[k] = Array(
        g.pick(
            [
                _reshaped(ref),
                ref[..., :-1] if ref.shape[-1] > 1 else ref[:0],
                np.zeros((*ref.shape, 2), ref.dtype),
                np.zeros((), ref.dtype),
            ]
        )
    )
    return (k, "bytes")


def _t_shape_lie(g, p):
    k = g.key()
    p.arrays[k] = lying(g.global_[k], npy(_reshaped(g.global_[k])))
    return (k, "bytes")


def _t_broadcast_lie(g, p):  # a (1,)-array that numpy would broadcast over the whole parameter
    k = g.key()
    ndim = max(1, g.global_[k].ndim)
    p.arrays[k] = lying(g.global_[k], npy(np.full((1,) * ndim, 1e3, np.float32)))
    return (k,)


def _t_wrong_dtype(g, p):
    k = g.key()
    dtype = g.pick(
        [
            d
            for d in (
                np.float64,
                np.float16,
                np.int32,
                np.int64,
                np.bool_,
                np.complex64,
                np.float32,
            )
            if d != g.global_[k].dtype
        ]
    )
    p.arrays[k] = Array(g.global_[k].astype(dtype))
    return (k, "bytes")


def _t_dtype_lie(g, p):
    k = g.key()
    ref = g.global_[k]
    p.arrays[k] = lying(ref, npy(g.pick([ref.view(np.int32), ref.astype(">f4")])))
    return (k,)


def _t_non_finite(g, p):
    k = g.key()
    arr = p.arrays[k].numpy().copy().reshape(-1)
    arr[g.rng.integers(0, arr.size, size=max(1, arr.size // 7))] = g.pick([np.nan, np.inf, -np.inf])
    p.arrays[k] = Array(arr.reshape(g.global_[k].shape))
    return (k,)


def _t_garbage(g, p):
    k = g.key()
    p.arrays[k] = lying(g.global_[k], g.rng.bytes(len(npy(g.global_[k]))))
    return (k,)


def _t_truncated(g, p):
    k = g.key()
    data = npy(g.global_[k])
    p.arrays[k] = lying(g.global_[k], data[: int(g.rng.integers(0, len(data)))])
    return (k,)


def _t_trailing_bytes(g, p):
    k = g.key()
    p.arrays[k] = lying(g.global_[k], npy(g.global_[k]) + g.rng.bytes(int(g.rng.integers(1, 64))))
    return ("bytes", k)


def _t_header_bomb(g, p):  # a header claiming 4 TiB of float32 over the usual few bytes
    k = g.key()
    p.arrays[k] = lying(g.global_[k], header_only("<f4", (2**40,), len(npy(g.global_[k]))))
    return (k,)


def _t_object_dtype(g, p):
    k = g.key()
    p.arrays[k] = lying(g.global_[k], header_only("|O", g.global_[k].shape, len(npy(g.global_[k]))))
    return (k,)


def _t_wrong_stype(g, p):
    k = g.key()
    stype = g.pick(["torch.Tensor", "", "pickle"])
    p.arrays[k] = lying(g.global_[k], npy(g.global_[k]), stype=stype)
    return (k,)


def _t_npz(g, p):
    k = g.key()
    buf = io.BytesIO()
    np.savez(buf, x=g.global_[k])
    p.arrays[k] = lying(g.global_[k], buf.getvalue())
    return (k, "bytes")


def _t_bigger_array(g, p):
    k = g.key()
    p.arrays[k] = Array(np.zeros(g.global_[k].size * 50 + 1, np.float32))
    return (k, "bytes")


def _t_no_arrays(g, p):
    p.arrays = None
    return ("ArrayRecord",)


def _t_two_array_records(g, p):
    p.extra["arrays-2"] = ArrayRecord({k: Array(v) for k, v in g.global_.items()})
    return ("ArrayRecord",)


def _t_renamed_array_record(g, p):
    p.extra["weights"], p.arrays = ArrayRecord(dict(p.arrays)), None
    return ("ArrayRecord",)


def _t_empty(g, p):
    p.arrays = p.metrics = None
    return ("MetricRecord",)


def _t_metrics_as_config(g, p):
    p.extra["metrics"], p.metrics = ConfigRecord(dict(p.metrics)), None
    return ("MetricRecord",)


def _t_two_metric_records(g, p):
    p.extra["metrics-2"] = MetricRecord({"loss": 0.1, "num-examples": 1})
    return ("MetricRecord",)


def _t_too_many_metrics(g, p):
    p.metrics.update({f"m{i}": float(i) for i in range(int(g.rng.integers(100, 600)))})
    return ("MetricRecord",)


COUNTS = [
    0,
    -1,
    -(10**6),
    MAX_EXAMPLES + 1,
    10**12,
    2**63 - 1,
    2**64 - 1,
    2.5,
    5.0,
    float("nan"),
    float("inf"),
    -0.0,
    [5],
    [1, 2],
]


def _bad_count(g, p):
    p.metrics["num-examples"] = g.pick(COUNTS)
    return ("num-examples",)


def _missing_count(g, p):
    del p.metrics["num-examples"]
    return ("num-examples",)


def _tampered_count(g, p):
    value = g.pick([True, False, "5", None, b"5", {"n": 5}])
    p.tamper = lambda rd: _bypass(next(iter(rd.metric_records.values())), "num-examples", value)
    return ("num-examples",)


def _non_finite_metric(key):
    def defect(g, p):
        p.metrics[key] = g.pick([float("nan"), float("inf"), float("-inf")])
        return (key,)

    return defect


def _list_metric(key):
    def defect(g, p):
        p.metrics[key] = g.pick([[0.1, 0.2], [1], []])
        return (key,)

    return defect


def _missing_metric(key):
    def defect(g, p):
        del p.metrics[key]
        return (key,)

    return defect


def _tampered_metric(g, p):
    key = g.pick(sorted(k for k in p.metrics if k != "num-examples"))
    value = g.pick([True, "0.5", None, b"\0", object()])
    p.tamper = lambda rd: _bypass(next(iter(rd.metric_records.values())), key, value)
    return (key,)


def _t_bad_accounting(g, p):
    p.metrics["epsilon"] = 1.0
    noise = g.pick([5, 1.5, True, [b"x"], "abc", [1.0, float("nan")], ["a", "b"], [1.0, 2.0]])
    p.site.update({"history-noise": noise, "history-rate": [0.1], "history-steps": [7]})
    return ("history",)


def _t_forged_sum(g, p):  # honoured, the markers would lift the count bound 50-fold
    p.site.update({"secagg-sum": True, "secagg-sites": 50})
    p.metrics["num-examples"] = MAX_EXAMPLES * 10
    return ("num-examples",)


def _t_forged_metrics_only(g, p):  # honoured, the site would count without sending an update
    p.site["secagg-metrics-only"] = True
    p.arrays = None
    return ("ArrayRecord",)


def _t_forged_metrics_only_nan(g, p):
    p.site["secagg-metrics-only"] = True
    return _t_non_finite(g, p)


def _t_forged_sites_str(g, p):
    p.site.update({"secagg-sum": True, "secagg-sites": g.pick(["x", -3, 10**18, 2.5])})
    p.metrics["num-examples"] = 0
    return ("num-examples",)


# --------------------------------------------------------------------------- evaluate defects


def _e_dice_out_of_range(g, p):
    p.metrics["dice"] = g.pick([1.5, -0.2, 1e9, -1e9])
    return ("dice",)


def _e_carries_arrays(g, p):  # an oversized evaluation reply
    p.arrays = {"blob": Array(np.zeros(int(g.rng.integers(1, 200_000)), np.float32))}
    return ("ArrayRecord",)


def _e_forged(g, p):
    p.site.update({"secagg-sum": True, "secagg-metrics-only": True, "secagg-sites": 99})
    p.metrics["num-examples"] = MAX_EXAMPLES * 50
    return ("num-examples",)


DEFECTS: dict[str, dict[str, Callable]] = {
    "train": {
        "rename_key": _t_rename_key,
        "drop_key": _t_drop_key,
        "extra_key": _t_extra_key,
        "many_arrays": _t_many_arrays,
        "wrong_shape": _t_wrong_shape,
        "shape_lie": _t_shape_lie,
        "broadcast_lie": _t_broadcast_lie,
        "wrong_dtype": _t_wrong_dtype,
        "dtype_lie": _t_dtype_lie,
        "non_finite": _t_non_finite,
        "garbage": _t_garbage,
        "truncated": _t_truncated,
        "trailing_bytes": _t_trailing_bytes,
        "header_bomb": _t_header_bomb,
        "object_dtype": _t_object_dtype,
        "wrong_stype": _t_wrong_stype,
        "npz": _t_npz,
        "bigger_array": _t_bigger_array,
        "no_arrays": _t_no_arrays,
        "two_array_records": _t_two_array_records,
        "renamed_array_record": _t_renamed_array_record,
        "empty": _t_empty,
        "metrics_as_config": _t_metrics_as_config,
        "two_metric_records": _t_two_metric_records,
        "too_many_metrics": _t_too_many_metrics,
        "bad_count": _bad_count,
        "missing_count": _missing_count,
        "tampered_count": _tampered_count,
        "non_finite_loss": _non_finite_metric("loss"),
        "list_loss": _list_metric("loss"),
        "non_finite_steps": _non_finite_metric("steps"),
        "list_steps": _list_metric("steps"),
        "tampered_metric": _tampered_metric,
        "bad_accounting": _t_bad_accounting,
        "forged_sum": _t_forged_sum,
        "forged_metrics_only": _t_forged_metrics_only,
        "forged_metrics_only_nan": _t_forged_metrics_only_nan,
        "forged_sites_str": _t_forged_sites_str,
    },
    "evaluate": {
        "bad_count": _bad_count,
        "missing_count": _missing_count,
        "tampered_count": _tampered_count,
        "non_finite_dice": _non_finite_metric("dice"),
        "non_finite_loss": _non_finite_metric("loss"),
        "dice_out_of_range": _e_dice_out_of_range,
        "missing_dice": _missing_metric("dice"),
        "missing_loss": _missing_metric("loss"),
        "list_dice": _list_metric("dice"),
        "list_loss": _list_metric("loss"),
        "tampered_metric": _tampered_metric,
        "empty": _t_empty,
        "metrics_as_config": _t_metrics_as_config,
        "two_metric_records": _t_two_metric_records,
        "too_many_metrics": _t_too_many_metrics,
        "carries_arrays": _e_carries_arrays,
        "forged": _e_forged,
    },
}
for _phase in DEFECTS:
    DEFECTS[_phase]["error"] = None  # an error reply (odd code, odd reason)


# --------------------------------------------------------------------------- the round driver


def build_round(
    gen: Gen, instructions: dict[int, Message], n_bad: int, start: int
) -> tuple[list[Message], list[Bad], dict[int, Any]]:
    """Good replies from GOOD's nodes, ``n_bad`` malformed ones, shuffled, as received."""
    kinds = sorted(DEFECTS[gen.phase])
    replies, bads, goods = [], [], {}
    for node, name in GOOD.items():
        if gen.phase == "train":
            arrays, count, loss = gen.good_train()
            goods[node] = (arrays, count, loss)
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({"loss": loss, "num-examples": count, "steps": 3}),
                    "site": ConfigRecord({"name": name}),
                }
            )
        else:
            goods[node] = gen.good_eval()
            content = RecordDict(
                {"metrics": MetricRecord(goods[node]), "site": ConfigRecord({"name": name})}
            )
        replies.append(wire(Message(content, reply_to=instructions[node])))
    for i in range(n_bad):
        node = BAD_NODE + start + i
        bad, made = gen.bad(node, kinds[(start + i) % len(kinds)])
        if bad.error:
            reply = wire(Message(made, reply_to=instructions[node]))
        else:
            reply = wire(Message(made.content(), reply_to=instructions[node]))
            if made.tamper is not None:
                made.tamper(reply.content)
        replies.append(reply)
        bads.append(bad)
    order = gen.rng.permutation(len(replies))
    return [replies[j] for j in order], bads, goods


def record_key(bad: Bad, table: dict[str, str]) -> str:
    """The key under which the strategy recorded ``bad`` (its name, or its node id)."""
    if isinstance(bad.claimed, str) and NAME.fullmatch(bad.claimed):
        if bad.claimed not in GOOD.values():
            return bad.claimed
        # a name another node (the real site) also claims: both are told apart by node id
        found = [k for k in table if k.startswith(bad.claimed) and str(bad.node) in k]
        assert len(found) == 1, (bad, found)
        return found[0]
    return f"node-{bad.node}"


def check_rejections(bads: list[Bad], table: dict[str, str], text: str, entry, phase: str) -> None:
    tokens = set(re.findall(r"[\w.#-]+", text))  # names as whole words of the log
    listed = [b for b in bads if not b.error]
    assert len(table) == len(listed), "one rejection per bad reply, none for the good ones"
    for bad in listed:
        key = record_key(bad, table)
        reason = table.get(key)
        assert reason is not None, f"{bad.kind} from {key} was not recorded as rejected"
        assert key in reason, (bad.kind, key, reason)
        assert any(h.lower() in reason.lower() for h in bad.hints), (bad.kind, bad.hints, reason)
        assert key in tokens, f"{bad.kind} from {key}: not named in the log"
    errors = [b for b in bads if b.error]
    assert entry.failed[phase] + len(entry.refused) == len(errors)
    assert not set(entry.refused) & set(GOOD.values()), "a refusal under a good site's name"
    for bad in errors:
        assert f"node {bad.node} " in text


def strict_json(line: dict) -> dict:
    def refuse(token):
        raise AssertionError(f"non-finite {token} in the round log")

    return json.loads(json.dumps(line), parse_constant=refuse)


@pytest.fixture(scope="module")
def initial_model() -> dict[str, np.ndarray]:
    from fedhealth.models import build_model

    cfg = compose(TINY)
    return {k: v.detach().numpy().copy() for k, v in build_model(cfg.model).state_dict().items()}


@pytest.fixture
def logs(caplog, monkeypatch):
    # make_client_app stops "fedhealth" records at its own handler; the guard's log is wanted here
    monkeypatch.setattr(logging.getLogger("fedhealth"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="fedhealth.coordinator")
    return caplog


def make(tmp_path, name: str, strategy: str = "fedavg", *, secure: bool = False, fold: bool = True):
    cfg = compose(
        [
            *TINY,
            f"run_root={tmp_path}",
            f"run_name={name}",
            "sites=4",
            f"federation.fold_evaluate={str(fold).lower()}",
            "strategy.min_sites=2",
            f"strategy.name={strategy}",
            f"strategy.max_examples_per_site={MAX_EXAMPLES}",
            "federation.round_timeout=5",
            f"federation.secure_aggregation={str(secure).lower()}",
        ]
    )
    run_dir = RunDir.create(cfg)
    return build_strategy(cfg, run_dir), run_dir


def _weighted(goods: dict[int, tuple], key: str) -> np.ndarray:
    """numpy's example-weighted mean of the good replies' parameter ``key`` (float64)."""
    total = sum(c for _, c, _ in goods.values())
    return sum(c * a[key].astype(np.float64) for a, c, _ in goods.values()) / total


# --------------------------------------------------------------------------- the tests

BAD_PER_ROUND = 400


@pytest.mark.parametrize(
    "strategy_name, rounds, per_round, packed",
    [
        ("fedavg", 3, BAD_PER_ROUND, False),
        ("fedprox", 2, 200, False),
        ("fedadam", 2, 200, False),
        ("fedavg", 2, 200, True),
    ],
)
def test_train_rounds_survive_malformed_replies(
    tmp_path, flower_identity, initial_model, logs, strategy_name, rounds, per_round, packed
):
    """FedAvg: 1200 malformed replies over 3 rounds; FedProx and FedAdam: 400 over 2; FedAvg
    with the model packed into one array (``federation.pack_arrays``, the default): 400 over 2."""
    if packed:
        initial_model = {k: v.numpy() for k, v in pack(initial_model).items()}
    strategy, run_dir = make(tmp_path, "fuzz", strategy_name)
    twin, _ = make(tmp_path, "twin", strategy_name)  # the same strategy, fed the good replies only
    grid = FakeGrid([*GOOD, *range(BAD_NODE, BAD_NODE + rounds * per_round)])
    gen = Gen(SEED, "train")
    gen.site_dtypes = {k: v.dtype for k, v in initial_model.items()}
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model.items()})
    seen: Counter[str] = Counter()
    for rnd in range(1, rounds + 1):
        gen.global_ = {k: v.numpy() for k, v in arrays.items()}
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        }
        twin.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(GOOD))
        assert set(sent) == set(grid.nodes)
        replies, bads, goods = build_round(gen, sent, per_round, (rnd - 1) * per_round)
        seen.update(b.kind for b in bads)
        logs.clear()

        got, metrics = strategy.aggregate_train(rnd, replies)

        good_replies = [r for r in replies if r.metadata.src_node_id in GOOD]
        expected, expected_metrics = twin.aggregate_train(rnd, good_replies)
        for key in initial_model:
            assert got[key].numpy().dtype == initial_model[key].dtype  # what sites train in
            np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-6)
            if strategy_name != "fedadam":  # FedAvg and FedProx: the example-weighted mean
                np.testing.assert_allclose(
                    got[key].numpy(), _weighted(goods, key), rtol=0, atol=1e-6
                )
        total = sum(c for _, c, _ in goods.values())
        weighted_loss = sum(c * loss for _, c, loss in goods.values()) / total
        assert metrics["loss"] == pytest.approx(weighted_loss)
        entry = run_dir.log(rnd)
        assert len(entry.train) == len(GOOD)
        check_rejections(bads, entry.rejected, logs.text, entry, "train")
        line = strict_json(run_dir.end_round(rnd, {k: v.numpy() for k, v in got.items()})[-1])
        assert line["train"]["rejected"] == entry.rejected  # into metrics.jsonl
        arrays = got
    assert sum(seen.values()) == rounds * per_round and set(seen) == set(DEFECTS["train"])
    assert min(seen.values()) >= rounds * per_round // len(DEFECTS["train"])


EVAL_ROUNDS = 3


def test_evaluate_rounds_survive_1200_malformed_replies(
    tmp_path, flower_identity, initial_model, logs
):
    strategy, run_dir = make(tmp_path, "fuzz-eval", fold=False)  # an evaluate phase each round
    grid = FakeGrid([*GOOD, *range(BAD_NODE, BAD_NODE + EVAL_ROUNDS * BAD_PER_ROUND)])
    gen = Gen(SEED + 1, "evaluate")
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model.items()})
    seen: Counter[str] = Counter()
    for rnd in range(1, EVAL_ROUNDS + 1):
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid)
        }
        replies, bads, goods = build_round(gen, sent, BAD_PER_ROUND, (rnd - 1) * BAD_PER_ROUND)
        seen.update(b.kind for b in bads)
        logs.clear()

        got = strategy.aggregate_evaluate(rnd, replies)

        counts = np.array([g["num-examples"] for g in goods.values()], np.float64)
        for key in ("dice", "loss"):
            values = np.array([g[key] for g in goods.values()])
            np.testing.assert_allclose(
                got[key], (counts * values).sum() / counts.sum(), rtol=0, atol=1e-6
            )
        entry = run_dir.log(rnd)
        assert sorted(k.split("#")[0] for k in entry.evaluate) == sorted(GOOD.values())
        check_rejections(bads, entry.rejected_evaluate, logs.text, entry, "evaluate")
        line = strict_json(run_dir.end_round(rnd, {k: v.numpy() for k, v in arrays.items()})[-1])
        assert line["evaluate"]["weighted"]["dice"] == pytest.approx(got["dice"])
        assert line["evaluate"]["rejected"] == entry.rejected_evaluate
    assert sum(seen.values()) >= 1000 and set(seen) == set(DEFECTS["evaluate"])


def test_too_few_good_replies_among_bad_ones_stop_the_run_cleanly(
    tmp_path, flower_identity, initial_model, logs
):
    strategy, run_dir = make(tmp_path, "stop")
    grid = FakeGrid([*GOOD, *range(BAD_NODE, BAD_NODE + 200)])
    gen = Gen(SEED + 2, "train")
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model.items()})
    gen.global_ = dict(initial_model)
    sent = {
        m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)
    }
    replies, bads, _ = build_round(gen, sent, 200, 0)
    lonely = next(iter(GOOD))
    replies = [
        r for r in replies if r.metadata.src_node_id not in GOOD or r.metadata.src_node_id == lonely
    ]
    with pytest.raises(RunStopped, match="1 valid update"):
        strategy.aggregate_train(1, replies)
    entry = run_dir.log(1)
    check_rejections(bads, entry.rejected, logs.text, entry, "train")
    # the stop is recorded; the next round (a resumed run, say) still works
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid(GOOD))
    }
    replies, _, goods = build_round(gen, sent, 0, 0)
    got, _ = strategy.aggregate_train(2, replies)
    for key in initial_model:
        np.testing.assert_allclose(got[key].numpy(), _weighted(goods, key), rtol=0, atol=1e-6)


def test_unusual_but_valid_replies_are_aggregated_like_the_others(
    tmp_path, flower_identity, initial_model
):
    """A MetricRecord under another name, extra metrics, a Fortran-ordered array or extra site
    fields are no reason to drop a reply, nor (Flower's consistency check) to stop the round."""
    strategy, run_dir = make(tmp_path, "odd")
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model.items()})
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(GOOD))
    }
    gen = Gen(SEED + 3, "train")
    gen.global_ = dict(initial_model)
    goods, replies = {}, []
    for i, (node, name) in enumerate(GOOD.items()):
        arr, count, loss = gen.good_train()
        goods[node] = (arr, count, loss)
        record = {k: Array(v) for k, v in arr.items()}
        metrics = {"loss": loss, "num-examples": count}
        if i == 0:
            metrics["epsilon"] = 0.5  # a site with DP on among sites without
            metrics.update({"ledger-entries": 1, "ledger-head": 0xABC, "ledger-head-prev": 0})
        if i == 1:
            big = max(arr, key=lambda k: arr[k].ndim)
            record[big] = Array(
                dtype="float32",
                shape=arr[big].shape,
                stype=NUMPY,
                data=npy(np.asfortranarray(arr[big])),
            )
        content = RecordDict(
            {
                "arrays": ArrayRecord(record),
                ("results" if i == 2 else "metrics"): MetricRecord(metrics),
                "site": ConfigRecord({"name": name, "note": "hello"}),
            }
        )
        replies.append(wire(Message(content, reply_to=sent[node])))
    got, metrics = strategy.aggregate_train(1, replies)
    for key in initial_model:
        np.testing.assert_allclose(got[key].numpy(), _weighted(goods, key), rtol=0, atol=1e-6)
    assert run_dir.log(1).rejected == {} and len(run_dir.log(1).train) == len(GOOD)
    assert "loss" in metrics
    assert run_dir.log(1).train["site-0"]["epsilon"] == 0.5


def test_secure_metrics_only_replies_cannot_break_the_round_log(
    tmp_path, flower_identity, initial_model, logs
):
    """With secure aggregation on, SecureGrid passes each site's own metrics and site record on
    (its update is in the sum): malformed ones are left out of the log, not written into it."""
    strategy, run_dir = make(tmp_path, "secure", secure=True)
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model.items()})
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(GOOD))
    }
    nodes = list(GOOD)
    total_sum = Message(
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": 40, "loss": 0.3}),
                "site": ConfigRecord({"name": "secure-sum", "secagg-sum": True, "secagg-sites": 4}),
            }
        ),
        reply_to=sent[nodes[0]],
    )
    odd = [
        ({"loss": float("nan"), "num-examples": 10}, {}),
        ({"loss": [0.1, 0.2], "num-examples": 10}, {}),
        ({"loss": 0.2, "num-examples": 10, "epsilon": 1.0}, {"history-noise": 5}),
        (
            {"loss": 0.2, "num-examples": 10, "epsilon": 1.0},
            {"history-noise": [b"x"], "history-rate": [0.1], "history-steps": [1]},
        ),
    ]
    per_site = [
        Message(
            RecordDict(
                {
                    "metrics": MetricRecord(metrics),
                    "site": ConfigRecord(
                        {"name": GOOD[node], **about, "secagg-metrics-only": True}
                    ),
                }
            ),
            reply_to=sent[node],
        )
        for node, (metrics, about) in zip(nodes, odd, strict=True)
    ]
    got, _ = strategy.aggregate_train(1, [wire(m) for m in [total_sum, *per_site]])
    for key in initial_model:
        np.testing.assert_array_equal(got[key].numpy(), initial_model[key])
    entry = run_dir.log(1)
    assert sorted(entry.rejected) == sorted(GOOD.values())
    assert entry.train == {} and entry.privacy == {}
    for name in GOOD.values():
        assert name in logs.text
    strict_json(run_dir.end_round(1, {k: v.numpy() for k, v in got.items()})[-1])
