"""The coordinator's watch over each site's ledger: it may only grow within a run (issue 12.7).

Each DP reply reports the site's ledger length and head; the privacy table records them per
site and round, and a site whose ledger got shorter (or was replaced) is stopped for the run
with a catalogued error naming it, also after a coordinator restart.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedhealth.config import compose
from fedhealth.errors import ErrorCode, LedgerShrank
from fedhealth.protocol import keys as K
from fedhealth.runs.ledgers import LedgerWatch, ledger_fields
from fedhealth.runs.rundir import RunDir, read_jsonl
from fedhealth.serverapp.checks import check_metrics_only

SITE = "site-a"
HEADS = [0x0AB, 0x1CD, 0x2EF, 0x301, 0x423, 0x545]  # entry hashes (60-bit tags) of a ledger


def _metrics(entries: int, head: int | None = None, prev: int | None = None) -> dict:
    return {
        K.LOSS: 0.3,
        K.NUM_EXAMPLES: 10,
        K.EPSILON: 1.0 + entries,
        K.LEDGER_ENTRIES: entries,
        K.LEDGER_HEAD: HEADS[entries - 1] if head is None else head,
        K.LEDGER_HEAD_PREV: (HEADS[entries - 2] if entries > 1 else 0) if prev is None else prev,
    }


ABOUT = {K.ACCOUNTANT: "rdp", K.HISTORY_NOISE: [], K.HISTORY_RATE: [], K.HISTORY_STEPS: []}


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    return RunDir.create(compose([f"run_root={tmp_path}", "run_name=r", "rounds=6"]))


def _reply(run_dir: RunDir, server_round: int, metrics: dict, site: str = SITE) -> None:
    check_metrics_only(
        run_dir.log(server_round), site, metrics, ABOUT, max_examples=100, server_round=server_round
    )


def test_a_growing_ledger_is_recorded_in_the_privacy_table(run_dir):
    for rnd, entries in ((1, 2), (2, 3), (3, 5)):  # 5: another run charged in between
        _reply(run_dir, rnd, _metrics(entries))
        assert run_dir.log(rnd).rejected == {}
        run_dir.end_round(rnd, {"w": np.zeros(2, np.float32)})
    rows = read_jsonl(run_dir.privacy)
    assert [(r["round"], r["site"], r["ledger_entries"]) for r in rows] == [
        (1, SITE, 2),
        (2, SITE, 3),
        (3, SITE, 5),
    ]
    assert rows[-1]["ledger_head"] == f"{HEADS[4]:015x}"
    assert rows[-1]["ledger_head_prev"] == f"{HEADS[3]:015x}"


@pytest.mark.parametrize(
    "later, says",
    [
        (
            _metrics(2),
            "went from 3 entries \\(round 1\\) to 2 \\(round 2\\): truncated or replaced",
        ),
        (_metrics(3, head=0x999), "to another ledger of as many entries .*replaced"),
        (_metrics(4, prev=0x999), "to 4 .*does not extend head .*truncated or replaced"),
    ],
)
def test_a_shrinking_or_replaced_ledger_stops_the_site(run_dir, later, says):
    _reply(run_dir, 1, _metrics(3))
    _reply(run_dir, 2, later)
    reason = run_dir.log(2).rejected[SITE]
    assert f"ledger of site {SITE} " in reason
    assert re.search(says, reason), reason
    assert SITE not in run_dir.log(2).train and SITE not in run_dir.log(2).privacy
    _reply(run_dir, 3, _metrics(6))  # a longer ledger later does not lift the stop
    assert "no update of site site-a is taken" in run_dir.log(3).rejected[SITE]
    _reply(run_dir, 3, _metrics(1), site="site-b")  # other sites are unaffected
    assert "site-b" in run_dir.log(3).train


def test_the_error_is_catalogued_and_names_the_site():
    watch = LedgerWatch()
    watch.check(SITE, 1, ledger_fields(_metrics(5), SITE))
    with pytest.raises(LedgerShrank, match="ledger of site site-a went from 5 entries") as exc:
        watch.check(SITE, 2, ledger_fields(_metrics(4), SITE))
    assert exc.value.code == ErrorCode.SITE_LEDGER_SHRANK
    assert "truncated or replaced" in exc.value.describe()


def test_a_replay_of_the_same_head_is_accepted():
    watch = LedgerWatch()
    for rnd in (1, 2):  # a retried round: the site resends the same charge
        watch.check(SITE, rnd, ledger_fields(_metrics(3), SITE))
    assert watch.stopped == {}


@pytest.mark.parametrize("key", K.LEDGER_METRICS)
def test_a_dp_reply_without_its_ledger_report_is_rejected(run_dir, key):
    metrics = _metrics(3)
    del metrics[key]
    _reply(run_dir, 1, metrics)
    assert key in run_dir.log(1).rejected[SITE]


def test_a_restarted_coordinator_still_remembers_the_ledger(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "run_name=r", "rounds=6"])
    first = RunDir.create(cfg)
    first.end_round(0, {"w": np.zeros(2, np.float32)})
    _reply(first, 1, _metrics(4))
    first.end_round(1, {"w": np.zeros(2, np.float32)})
    resumed = RunDir.create(cfg)  # the coordinator died after round 1
    assert resumed.resumed_from == 1
    _reply(resumed, 2, _metrics(3))
    assert "went from 4 entries (round 1) to 3 (round 2)" in resumed.log(2).rejected[SITE]
