import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from fedhealth.errors import LedgerError
from fedhealth.privacy.accounting import epsilon
from fedhealth.privacy.ledger import PrivacyLedger

PHASE = (1.2, 0.25, 8)


def _record(ledger, run="run-a", rnd=1, phase=PHASE):
    return ledger.record(run, rnd, phase, 1.0, "rdp", 1e-5, 8.0, "fp-123")


def test_entries_persist_and_accumulate_across_runs(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path, "site-a") as ledger:
        first = _record(ledger, "run-1", 1)
        second = _record(ledger, "run-1", 2)
    with PrivacyLedger(path) as ledger:  # a second run opens the same ledger
        assert [e.round for e in ledger.entries] == [1, 2]
        third = _record(ledger, "run-2", 1)
    assert first.epsilon_after < second.epsilon_after < third.epsilon_after
    assert third.epsilon_after == pytest.approx(epsilon([PHASE] * 3, 1e-5))
    assert third.dataset_fingerprint == "fp-123"
    assert json.loads(third.accountant_state) == [list(PHASE)] * 3


def test_garbage_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(LedgerError, match="ledger.sqlite"):
        PrivacyLedger(path)


def _tamper(path, sql, *args):
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "sql, error",
    [
        ("UPDATE entries SET steps = 1 WHERE seq = 1", "entry 1 .*hash chain"),
        ("DELETE FROM entries WHERE seq = 2", "entry 2 .*hash chain"),
        ("UPDATE entries SET noise_multiplier = 9.0 WHERE seq = 3", "entry 3 .*hash chain"),
    ],
)
def test_edited_or_deleted_entry_breaks_the_chain(tmp_path, sql, error):
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        for rnd in (1, 2, 3):
            _record(ledger, rnd=rnd)
    _tamper(path, sql)
    with pytest.raises(LedgerError, match=error):
        PrivacyLedger(path)


def test_rewritten_epsilon_with_rehashed_chain_is_caught_by_recomputation(tmp_path):
    from dataclasses import asdict, replace

    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        entry = _record(ledger)
    forged = replace(entry, epsilon_after=0.01)
    forged = replace(forged, hash=forged.digest())
    _tamper(
        path,
        "UPDATE entries SET epsilon_after = ?, hash = ? WHERE seq = 1",
        forged.epsilon_after,
        forged.hash,
    )
    with pytest.raises(LedgerError, match="recomputed"):
        PrivacyLedger(path)
    assert asdict(entry)["epsilon_after"] > 1.0


def test_ledger_survives_a_killed_process(tmp_path):
    path = tmp_path / "ledger.sqlite"
    writer = textwrap.dedent(f"""
        from fedhealth.privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r}, "site-k")
        for rnd in range(1, 10_000):
            ledger.record("run-k", rnd, (5.0, 0.01, 1), 1.0, "rdp", 1e-5, 1e9, "fp")
            print(rnd, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    acknowledged = 0
    deadline = time.monotonic() + 120
    while acknowledged < 25 and time.monotonic() < deadline:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)  # mid-write, no cleanup
    proc.wait(timeout=30)
    assert acknowledged >= 25
    with PrivacyLedger(path) as ledger:  # verifies integrity, chain and epsilon
        assert len(ledger.entries) >= acknowledged
        assert [e.round for e in ledger.entries] == list(range(1, len(ledger.entries) + 1))
