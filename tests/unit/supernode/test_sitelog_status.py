"""``fedhealth site status`` in words for people and as JSON for machines; the egress log's lines
say when and which run."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedhealth.cli import main
from fedhealth.clientapp.egress import EgressLog
from fedhealth.protocol import keys as K
from fedhealth.supernode.settings import load
from fedhealth.supernode.sitestatus import status

DAEMON = {
    "state": "connected",
    "since": "2026-01-01T10:00:00+00:00",
    "coordinator": "link.example.org:9092",
    "node_id": "4529479987171682396",
    "run_id": 7,
    "activity": "idle",
    "last_trained": {
        "round": 4,
        "loss": 0.25,
        "epsilon": 3.5,
        "epsilon_cap": 8.0,
        "at": "2026-01-01T10:05:00+00:00",
    },
    "last_evaluated": {"round": 3, "dice": 0.8123, "at": "2026-01-01T10:05:00+00:00"},
    "last_failed": {"round": 2, "phase": "evaluate", "code": 1001, "at": "2026-01-01T10:03:00"},
    "children": {"supernode": {"pid": 11, "restarts": 2, "last_exit": 1}},
}


def _site(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "status.json").write_text(json.dumps({**DAEMON, "pid": os.getpid()}))
    return [
        "--insecure",
        "name=hospital-a",
        "coordinator=link.example.org:9092",
        f"data_dir={tmp_path}",
        f"ledger_dir={tmp_path / 'ledger'}",
        f"state_dir={state}",
    ]


def test_site_status_prints_aligned_words_not_python_dicts(tmp_path, capsys):
    assert main(["site", "status", *_site(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "site hospital-a"
    assert not [ln for ln in lines if re.search(r"[{}]|': ", ln)], lines  # no dict reprs
    rows = dict(re.match(r"^  (\S.*?)  +(\S.*)$", ln).groups() for ln in lines[1:])
    assert rows["daemon"] == f"connected since 2026-01-01T10:00:00+00:00 (pid {os.getpid()})"
    assert rows["last trained"] == (
        "round 4, loss 0.2500, epsilon 3.5000 of 8 (2026-01-01T10:05:00+00:00)"
    )
    assert rows["last evaluated"].startswith("round 3, Dice 0.8123")
    assert rows["last failed"].startswith("round 2, evaluate: error 1001")
    assert rows["node id"] == "4529479987171682396" and rows["flower run"] == "7"
    assert rows["restarts"] == "supernode 2 (last exit 1)"
    assert rows["privacy"] == "epsilon 0.0000 of 8 spent, 0 round(s) trained"
    # one column: every value starts where the others do
    assert len({len(ln) - len(ln[2:].split("  ", 1)[1].lstrip()) for ln in lines[1:]}) == 1


def test_site_status_json_is_the_report_for_machines(tmp_path, capsys):
    args = _site(tmp_path)
    assert main(["site", "status", "--json", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(status(load(None, args[1:], insecure=True))))
    assert printed["daemon"]["last_trained"]["round"] == 4


def test_site_status_of_a_daemon_never_started(tmp_path, capsys):
    args = _site(tmp_path)
    (tmp_path / "state" / "status.json").unlink()
    assert main(["site", "status", *args]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "site hospital-a",
        "  daemon   never started",
    ]


def _egress(tmp_path, config: dict, run_config: dict) -> dict:
    msg = Message(RecordDict({K.CONFIG: ConfigRecord(config)}), 0, "train")
    context = Context(
        run_id=msg.metadata.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=run_config,
    )
    reply = Message(RecordDict({"metrics": MetricRecord({"loss": 0.5})}), reply_to=msg)
    log = tmp_path / "egress.jsonl"
    before = datetime.now(UTC)
    assert EgressLog(log)(msg, context, lambda m, c: reply) is reply
    line = json.loads(log.read_text().splitlines()[-1])
    when = datetime.fromisoformat(line["time"])
    assert when.utcoffset() == timedelta(0) and before - timedelta(seconds=1) <= when
    assert line["run_id"] == msg.metadata.run_id == 1
    return line


def test_an_egress_line_says_when_and_which_run(tmp_path, flower_identity):
    line = _egress(tmp_path, {K.SERVER_ROUND: 3, K.RUN_KEY: "trial-7@0123456789abcdef"}, {})
    assert line["run"] == "trial-7" and line["round"] == 3 and line["type"] == "train"
    assert set(line) >= {"bytes", "sha256", "error"}
    # no run key in the message (a secure-aggregation stage): the run config names the run
    config = {K.RUN_CONFIG: json.dumps({"run_name": "trial-8", "rounds": 2})}
    assert _egress(tmp_path, {K.SERVER_ROUND: 3}, config)["run"] == "trial-8"
    assert _egress(tmp_path, {}, {})["run"] is None
    assert len((tmp_path / "egress.jsonl").read_text().splitlines()) == 3  # appended, kept
