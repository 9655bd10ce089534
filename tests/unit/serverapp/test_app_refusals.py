"""A site that refused the run's app: the coordinator names the site and the catalogued error."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode as FlowerErrorCode

from fedhealth.errors import ERROR_HELP, ErrorCode
from fedhealth.runs.records import RoundLog
from fedhealth.serverapp.replies import sort_replies

pytestmark = pytest.mark.usefixtures("flower_identity")


def _error(node: int, code: int, reason: str) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(Error(code, reason), reply_to=ins)


@pytest.mark.parametrize("phase", ["train", "evaluate"])
def test_the_gates_refusal_names_the_site_and_the_code(phase, caplog):
    reason = f"site hospital-a: {ERROR_HELP[ErrorCode.SITE_APP_REFUSED]} (FAB sha256 0123)"
    replies = [
        _error(4, int(ErrorCode.SITE_APP_REFUSED), reason),
        _error(5, int(FlowerErrorCode.INVALID_FAB), "The FAB could not be verified."),
    ]
    with caplog.at_level(logging.ERROR, "fedhealth.coordinator"):
        kept = sort_replies(
            replies, server_round=1, phase=phase, entry=(entry := RoundLog()), node_names={}
        )
    assert kept == []
    rejected = entry.rejected if phase == "train" else entry.rejected_evaluate
    assert rejected["hospital-a"].startswith("app not approved at site hospital-a (E1006)")
    assert rejected["node-5"].startswith("app not approved at site node-5 (E1006)")
    assert entry.failed[phase] == 2 and not entry.refused
    assert "app not approved at site hospital-a" in caplog.text


def test_a_refusal_cannot_be_filed_under_another_nodes_name():
    reason = f"site hospital-a: {ERROR_HELP[ErrorCode.SITE_APP_REFUSED]}"
    sort_replies(
        [_error(9, int(ErrorCode.SITE_APP_REFUSED), reason)],
        server_round=1,
        phase="train",
        entry=(entry := RoundLog()),
        node_names={4: "hospital-a"},
    )
    assert list(entry.rejected) == ["node-9"]
