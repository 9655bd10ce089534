"""SecureGrid keys the next round ahead: once a round's unmask replies are in, the same sites'
advertise and share stages for the next round run in the background while the coordinator
unmasks and aggregates. Each site still sees advertise, share, mask, unmask per round, never two
messages at once; other sites, or a site that failed while keyed ahead, make the round key
again; nothing is keyed after the last round. The sites' protocol side is the real one."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedhealth.protocol import keys as K
from fedhealth.protocol.packing import flatten
from fedhealth.serverapp.secure_grid import SecureGrid
from tests.unit.serverapp.test_secure_grid import FakeGrid, _arrays

NODES = (11, 12, 13, 14)
COUNTS = {11: 10, 12: 20, 13: 30, 14: 40}
KEYING = ("train.secagg_advertise", "train.secagg_share")
ROUND = (*KEYING, "train.secagg_mask", "train.secagg_unmask")


class RecordingGrid(FakeGrid):
    """A FakeGrid that records every call's message type and nodes, counts calls that overlap
    (two messages to one site at once), and answers with an error for node 14 in the calls whose
    index is in ``fail_calls``."""

    def __init__(self, updates, counts, fail_calls=(), delay=0.02):
        super().__init__(updates, counts)
        self.delay = delay
        self.calls: list[tuple[str, list[int]]] = []
        self.fail_calls = set(fail_calls)
        self.lock = threading.Lock()
        self.overlaps = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not self.lock.acquire(blocking=False):
            self.overlaps += 1
            self.lock.acquire()
        try:
            time.sleep(self.delay)  # a call takes time: an overlapping one would be caught
            index = len(self.calls)
            kind = messages[0].metadata.message_type
            self.calls.append((kind, sorted(m.metadata.dst_node_id for m in messages)))
            if kind == "evaluate":
                return [
                    Message(RecordDict({"metrics": MetricRecord({})}), reply_to=m) for m in messages
                ]
            replies = super().send_and_receive(messages, timeout=timeout)
            if index in self.fail_calls:
                replies = [
                    Message(Error(1001, "site down"), reply_to=m)
                    if m.metadata.dst_node_id == 14
                    else r
                    for m, r in zip(messages, replies, strict=True)
                ]
            return replies
        finally:
            self.lock.release()


def _round(secure, updates, server_round, nodes=NODES):
    instructions = [
        Message(
            RecordDict(
                {
                    "arrays": updates[nodes[0]],
                    "config": ConfigRecord({K.SERVER_ROUND: server_round}),
                }
            ),
            n,
            "train",
        )
        for n in nodes
    ]
    return list(secure.send_and_receive(instructions, timeout=10))


def _check_sum(replies, updates, summed):
    (result,) = [r for r in replies if r.has_content() and "arrays" in r.content]
    weights = np.array([COUNTS[n] for n in summed], dtype=np.float64)
    expected = sum(w * flatten(updates[n]) for w, n in zip(weights, summed, strict=True))
    np.testing.assert_allclose(
        flatten(result.content["arrays"]), expected / weights.sum(), atol=1e-4
    )
    assert result.content["metrics"]["num-examples"] == int(weights.sum())


def _wait_for(grid, calls):
    deadline = time.monotonic() + 10
    while len(grid.calls) < calls and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(grid.calls)


@pytest.fixture
def secure_grid(flower_identity):
    """Make SecureGrids; each one's keying ahead is waited for before the task identity goes."""
    made: list[SecureGrid] = []

    def make(grid, **kwargs):
        made.append(SecureGrid(grid, clipping_range=4.0, max_examples=100, **kwargs))
        return made[-1]

    yield make
    for secure in made:
        secure.join()


@pytest.fixture
def updates():
    rng = np.random.default_rng(0)
    return {n: _arrays(rng) for n in NODES}


def test_the_next_round_is_keyed_while_the_coordinator_aggregates(updates, secure_grid):
    grid = RecordingGrid(updates, COUNTS)
    secure = secure_grid(grid, last_round=3)
    _check_sum(_round(secure, updates, 1), updates, NODES)
    # round 2's advertise and share are sent with no call for round 2 yet
    assert _wait_for(grid, 6) == 6
    assert [kind for kind, _ in grid.calls[4:]] == list(KEYING)
    list(secure.send_and_receive([Message(RecordDict(), 11, "evaluate")]))  # waits for them
    for server_round in (2, 3):
        _check_sum(_round(secure, updates, server_round), updates, NODES)
    time.sleep(0.2)
    kinds = [kind for kind, _ in grid.calls if kind != "evaluate"]
    assert kinds == list(ROUND) * 3  # each round keyed once; nothing after the last round
    assert grid.calls[6][0] == "evaluate"  # after the keying, not during it
    assert grid.overlaps == 0


