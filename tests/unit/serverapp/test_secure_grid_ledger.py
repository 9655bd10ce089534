"""SecureGrid with a ledger watch: a site whose reported ledger shrank is left out of the sum.

Every DP-trained mask-stage reply reports where the site's ledger stands (entries, head, the head
it extends). The coordinator checks it against what the site reported earlier in the run
(:class:`fedhealth.runs.ledgers.LedgerWatch`) before the site's masked update enters the secure
sum: a ledger that got shorter means an under-counted epsilon, so that site is dropped (its masks
removed as a dropped site's) and the others are summed as usual. The sites' protocol side is the
real one (:func:`fedhealth.clientapp.secagg_stages.handle_stage`); only training is replaced.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedhealth.clientapp.secagg_stages import STATE_KEY, handle_stage
from fedhealth.protocol import keys as K
from fedhealth.protocol.packing import flatten
from fedhealth.runs.ledgers import LedgerWatch
from fedhealth.security.secagg import SecAggSite
from fedhealth.serverapp.secure_grid import SecureGrid

SHAPES = {"a": (3, 4), "b": (5,)}
NODES = (11, 12, 13, 14)
COUNTS = {11: 10, 12: 20, 13: 30, 14: 40}
LOSSES = {11: 0.2, 12: 0.4, 13: 3.0, 14: 0.8}
SHRINKER = 13


def _name(node: int) -> str:
    return f"site-{node}"


class LedgerGrid:
    """Answers every stage as real sites would; in the mask stage each site masks its fixed
    update and loss (as the site's mask stage does, without training) and reports epsilon with
    ``ledgers[node]`` = (entries, head, head it extends)."""

    def __init__(self, updates, ledgers):
        self.updates, self.ledgers = updates, ledgers
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in updates
        }

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = msg.metadata.message_type.split(".", 1)[1]
            if stage != K.STAGE_MASK:
                replies.append(handle_stage(msg, self.contexts[node], stage))
                continue
            context = self.contexts[node]
            agent = SecAggSite.from_state(dict(context.state[STATE_KEY].items()))
            rec = dict(msg.content[K.SECAGG].items())
            received = {
                int(i): bytes(b)
                for i, b in zip(rec[K.SECAGG_FROM], rec[K.SECAGG_BLOBS], strict=True)
                if int(i)
            }
            # the update, then its loss, inside the sum; the count is added as the last word
            vector = np.concatenate(
                [flatten(self.updates[node]), np.array([LOSSES[node]], dtype=np.float32)]
            )
            masked = agent.masked_input(
                vector,
                COUNTS[node],
                received,
                rng=np.random.default_rng(node),
            )
            context.state[STATE_KEY] = ConfigRecord(agent.to_state())
            entries, head, head_prev = self.ledgers[node]
            metrics = MetricRecord(  # what a DP site releases in plain beside its masked update
                {
                    K.EPSILON: 1.5,
                    K.LEDGER_ENTRIES: entries,
                    K.LEDGER_HEAD: head,
                    K.LEDGER_HEAD_PREV: head_prev,
                }
            )
            content = RecordDict(
                {
                    K.MASKED: ArrayRecord({K.MASKED: Array(masked)}),
                    K.METRICS: metrics,
                    K.SITE: ConfigRecord({K.SITE_NAME: _name(node)}),
                }
            )
            replies.append(Message(content, reply_to=msg))
        return replies


def _updates() -> dict[int, ArrayRecord]:
    rng = np.random.default_rng(7)
    return {
        n: ArrayRecord(
            {k: Array(rng.normal(0, 0.3, s).astype(np.float32)) for k, s in SHAPES.items()}
        )
        for n in NODES
    }


def _seen(entries: int, head: int, head_prev: int) -> dict[str, int | str]:
    """A report as :func:`fedhealth.runs.ledgers.ledger_fields` gives it (hashes as hex)."""
    return {
        "ledger_entries": entries,
        "ledger_head": f"{head:015x}",
        "ledger_head_prev": f"{head_prev:015x}",
    }


def _round(grid, watch, server_round: int, updates) -> list[Message]:
    secure = SecureGrid(
        grid, threshold_fraction=0.51, clipping_range=4.0, max_examples=100, ledgers=watch
    )
    instructions = [
        Message(
            RecordDict(
                {
                    K.ARRAYS: updates[11],
                    K.CONFIG: ConfigRecord({K.SERVER_ROUND: server_round}),
                }
            ),
            n,
            "train",
        )
        for n in NODES
    ]
    return list(secure.send_and_receive(instructions, timeout=10))


def _check_sum(replies: list[Message], summed: list[int], updates) -> None:
    sums = [r for r in replies if r.has_content() and K.ARRAYS in r.content]
    assert len(sums) == 1, "the round produced no secure sum"
    (aggregate,) = sums
    assert aggregate.content[K.SITE][K.SECAGG_SITES] == len(summed)
    weights = np.array([COUNTS[n] for n in summed], dtype=np.float64)
    expected = sum(w * flatten(updates[n]) for w, n in zip(weights, summed, strict=True))
    np.testing.assert_allclose(
        flatten(aggregate.content[K.ARRAYS]), expected / weights.sum(), atol=1e-4
    )
    assert aggregate.content[K.METRICS][K.NUM_EXAMPLES] == int(weights.sum())
    mean_loss = sum(w * LOSSES[n] for w, n in zip(weights, summed, strict=True)) / weights.sum()
    assert aggregate.content[K.METRICS][K.LOSS] == pytest.approx(mean_loss, abs=1e-4)
    per_site = {
        r.content[K.SITE][K.SITE_NAME]
        for r in replies
        if r.has_content() and K.SECAGG_METRICS_ONLY in r.content[K.SITE]
    }
    assert per_site == {_name(n) for n in summed}


@pytest.mark.parametrize("shrank", [True, False], ids=["shrank", "grew"])
def test_a_site_whose_ledger_shrank_is_left_out_of_the_sum(flower_identity, caplog, shrank):
    updates = _updates()
    watch = LedgerWatch()
    # what the coordinator saw in round 1: site-11 with 3 entries, the shrinker with 5
    watch.check(_name(11), 1, _seen(3, 0xA3, 0xA2))
    watch.check(_name(SHRINKER), 1, _seen(5, 0xC5, 0xC4))
    ledgers = {
        11: (4, 0xA4, 0xA3),  # one more entry, extending the head seen before
        12: (1, 0xB1, 0),  # first report of the run
        SHRINKER: (2, 0xC2, 0xC1) if shrank else (6, 0xC6, 0xC5),
        14: (9, 0xD9, 0xD8),
    }
    caplog.set_level(logging.WARNING, logger="fedhealth.secagg")
    replies = _round(LedgerGrid(updates, ledgers), watch, 2, updates)
    if not shrank:  # the control: every site summed
        _check_sum(replies, list(NODES), updates)
        assert watch.stopped == {} and watch.seen[_name(SHRINKER)].entries == 6
        return
    _check_sum(replies, [11, 12, 14], updates)
    assert set(watch.stopped) == {_name(SHRINKER)}
    assert "5 entries" in watch.stopped[_name(SHRINKER)]
    assert any(
        "secagg_mask" in m and "dropped" in m and "LedgerShrank" in m for m in caplog.messages
    ), caplog.messages
    assert watch.seen[_name(11)].entries == 4 and watch.seen[_name(12)].entries == 1
    assert watch.seen[_name(SHRINKER)].entries == 5, "the shrunk report is not remembered"


def test_a_stopped_site_stays_out_for_the_rest_of_the_run(flower_identity):
    updates = _updates()
    watch = LedgerWatch()
    watch.check(_name(SHRINKER), 1, _seen(5, 0xC5, 0xC4))
    ledgers = {11: (1, 0xA1, 0), 12: (1, 0xB1, 0), SHRINKER: (2, 0xC2, 0xC1), 14: (1, 0xD1, 0)}
    grid = LedgerGrid(updates, ledgers)
    _check_sum(_round(grid, watch, 2, updates), [11, 12, 14], updates)
    # round 3: the shrinker now reports a ledger that would look fine on its own
    grid.ledgers = {
        11: (2, 0xA2, 0xA1),
        12: (2, 0xB2, 0xB1),
        SHRINKER: (6, 0xC6, 0xC5),
        14: (2, 0xD2, 0xD1),
    }
    _check_sum(_round(grid, watch, 3, updates), [11, 12, 14], updates)


def test_a_stopped_site_that_leaves_out_its_epsilon_stays_out(flower_identity):
    updates = _updates()
    watch = LedgerWatch()
    watch.check(_name(SHRINKER), 1, _seen(5, 0xC5, 0xC4))
    ledgers = {11: (1, 0xA1, 0), 12: (1, 0xB1, 0), SHRINKER: (2, 0xC2, 0xC1), 14: (1, 0xD1, 0)}
    grid = LedgerGrid(updates, ledgers)
    _check_sum(_round(grid, watch, 2, updates), [11, 12, 14], updates)
    answer = grid.send_and_receive

    def without_epsilon(messages, *, timeout=None):
        replies = answer(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == SHRINKER and reply.has_content():
                if K.MASKED in reply.content:
                    reply.content[K.METRICS] = MetricRecord({K.DELTA: 1e-5})
        return replies

    grid.send_and_receive = without_epsilon
    grid.ledgers = {
        11: (2, 0xA2, 0xA1),
        12: (2, 0xB2, 0xB1),
        SHRINKER: (6, 0, 0),
        14: (2, 0xD2, 0xD1),
    }
    _check_sum(_round(grid, watch, 3, updates), [11, 12, 14], updates)
