"""The ledger cannot be out-raced, refused rounds cost nothing, and it cannot shrink unseen.

Issue 12, points 3 and 7: two runs charging at once against a ledger near its cap (real
processes, one SQLite file), a refusal before training, and a ledger that lost its last row or
was replaced by an older copy.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedhealth.clientapp import local_round
from fedhealth.errors import BudgetExhausted, LedgerError, LedgerTruncated
from fedhealth.privacy.budget import RoundRequest, SiteBudget, charge_round
from fedhealth.privacy.independent import agrees, independent_epsilon
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.privacy.records import GENESIS, mark_path, read_mark, tag
from fedhealth.protocol import keys as K

CAP, DELTA = 8.0, 1e-5
BEFORE = (1.0, 0.25, 10)  # epsilon 6.81 (RDP, delta 1e-5)
ROUND_NOISE, ROUND_STEPS = 1.5, 10  # one more round: 7.46; two: 8.08, over the cap


def _request(run: str, rnd: int = 1) -> RoundRequest:
    return RoundRequest(
        run=run,
        server_round=rnd,
        rounds_total=rnd,
        sample_rate=0.25,
        steps=ROUND_STEPS,
        max_grad_norm=1.0,
        accountant="rdp",
        fixed_noise=ROUND_NOISE,
    )


def _near_cap(path: Path) -> None:
    with PrivacyLedger(path, "site-a") as ledger:
        ledger.record("earlier", 1, BEFORE, 1.0, "rdp", DELTA, CAP, "fp")


def _charge_at_once(path: str, run: str, barrier, results) -> None:  # a ClientApp process
    with PrivacyLedger(path, "site-a") as ledger:  # opened (and read) before the race
        barrier.wait(timeout=120)
        try:
            entry = charge_round(
                ledger, SiteBudget(CAP, DELTA, Path(path)), _request(run), "fp", "s"
            )
            results.put((run, "charged", entry.epsilon_after))
        except BudgetExhausted as exc:
            results.put((run, "refused", str(exc)))


def test_two_runs_charging_at_once_cannot_both_pass_the_cap(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _near_cap(path)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_charge_at_once, args=(str(path), run, barrier, results))
        for run in ("run-x", "run-y")
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert sorted(o[1] for o in outcomes) == ["charged", "refused"], outcomes
    refused = next(o for o in outcomes if o[1] == "refused")
    assert "over the cap" in refused[2]
    with PrivacyLedger(path) as ledger:
        history = ledger.history()
        assert len(history) == 2, "the refused run recorded nothing"
        ours = ledger.entries[-1].epsilon_after
        theirs = independent_epsilon(history, DELTA, "rdp")  # dp-accounting, not Opacus
    assert agrees(ours, theirs)
    assert ours <= CAP and theirs <= CAP
    assert read_mark(mark_path(path)).entries == 2


def _dump(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


@pytest.fixture
def instruction(flower_identity) -> Message:
    model = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    content = RecordDict({K.ARRAYS: model, K.CONFIG: ConfigRecord({K.SERVER_ROUND: 1})})
    return Message(content, 7, "train")


def test_a_budget_refusal_leaves_the_ledger_unchanged(tmp_path, instruction):
    path = tmp_path / "ledger.sqlite"
    _near_cap(path)
    budget = SiteBudget(CAP, DELTA, path)
    data = SimpleNamespace(fingerprint="fp")
    local_round.charge(instruction, "site-a", budget, data, _request("run-x"))  # 7.46: fits
    before, mark = _dump(path), read_mark(mark_path(path))
    with pytest.raises(BudgetExhausted, match="over the cap"):
        local_round.charge(instruction, "site-a", budget, data, _request("run-y"))
    assert _dump(path) == before, "no entry, no plan, no release"
    assert read_mark(mark_path(path)) == mark


def test_a_run_that_cannot_fit_at_any_noise_saves_no_plan(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _near_cap(path)
    before = _dump(path)
    request = RoundRequest("run-z", 1, 50, 0.25, 500, 1.0, "rdp")  # planned: no sigma fits
    with PrivacyLedger(path) as ledger, pytest.raises(BudgetExhausted):
        charge_round(ledger, SiteBudget(6.9, DELTA, path), request, "fp", "site-a")
    assert _dump(path) == before


def test_the_charge_reports_where_the_ledger_stands(tmp_path, instruction):
    path = tmp_path / "ledger.sqlite"
    _near_cap(path)
    budget = SiteBudget(CAP, DELTA, path)
    entry, history, standing = local_round.charge(
        instruction, "site-a", budget, SimpleNamespace(fingerprint="fp"), _request("run-x")
    )
    with PrivacyLedger(path) as ledger:
        first = ledger.entries[0]
    assert standing == {
        K.LEDGER_ENTRIES: 2,
        K.LEDGER_HEAD: tag(entry.hash),
        K.LEDGER_HEAD_PREV: tag(first.hash),
    }
    assert all(0 <= v < 2**60 for v in standing.values())
    assert len(history) == 2
    # a replay of the same round reports the same standing and charges nothing
    again = local_round.charge(
        instruction, "site-a", budget, SimpleNamespace(fingerprint="fp"), _request("run-x")
    )
    assert again[0] == entry and again[2] == standing


def _three_rounds(path: Path) -> None:
    with PrivacyLedger(path, "site-a") as ledger:
        for rnd in (1, 2, 3):
            ledger.record("run-1", rnd, (1.5, 0.25, 4), 1.0, "rdp", DELTA, CAP, "fp")


def test_deleting_the_last_row_makes_the_site_refuse(tmp_path, instruction):
    path = tmp_path / "ledger.sqlite"
    _three_rounds(path)
    db = sqlite3.connect(path)  # the chain of the two rows left is intact
    db.execute("DELETE FROM entries WHERE seq = (SELECT MAX(seq) FROM entries)")
    db.commit()
    db.close()
    with pytest.raises(LedgerTruncated, match="holds 2 entries but held 3.*truncated"):
        PrivacyLedger(path)
    budget = SiteBudget(CAP, DELTA, path)
    with pytest.raises(LedgerError, match="truncated"):  # the site trains nothing
        local_round.charge(
            instruction, "site-a", budget, SimpleNamespace(fingerprint="fp"), _request("run-2")
        )
    assert len(_dump_entries(path)) == 2, "nothing charged on top of the shortened ledger"


def _dump_entries(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT seq FROM entries").fetchall()
    finally:
        db.close()


def test_an_older_copy_of_the_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path, "site-a") as ledger:
        ledger.record("run-1", 1, (1.5, 0.25, 4), 1.0, "rdp", DELTA, CAP, "fp")
    shutil.copy(path, tmp_path / "backup.sqlite")
    with PrivacyLedger(path) as ledger:
        ledger.record("run-1", 2, (1.5, 0.25, 4), 1.0, "rdp", DELTA, CAP, "fp")
    shutil.copy(tmp_path / "backup.sqlite", path)
    with pytest.raises(LedgerTruncated, match="held 2"):
        PrivacyLedger(path)


def test_a_replaced_ledger_of_as_many_entries_is_refused(tmp_path):
    path, other = tmp_path / "ledger.sqlite", tmp_path / "other" / "ledger.sqlite"
    for where in (path, other):
        with PrivacyLedger(where, "site-a") as ledger:
            ledger.record("run-1", 1, (1.5, 0.25, 4), 1.0, "rdp", DELTA, CAP, f"fp-{where}")
    shutil.copy(other, path)
    with pytest.raises(LedgerTruncated, match="entry 1 .*replaced"):
        PrivacyLedger(path)


def test_the_mark_follows_the_ledger_and_is_owner_only(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path, "site-a") as ledger:
        assert ledger.head().hash == GENESIS and read_mark(mark_path(path)) is None
        _three_rounds(path)
    with PrivacyLedger(path) as ledger:
        assert read_mark(mark_path(path)) == ledger.head()
        assert ledger.head().entries == 3
    assert mark_path(path).stat().st_mode & 0o777 == 0o600


def test_an_unreadable_mark_stops_the_site(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _three_rounds(path)
    mark_path(path).write_text("{not json")
    with pytest.raises(LedgerError, match="high-water mark unreadable"):
        PrivacyLedger(path)
