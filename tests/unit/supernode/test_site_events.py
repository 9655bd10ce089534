"""The ClientApp -> site daemon contract: every site event written, read back, applied."""

from __future__ import annotations

import json
import logging
import math

import pytest

from fedhealth.clientapp import events
from fedhealth.clientapp.events import (
    EVENT_MARKER,
    EVENT_TYPES,
    BudgetRefused,
    Evaluated,
    RoundFailed,
    RoundStarted,
    SiteEvent,
    Trained,
    parse_line,
)
from fedhealth.clientapp.sitelog import EventFormatter, emit_failure
from fedhealth.errors import BudgetExhausted, DataError, ErrorCode, EventError
from fedhealth.service.supervisor import JsonFormatter, Supervisor
from fedhealth.supernode.sitestatus import watch_line

EXAMPLES = [
    RoundStarted(site="a", round=3, phase="train"),
    Trained(site="a", round=3, loss=0.5),
    Trained(site="a", round=3, loss=0.5, epsilon=2.5, epsilon_cap=8.0),
    Evaluated(site="a", round=2, dice=0.75, loss=0.3),
    RoundFailed(site="unknown", phase="secagg_share", code=1003),
    RoundFailed(site="a", round=4, phase="train", code=1001),
    BudgetRefused(site="a", round=5, epsilon=7.9, epsilon_cap=8.0),
]


def _line(event: events.Event, msg: str = "some words %s", *args: object) -> str:
    record = logging.LogRecord(
        "fedhealth.site", logging.INFO, __file__, 1, msg, args or ("x",), None
    )
    record.fields = events.event_fields(event)
    return EventFormatter().format(record)


def test_every_event_name_has_one_type_and_each_type_its_name():
    assert set(EVENT_TYPES) == set(SiteEvent)
    assert all(cls.kind is kind for kind, cls in EVENT_TYPES.items())
    assert {type(e) for e in EXAMPLES} == set(EVENT_TYPES.values())


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind.value)
def test_each_event_reads_back_from_its_printed_line(event):
    line = _line(event)
    assert "\n" not in line and line.index("some words x") < line.index(EVENT_MARKER)
    assert parse_line(line) == event
    assert parse_line(f"INFO :      [relay prefix] {line}") == event  # a prefix is skipped
    # the daemon's own JSON log format carries the same fields
    record = logging.LogRecord("fedhealth.site", logging.INFO, __file__, 1, "w", (), None)
    record.fields = events.event_fields(event)
    assert events.from_fields(json.loads(JsonFormatter().format(record))) == event


def test_a_multiline_message_keeps_the_event_on_its_first_line():
    line = _line(Trained(site="a", round=1, loss=0.1), "first\nsecond %s")
    first, second = line.split("\n")
    assert parse_line(first) == Trained(site="a", round=1, loss=0.1)
    assert second == "second x" and parse_line(second) is None


def test_a_marker_in_the_words_does_not_hide_the_event():
    line = _line(Evaluated(site="a", round=1, dice=0.5, loss=0.2), f"look: {EVENT_MARKER}%s")
    assert parse_line(line) == Evaluated(site="a", round=1, dice=0.5, loss=0.2)


def test_lines_without_a_known_event_are_not_events():
    assert parse_line("INFO fedhealth.site: site a round 3: trained, loss 0.5000") is None
    assert parse_line(f'x {EVENT_MARKER}{{"event": "child.output"}}') is None  # not ours
    assert parse_line(f'x {EVENT_MARKER}{{"event": "site.round.new-in-v2", "a": 1}}') is None
    assert parse_line(f"x {EVENT_MARKER}not json") is None
    # an int where a float is declared (another JSON writer) is taken as that float
    got = parse_line(
        f'x {EVENT_MARKER}{{"event": "site.round.trained", "site": "a", '
        '"round": 1, "loss": 1, "extra": "ignored"}'
    )
    assert got == Trained(site="a", round=1, loss=1.0) and isinstance(got.loss, float)


@pytest.mark.parametrize(
    "payload",
    [
        {"event": "site.round.trained", "site": "a", "round": 1},  # no loss
        {"event": "site.round.trained", "site": "a", "round": "1", "loss": 0.5},
        {"event": "site.round.trained", "site": "a", "round": True, "loss": 0.5},
        {
            "event": "site.budget.refused",
            "site": "a",
            "round": 1,
            "epsilon": None,
            "epsilon_cap": 8.0,
        },
    ],
)
def test_a_malformed_event_is_an_error_and_leaves_the_status_alone(payload, tmp_path):
    line = f"x {EVENT_MARKER}{json.dumps(payload)}"
    with pytest.raises(EventError, match=payload["event"]):
        parse_line(line)
    sup = Supervisor(tmp_path / "status.json")
    relayed = watch_line(sup, "clientapp-executor", line)  # the one record the daemon logs
    assert relayed.level == logging.WARNING and "unreadable site event" in relayed.msg
    assert relayed.fields["event"] == "site.event.unreadable"
    assert "last_trained" not in sup.status and "budget" not in sup.status


def test_each_event_sets_its_status(tmp_path):
    sup = Supervisor(tmp_path / "status.json")
    watch_line(sup, "c", _line(RoundStarted(site="a", round=3, phase="train")))
    assert sup.status["activity"].startswith("train round 3 since ")
    watch_line(
        sup, "c", _line(Trained(site="a", round=3, loss=math.nan, epsilon=1.0, epsilon_cap=8.0))
    )
    assert sup.status["activity"] == "idle"
    assert sup.status["last_trained"]["loss"] is None  # NaN is no JSON
    assert sup.status["last_trained"]["epsilon"] == 1.0
    watch_line(sup, "c", _line(Evaluated(site="a", round=3, dice=0.8, loss=0.2)))
    assert sup.status["last_evaluated"]["dice"] == 0.8
    watch_line(sup, "c", _line(RoundStarted(site="a", round=4, phase="evaluate")))
    watch_line(sup, "c", _line(RoundFailed(site="a", round=4, phase="evaluate", code=1001)))
    assert sup.status["activity"] == "idle"
    assert sup.status["last_failed"]["code"] == 1001 and sup.status["last_failed"]["round"] == 4
    watch_line(sup, "c", _line(BudgetRefused(site="a", round=5, epsilon=7.9, epsilon_cap=8.0)))
    assert sup.status["budget_exhausted"] is True
    assert sup.status["activity"] == "budget exhausted: refusing to train"
    json.loads((tmp_path / "status.json").read_text(), parse_constant=pytest.fail)  # valid JSON


def test_a_budget_refusal_is_reported_once_not_also_as_a_failure(caplog):
    logger = logging.getLogger("tests.site")
    with caplog.at_level(logging.INFO, logger="tests.site"):
        emit_failure(logger, BudgetExhausted("over"), site="a", server_round=1, phase="train")
        assert not caplog.records
        emit_failure(logger, DataError("bad file"), site="a", server_round=1, phase="train")
    (record,) = caplog.records
    assert record.fields == {  # type: ignore[attr-defined]
        "event": "site.round.failed",
        "site": "a",
        "round": 1,
        "phase": "train",
        "code": int(ErrorCode.SITE_DATA),
    }
