"""Replies are filed under the enrolled name of the node that sent them (deployment): a node
cannot claim another site's name, and a node nobody enrolled is refused."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from fedhealth.errors import ErrorCode
from fedhealth.runs.records import RoundLog
from fedhealth.serverapp.delegating_grid import DelegatingGrid
from fedhealth.serverapp.enrolled import ENV_SITE_NAMES, EnrolledGrid
from fedhealth.serverapp.replies import sort_replies
from tests.unit.serverapp.strategy_replies import _arrays, _reply

pytestmark = pytest.mark.usefixtures("flower_identity")


class FakeGrid(DelegatingGrid):
    """The SuperLink's view: node id -> the name the operator registered, and the replies."""

    def __init__(self, names: dict[int, str], replies: list[Message]) -> None:
        super().__init__(grid=None)  # type: ignore[arg-type]
        self.nodes, self.replies = names, replies

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, name=name) for n, name in self.nodes.items()]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return list(self.replies)


def sorted_replies(grid: Grid, entry: RoundLog) -> list[tuple[str, Message]]:
    replies = grid.pull_messages(["m"])
    return sort_replies(replies, server_round=1, phase="train", entry=entry, node_names={})


def test_a_node_claiming_another_sites_name_is_filed_under_its_enrolled_name():
    rng = np.random.default_rng(0)
    replies = [
        _reply(1, "hospital-b", _arrays(rng), 10),  # node 1 is hospital-a, claims to be b
        _reply(2, "hospital-b", _arrays(rng), 10),
    ]
    grid = EnrolledGrid(FakeGrid({1: "hospital-a", 2: "hospital-b"}, replies))
    kept = sorted_replies(grid, entry := RoundLog())
    assert [(name, m.metadata.src_node_id) for name, m in kept] == [
        ("hospital-a", 1),
        ("hospital-b", 2),
    ]
    assert not entry.rejected and not entry.failed["train"]


def test_a_reply_from_a_node_nobody_enrolled_is_refused():
    rng = np.random.default_rng(0)
    replies = [_reply(1, "hospital-a", _arrays(rng), 10), _reply(3, "hospital-a", _arrays(rng), 9)]
    grid = EnrolledGrid(FakeGrid({1: "hospital-a"}, replies))
    pulled = list(grid.pull_messages(["m"]))
    assert pulled[1].has_error() and pulled[1].error.code == ErrorCode.SITE_NOT_ENROLLED
    kept = sort_replies(
        pulled, server_round=1, phase="train", entry=(entry := RoundLog()), node_names={}
    )
    assert [(name, m.metadata.src_node_id) for name, m in kept] == [("hospital-a", 1)]
    assert entry.failed["train"] == 1


def test_an_enrolled_nodes_error_reply_names_the_enrolled_site():
    ins = Message(RecordDict(), dst_node_id=2, message_type="train")
    lying = Message(Error(1004, "site hospital-a: over budget"), reply_to=ins)
    grid = EnrolledGrid(FakeGrid({1: "hospital-a", 2: "hospital-b"}, [lying]))
    sort_replies(
        grid.pull_messages(["m"]),
        server_round=1,
        phase="train",
        entry=(entry := RoundLog()),
        node_names={},
    )
    assert entry.refused == {"hospital-b": "budget"}


def test_without_enrolment_names_stay_self_reported_unless_the_coordinator_requires_them(
    monkeypatch,
):
    rng = np.random.default_rng(0)
    replies = [_reply(5, "lab-site", _arrays(rng), 10)]
    monkeypatch.delenv(ENV_SITE_NAMES, raising=False)
    kept = sorted_replies(EnrolledGrid(FakeGrid({}, replies)), RoundLog())
    assert [name for name, _ in kept] == ["lab-site"]  # an insecure lab SuperLink: no names
    monkeypatch.setenv(ENV_SITE_NAMES, "enrolled")  # as `fedhealth server run` sets it
    kept = sorted_replies(EnrolledGrid(FakeGrid({}, replies)), entry := RoundLog())
    assert kept == [] and entry.failed["train"] == 1