def test_without_a_last_round_nothing_is_keyed_ahead(updates, secure_grid):
    grid = RecordingGrid(updates, COUNTS)
    secure = secure_grid(grid)
    _round(secure, updates, 1)
    time.sleep(0.2)
    assert [kind for kind, _ in grid.calls] == list(ROUND)


def test_other_sites_next_round_are_keyed_in_the_round(updates, secure_grid):
    grid = RecordingGrid(updates, COUNTS)
    secure = secure_grid(grid, last_round=3)
    _round(secure, updates, 1)
    _check_sum(_round(secure, updates, 2, nodes=(11, 12, 13)), updates, (11, 12, 13))
    assert grid.calls[4:8] == [(kind, list(NODES)) for kind in KEYING] * 1 + [
        (kind, [11, 12, 13]) for kind in KEYING
    ]
    assert grid.overlaps == 0


@pytest.mark.parametrize("failed_call", [4, 5], ids=["advertise", "share"])
def test_a_site_failing_while_keyed_ahead_gets_another_chance_in_the_round(
    updates, secure_grid, failed_call, caplog
):
    caplog.set_level(logging.INFO, "fedhealth.secagg")
    grid = RecordingGrid(updates, COUNTS, fail_calls={failed_call})
    secure = secure_grid(grid, last_round=3)
    _round(secure, updates, 1)
    replies = _round(secure, updates, 2)
    _check_sum(replies, updates, NODES)  # keyed again: the site that failed is summed
    assert not [r for r in replies if r.has_error()]
    assert [kind for kind, _ in grid.calls[4:10]] == [*KEYING, *ROUND]
    assert any("keying again" in m for m in caplog.messages)


def test_only_the_rounds_survivors_are_keyed_ahead(updates, secure_grid):
    grid = RecordingGrid(updates, COUNTS, fail_calls={2})  # site 14 fails round 1's mask stage
    secure = secure_grid(grid, last_round=3)
    _check_sum(_round(secure, updates, 1), updates, (11, 12, 13))
    _check_sum(_round(secure, updates, 2), updates, NODES)  # 14 is back: keyed in the round
    assert grid.calls[4:8] == [(kind, [11, 12, 13]) for kind in KEYING] + [
        (kind, list(NODES)) for kind in KEYING
    ]


def test_a_call_with_nothing_to_send_does_not_wait_for_the_keying(updates, secure_grid):
    grid = RecordingGrid(updates, COUNTS, delay=0.3)
    secure = secure_grid(grid, last_round=3)
    _round(secure, updates, 1)
    started = time.monotonic()
    assert list(secure.send_and_receive([], timeout=10)) == []  # a folded round's evaluate
    assert time.monotonic() - started < 0.2
    assert len(grid.calls) < 6  # the keying (two calls of 0.3 s) still runs
    _round(secure, updates, 2)
    assert [kind for kind, _ in grid.calls[:8]] == list(ROUND) * 2


def test_a_run_that_ends_early_drops_the_keys_set_up_ahead(updates, secure_grid):
    grid = RecordingGrid(updates, COUNTS)
    secure = secure_grid(grid, last_round=3)
    _round(secure, updates, 1)
    secure.finish()
    assert len(grid.calls) == 6  # waited for
    _round(secure, updates, 2)  # a resumed run keys afresh
    assert [kind for kind, _ in grid.calls[6:10]] == list(ROUND)


def test_protocol_ids_are_drawn_afresh_for_every_sum(secure_grid):
    """With fewer neighbours than sites, a site's neighbours change from round to round, whatever
    the node ids (a site cannot pick its neighbours by the id it connects with)."""
    secure = secure_grid(object(), degree=2)
    nodes = tuple(range(101, 109))
    neighbourhoods = set()
    for _ in range(10):
        keys = secure._new_keys(nodes)
        graph = keys.server.graph
        neighbourhoods.add(frozenset(keys.nodes[p - 1] for p in graph[keys.nodes.index(101) + 1]))
    assert sorted(keys.nodes) == list(nodes)
    assert len(neighbourhoods) > 1
