"""SecureGrid against a site that sends garbage in any protocol stage: that site is dropped with a
logged reason, the honest sites' sum still comes out right (or the round fails cleanly), and the
coordinator never crashes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedhealth.clientapp.secagg_stages import STATE_KEY, handle_stage
from fedhealth.protocol.keys import STAGES
from fedhealth.protocol.packing import flatten
from fedhealth.security.secagg import SecAggSite
from fedhealth.serverapp.secure_grid import SecureGrid

SHAPES = {"a": (3, 4), "b": (5,)}


class FakeGrid:
    """Answers each stage as real sites would (protocol code of the site side), except that
    ``evil`` replaces its reply in ``bad_stage`` with ``garbage``."""

    def __init__(self, updates, counts, evil=None, bad_stage=None, garbage=None):
        self.updates, self.counts = updates, counts
        self.evil, self.bad_stage, self.garbage = evil, bad_stage, garbage
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in updates
        }

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = msg.metadata.message_type.split(".", 1)[1]
            if node == self.evil and stage == self.bad_stage:
                replies.append(Message(self.garbage(), reply_to=msg))
                continue
            if stage == "secagg_mask":
                context = self.contexts[node]
                agent = SecAggSite.from_state(dict(context.state[STATE_KEY].items()))
                rec = dict(msg.content["secagg"].items())
                received = {
                    int(i): bytes(b)
                    for i, b in zip(rec["from"], rec["blobs"], strict=True)
                    if int(i)
                }
                # the update, then its loss: both summed inside the mask (minimal outputs)
                vector = np.concatenate([flatten(self.updates[node]), [loss_of(node)]])
                masked = agent.masked_input(
                    vector,
                    self.counts[node],
                    received,
                    rng=np.random.default_rng(node),
                )
                context.state[STATE_KEY] = ConfigRecord(agent.to_state())
                replies.append(
                    Message(
                        RecordDict(
                            {
                                "masked": ArrayRecord({"masked": Array(masked)}),
                                "metrics": MetricRecord({}),  # count and loss: in the sum
                                "site": ConfigRecord({"name": f"site-{node}"}),
                            }
                        ),
                        reply_to=msg,
                    )
                )
            else:
                replies.append(handle_stage(msg, self.contexts[node], stage))
        return replies


def loss_of(node: int) -> float:
    """Each site's training loss (it travels inside the masked vector)."""
    return node / 20


def _arrays(rng):
    return ArrayRecord(
        {k: Array(rng.normal(0, 0.3, s).astype(np.float32)) for k, s in SHAPES.items()}
    )


GARBAGE = {
    "secagg_advertise": [
        lambda: RecordDict({"secagg": ConfigRecord({"c": b"x" * 4096, "s": b"y"})}),
        lambda: RecordDict({"secagg": ConfigRecord({"nothing": 1})}),
        lambda: RecordDict(),
    ],
    "secagg_share": [
        lambda: RecordDict({"secagg": ConfigRecord({"to": [1, 2], "blobs": [b"z"]})}),
        lambda: RecordDict({"secagg": ConfigRecord({"to": ["nan"], "blobs": [b"z"]})}),
        lambda: RecordDict({"metrics": MetricRecord({"x": 1})}),
    ],
    "secagg_mask": [
        lambda: RecordDict(
            {
                "masked": ArrayRecord({"masked": Array(np.zeros(3, np.uint32))}),
                "metrics": MetricRecord({"loss": 0.1, "num-examples": 5}),
                "site": ConfigRecord({"name": "x"}),
            }
        ),
        lambda: RecordDict(
            {
                "masked": ArrayRecord({"masked": Array(np.zeros(18, np.float32))}),
                "metrics": MetricRecord({"loss": 0.1, "num-examples": 5}),
                "site": ConfigRecord({"name": "x"}),
            }
        ),
        lambda: RecordDict(
            {
                "masked": ArrayRecord({"masked": Array(np.zeros(18, np.uint32))}),
                "metrics": MetricRecord({"loss": float("nan"), "num-examples": 10**9}),
                "site": ConfigRecord({"name": "x"}),
            }
        ),
        lambda: RecordDict({"metrics": MetricRecord({"loss": 0.1})}),
    ],
    "secagg_unmask": [
        lambda: RecordDict({"secagg": ConfigRecord({"owners": [1], "shares": []})}),
        lambda: RecordDict({"secagg": ConfigRecord({"owners": [2], "shares": [b"\x00" * 99]})}),
    ],
}
CASES = [(stage, i) for stage in STAGES for i in range(len(GARBAGE[stage]))]


@pytest.mark.parametrize(("stage", "index"), CASES)
def test_a_malformed_stage_reply_never_crashes_the_coordinator(
    stage, index, flower_identity, caplog
):
    rng = np.random.default_rng(index)
    nodes = [11, 12, 13, 14]
    updates = {n: _arrays(rng) for n in nodes}
    counts = {11: 10, 12: 20, 13: 30, 14: 40}
    grid = FakeGrid(updates, counts, evil=14, bad_stage=stage, garbage=GARBAGE[stage][index])
    secure = SecureGrid(grid, threshold_fraction=0.51, clipping_range=4.0, max_examples=100)
    template = updates[11]
    instructions = [
        Message(RecordDict({"arrays": template, "config": ConfigRecord({})}), n, "train")
        for n in nodes
    ]
    replies = list(secure.send_and_receive(instructions, timeout=10))
    sums = [r for r in replies if r.has_content() and "arrays" in r.content]
    if (stage, index) != ("secagg_unmask", 1):  # a well-formed forged share may go unused
        assert any(("dropped" in m or "failed" in m) for m in caplog.messages), caplog.messages
    if not sums:  # the round failed cleanly (a forged share breaks the unmasking)
        assert stage == "secagg_unmask"
        return
    (result,) = sums
    honest = [11, 12, 13] if stage != "secagg_unmask" else nodes
    weights = np.array([counts[n] for n in honest], dtype=np.float64)
    expected = (
        sum(w * flatten(updates[n]) for w, n in zip(weights, honest, strict=True)) / weights.sum()
    )
    np.testing.assert_allclose(flatten(result.content["arrays"]), expected, atol=1e-4)
    assert result.content["metrics"]["num-examples"] == int(weights.sum())
    mean_loss = sum(w * loss_of(n) for w, n in zip(weights, honest, strict=True)) / weights.sum()
    assert result.content["metrics"]["loss"] == pytest.approx(mean_loss, abs=1e-4)
