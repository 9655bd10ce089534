"""PolledGrid: every reply collected, the deadline kept, no 3 s steps."""

from __future__ import annotations

import time

from fedhealth.serverapp.polling import PolledGrid


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("M", (), {"reply_to_message_id": reply_to})()


class SlowGrid:
    """Replies to message i after 0.2 * i seconds; message "never" is never answered."""

    def __init__(self) -> None:
        self.pulls, self.start = 0, 0.0

    def push_messages(self, messages):
        self.start = time.monotonic()
        return list(messages)

    def pull_messages(self, ids):
        self.pulls += 1
        age = time.monotonic() - self.start
        return [_Reply(i) for i in sorted(ids) if i != "never" and age >= 0.2 * int(i)]

    def get_node_ids(self):
        return [1, 2]


def test_all_replies_arrive_in_fractions_of_a_second():
    grid = SlowGrid()
    t0 = time.monotonic()
    replies = PolledGrid(grid, interval=0.05).send_and_receive(["1", "2", "3"], timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["1", "2", "3"]
    assert time.monotonic() - t0 < 1.5  # Flower's own loop would take 3 s
    assert list(PolledGrid(grid).get_node_ids()) == [1, 2]  # the rest passes through


def test_deadline_returns_what_came():
    t0 = time.monotonic()
    replies = PolledGrid(SlowGrid(), interval=0.05).send_and_receive(["1", "never"], timeout=0.8)
    assert [r.metadata.reply_to_message_id for r in replies] == ["1"]
    assert 0.8 <= time.monotonic() - t0 < 2.0


class StoreGrid:
    """Like the SuperLink's store: a reply waits there, keyed by the id of the message it
    answers, until someone pulls that id."""

    def __init__(self) -> None:
        self.store: dict[str, _Reply] = {}
        self.asked: list[set[str]] = []

    def push_messages(self, messages):
        return list(messages)

    def pull_messages(self, ids):
        self.asked.append(set(ids))
        return [self.store.pop(i) for i in sorted(ids) if i in self.store]


def test_a_reply_that_comes_after_its_round_closed_is_never_read():
    grid = StoreGrid()
    polled = PolledGrid(grid, interval=0.01)
    grid.store["r1-a"] = _Reply("r1-a")
    first = polled.send_and_receive(["r1-a", "r1-b"], timeout=0.2)  # site b misses the deadline
    assert [r.metadata.reply_to_message_id for r in first] == ["r1-a"]
    pulls = len(grid.asked)
    grid.store["r1-b"] = _Reply("r1-b")  # b's late reply lands after round 1 closed
    grid.store["r2-a"], grid.store["r2-b"] = _Reply("r2-a"), _Reply("r2-b")
    second = polled.send_and_receive(["r2-a", "r2-b"], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in second) == ["r2-a", "r2-b"]
    assert "r1-b" in grid.store  # never pulled: round 2 asks only for its own messages
    assert all(ids <= {"r2-a", "r2-b"} for ids in grid.asked[pulls:])
