"""The site's privacy ledger: a durable, verified record of every DP-SGD phase it took part in.

SQLite in WAL mode with ``synchronous=FULL``: an entry is on disk when :meth:`record` returns,
and the site records *before* it trains, so a crash can only over-count, never under-count.
Several ClientApp processes may hold the ledger open at once: a charge reads the history, checks
the cap and writes the entry inside one exclusive transaction (:meth:`exclusive`), so two
concurrent runs can never both pass the cap on the same history.
Each entry carries the sha256 of the previous one (a hash chain), and opening the ledger checks
SQLite's integrity, the chain, and that each stored epsilon is what the accountant computes
from the stored parameters. Any failure is a :class:`LedgerError`: the site stops instead of
starting again from zero. A high-water mark beside the file (``ledger.sqlite.mark``: the most
entries the ledger ever held and the last one's hash) makes a ledger that lost its last rows,
or was replaced by an older copy, a :class:`LedgerTruncated` error instead of a smaller epsilon.

One ledger per site; it outlives runs. It is keyed to the site's dataset fingerprint: entries
record the fingerprint they were spent on, and spending continues to accumulate when the
dataset changes (patients still present keep their past loss).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from fedhealth.errors import LedgerError
from fedhealth.privacy.accounting import Phase, epsilon
from fedhealth.privacy.records import (
    GENESIS,
    SCHEMA,
    Entry,
    Head,
    Plan,
    check_mark,
    mark_path,
    read_mark,
    write_mark,
)

__all__ = ["GENESIS", "SCHEMA_VERSION", "Entry", "Head", "Plan", "PrivacyLedger"]

SCHEMA_VERSION = 1
REL_TOL = 1e-6


class PrivacyLedger:
    """Open (creating if needed) and verify the ledger at ``path``.

    Parameters
    ----------
    path : Path or str
        The SQLite file (its directory is created).
    site : str, optional
        The site's name, recorded when the ledger is created (default ``"site"``).

    Raises
    ------
    LedgerError
        The file is unreadable, or fails :meth:`verify`.
    LedgerTruncated
        It holds fewer (or other) entries than its high-water mark says it once held.
    """

    def __init__(self, path: Path | str, site: str = "site") -> None:
        self.path = Path(path)
        self.mark = mark_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('site', ?)", (site,))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (_now(),))
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({exc})") from exc
        self.entries = self.verify()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    def verify(self) -> list[Entry]:
        """Check SQLite's integrity, the schema, the hash chain and the last entry's epsilon.

        Returns
        -------
        list of Entry
            The entries, in order.

        Raises
        ------
        LedgerError
            Naming the file, and the entry that breaks the chain or whose stored accountant
            state or epsilon differs from what the recorded phases give.
        LedgerTruncated
            Fewer entries than the high-water mark, or another entry where it points.
        """
        mark = read_mark(self.mark)  # before the rows: a mark is written after its commit
        try:
            status = self.db.execute("PRAGMA integrity_check").fetchone()[0]
            schema = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            rows = self.db.execute(
                "SELECT run, round, noise_multiplier, sample_rate, steps, max_grad_norm, "
                "accountant, delta, epsilon_after, epsilon_cap, dataset_fingerprint, "
                "accountant_state, created, prev_hash, hash FROM entries ORDER BY seq"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({exc})") from exc
        if status != "ok":
            raise LedgerError(f"{self.path}: SQLite integrity check failed: {status}")
        if schema is None or int(schema[0]) != SCHEMA_VERSION:
            raise LedgerError(f"{self.path}: unknown ledger schema {schema}")
        entries = [Entry(*row) for row in rows]
        prev, history = GENESIS, []
        for i, entry in enumerate(entries):
            if entry.prev_hash != prev or entry.digest() != entry.hash:
                raise LedgerError(
                    f"{self.path}: entry {i + 1} (run {entry.run}, round "
                    f"{entry.round}) breaks the hash chain: ledger was altered"
                )
            history.append(entry.phase)
            if json.loads(entry.accountant_state) != [list(p) for p in history]:
                raise LedgerError(
                    f"{self.path}: entry {i + 1}: accountant state does not "
                    "match the recorded phases"
                )
            prev = entry.hash
        if entries:
            last = entries[-1]
            recomputed = epsilon(history, last.delta, last.accountant)
            if abs(recomputed - last.epsilon_after) > REL_TOL * max(1.0, recomputed):
                raise LedgerError(
                    f"{self.path}: stored epsilon {last.epsilon_after:.6f} != "
                    f"{recomputed:.6f} recomputed from the recorded phases"
                )
        if mark is not None:
            check_mark(self.path, mark, [e.hash for e in entries])
        return entries

    def head(self) -> Head:
        """Return where the ledger stands: entry count, last hash, and the hash it extends.

        Returns
        -------
        Head
            ``Head(0, GENESIS, GENESIS)`` when empty.
        """
        if not self.entries:
            return Head(0, GENESIS, GENESIS)
        return Head(len(self.entries), self.entries[-1].hash, self.entries[-1].prev_hash)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[PrivacyLedger]:
        """Hold the ledger's write lock: re-read it, then commit or roll back as one.

        ``BEGIN IMMEDIATE`` takes SQLite's write lock across processes (waiting up to the
        connection's 30 s timeout); the entries are then re-read and verified, so a check made
        inside sees every charge committed before it and no other process charges until the
        block ends. Nested use joins the outer block. The high-water mark follows the commit.

        Yields
        ------
        PrivacyLedger
            This ledger, its :attr:`entries` fresh.

        Raises
        ------
        LedgerError
            The lock could not be taken in time, the ledger fails :meth:`verify`, or the commit
            failed (rolled back: nothing is recorded). Any error inside the block rolls back.
        """
        if self.db.in_transaction:  # nested: the outer block commits
            yield self
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: could not lock the privacy ledger ({exc})") from exc
        try:
            self.entries = self.verify()
            before = list(self.entries)
            try:
                yield self
                self.db.execute("COMMIT")
            except BaseException:
                self.entries = before
                raise
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: privacy ledger transaction failed ({exc})") from exc
        finally:
            self._rollback()
        self._raise_mark()

    def _rollback(self) -> None:
        if self.db.in_transaction:  # after a failure: nothing of the block stays
            self.db.execute("ROLLBACK")

    def _raise_mark(self) -> None:
        """Raise the high-water mark to the ledger's length (never lower it)."""
        mark = read_mark(self.mark)
        if self.entries and (mark is None or mark.entries < len(self.entries)):
            try:
                write_mark(self.mark, self.head())
            except OSError as exc:
                raise LedgerError(
                    f"{self.mark}: could not write the high-water mark ({exc})"
                ) from exc

    def history(self) -> list[Phase]:
        """Return every recorded phase, in order (an Opacus accountant history).

        Returns
        -------
        list of (float, float, int)
            ``(noise_multiplier, sample_rate, steps)`` per entry.
        """
        return [e.phase for e in self.entries]

    def spent(self, delta: float, accountant: str) -> float:
        """Compute the epsilon spent so far.

        Parameters
        ----------
        delta : float
            The target delta, in (0, 1).
        accountant : str
            ``"rdp"`` or ``"prv"`` (:func:`fedhealth.privacy.accounting.epsilon`).

        Returns
        -------
        float
            Epsilon of :meth:`history` (0.0 when empty).
        """
        return epsilon(self.history(), delta, accountant)

    def release(self, run: str, server_round: int, model_sha256: str) -> Entry | None:
        """Find the entry already charged for this run, round and incoming global model.

        Parameters
        ----------
        run : str
            The run's key.
        server_round : int
            The server round.
        model_sha256 : str
            sha256 of the global model received
            (:func:`fedhealth.clientapp.instruction.model_digest`).

        Returns
        -------
        Entry or None
            The entry of that release, or None if it was never charged.
        """
        row = self.db.execute(
            "SELECT entry_hash FROM releases WHERE run=? AND round=? AND model_sha256=?",
            (run, server_round, model_sha256),
        ).fetchone()
        if row is None:
            return None
        return next((e for e in self.entries if e.hash == row[0]), None)

    def plan(self, run: str) -> Plan | None:
        """Return the run's privacy plan, if one was saved.

        Parameters
        ----------
        run : str
            The run's key.

        Returns
        -------
        Plan or None
            The plan, or None before the run's first round.
        """
        row = self.db.execute(
            "SELECT run, noise_multiplier, sample_rate, steps_per_round, rounds, epsilon_planned "
            "FROM plans WHERE run=?",
            (run,),
        ).fetchone()
        return Plan(*row) if row else None

    # -- writing -----------------------------------------------------------------------------
    def save_plan(self, plan: Plan) -> None:
        """Save a run's plan; a plan already saved for the run is kept.

        Parameters
        ----------
        plan : Plan
            The plan.
        """
        self.db.execute(
            "INSERT OR IGNORE INTO plans VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*asdict(plan).values(), _now()),
        )

    def record(
        self,
        run: str,
        server_round: int,
        phase: Phase,
        max_grad_norm: float,
        accountant: str,
        delta: float,
        cap: float,
        fingerprint: str,
        model_sha256: str = "",
    ) -> Entry:
        """Append one phase, durably (an fsynced WAL commit) before this returns.

        With ``model_sha256`` the release (run, round, incoming model) is recorded in the same
        transaction, so :meth:`release` finds it after a crash.

        Parameters
        ----------
        run : str
            The run's key.
        server_round : int
            The server round.
        phase : (float, float, int)
            ``(noise_multiplier, sample_rate, steps)``.
        max_grad_norm : float
            Per-record L2 clipping bound.
        accountant : str
            ``"rdp"`` or ``"prv"``.
        delta : float
            The site's delta.
        cap : float
            The site's epsilon cap (recorded; the cap is checked by
            :func:`fedhealth.privacy.budget.charge_round`, not here).
        fingerprint : str
            The dataset's fingerprint.
        model_sha256 : str, optional
            sha256 of the incoming global model (default ``""``: no release recorded).

        Returns
        -------
        Entry
            The new entry, hash-chained to the previous one.

        Raises
        ------
        LedgerError
            The transaction failed (it is rolled back: nothing is recorded).
        """
        with self.exclusive():  # or inside the caller's: history and chain are fresh
            history = [*self.history(), (float(phase[0]), float(phase[1]), int(phase[2]))]
            entry = Entry(
                run=run,
                round=server_round,
                noise_multiplier=float(phase[0]),
                sample_rate=float(phase[1]),
                steps=int(phase[2]),
                max_grad_norm=max_grad_norm,
                accountant=accountant,
                delta=delta,
                epsilon_after=epsilon(history, delta, accountant),
                epsilon_cap=cap,
                dataset_fingerprint=fingerprint,
                accountant_state=json.dumps([list(p) for p in history]),
                created=_now(),
                prev_hash=self.entries[-1].hash if self.entries else GENESIS,
            )
            entry = Entry(**{**asdict(entry), "hash": entry.digest()})
            try:
                self.db.execute(
                    "INSERT INTO entries (run, round, noise_multiplier, sample_rate, "
                    "steps, max_grad_norm, accountant, delta, epsilon_after, epsilon_cap, "
                    "dataset_fingerprint, accountant_state, created, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    tuple(asdict(entry).values()),
                )
                if model_sha256:
                    self.db.execute(
                        "INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?)",
                        (run, server_round, model_sha256, entry.hash),
                    )
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"{self.path}: could not record privacy spend ({exc})") from exc
            self.entries.append(entry)
            return entry


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
