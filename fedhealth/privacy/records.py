"""What a site's privacy ledger holds: one hash-chained entry per DP-SGD phase, one plan per run.

Stored by :class:`fedhealth.privacy.ledger.PrivacyLedger`. Beside the ledger, its high-water
mark (:func:`read_mark`, :func:`write_mark`): the most entries it ever held and the hash of the
last of them, so a ledger that lost entries is noticed by the site itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fedhealth.errors import LedgerError, LedgerTruncated
from fedhealth.privacy.accounting import Phase

GENESIS = "0" * 64  # the ``prev_hash`` of a ledger's first entry
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    run TEXT NOT NULL, round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL, accountant TEXT NOT NULL,
    delta REAL NOT NULL, epsilon_after REAL NOT NULL, epsilon_cap REAL NOT NULL,
    dataset_fingerprint TEXT NOT NULL, accountant_state TEXT NOT NULL,
    created TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS plans (
    run TEXT PRIMARY KEY, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
    steps_per_round INTEGER NOT NULL, rounds INTEGER NOT NULL, epsilon_planned REAL NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    run TEXT NOT NULL, round INTEGER NOT NULL, model_sha256 TEXT NOT NULL,
    entry_hash TEXT NOT NULL, PRIMARY KEY (run, round, model_sha256)
);
"""
"""The ledger's tables (SQLite): its metadata, entries, run plans and releases."""


@dataclass(frozen=True)
class Entry:
    """One DP-SGD phase: a site's local training in one round, as its ledger records it.

    Parameters
    ----------
    run : str
        The run's key (``run-key``: run name and config hash).
    round : int
        The server round.
    noise_multiplier : float
        Noise standard deviation relative to ``max_grad_norm``.
    sample_rate : float
        Poisson sampling rate of a record (a patient), in (0, 1].
    steps : int
        DP-SGD steps taken.
    max_grad_norm : float
        Per-record L2 clipping bound.
    accountant : str
        ``"rdp"`` or ``"prv"``.
    delta : float
        The site's delta.
    epsilon_after : float
        The site's total epsilon with this phase, recomputed on every load.
    epsilon_cap : float
        The site's cap when the phase was recorded.
    dataset_fingerprint : str
        sha256 of the dataset spent on (:attr:`fedhealth.data.loading.SiteData.fingerprint`).
    accountant_state : str
        JSON list of every phase up to this one (Opacus's accountant history).
    created : str
        UTC time, ISO 8601.
    prev_hash : str, optional
        The previous entry's ``hash`` (default: 64 zeros, the first entry).
    hash : str, optional
        sha256 over every other field (:meth:`digest`; default ``""`` until computed).
    """

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon_after: float
    epsilon_cap: float
    dataset_fingerprint: str
    accountant_state: str
    created: str
    prev_hash: str = GENESIS
    hash: str = ""

    @property
    def phase(self) -> Phase:
        """The phase as an accountant history item: (noise_multiplier, sample_rate, steps)."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def digest(self) -> str:
        """Hash the entry: sha256 over its fields but ``hash``, as sorted-key JSON.

        Returns
        -------
        str
            The hex digest.
        """
        body = {k: v for k, v in asdict(self).items() if k != "hash"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    """A run's privacy plan: the noise chosen once, to fit all its rounds in the cap.

    Parameters
    ----------
    run : str
        The run's key.
    noise_multiplier : float
        The noise every round of the run uses.
    sample_rate : float
        Poisson sampling rate assumed, in (0, 1].
    steps_per_round : int
        DP-SGD steps per round.
    rounds : int
        Rounds planned (those left when the plan was made).
    epsilon_planned : float
        The site's epsilon after all of them.
    """

    run: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon_planned: float


TAG_HEX_DIGITS = 15
"""Hex digits of a hash kept in a :func:`tag` (60 bits: an int a MetricRecord carries exactly)."""


def tag(digest: str) -> int:
    """Shorten a hex sha256 to the int a site reports in its train metrics.

    Parameters
    ----------
    digest : str
        A hex digest (an entry's ``hash``, or :data:`GENESIS`).

    Returns
    -------
    int
        Its first :data:`TAG_HEX_DIGITS` hex digits as an int, in ``[0, 2**60)``: exact in a
        MetricRecord (sint64) and in JSON.
    """
    return int(digest[:TAG_HEX_DIGITS], 16)


@dataclass(frozen=True)
class Head:
    """Where a ledger stands: how many entries, the last one's hash and the hash it extends.

    Parameters
    ----------
    entries : int
        Number of entries.
    hash : str
        The last entry's ``hash`` (:data:`GENESIS` when empty).
    prev_hash : str
        The last entry's ``prev_hash`` (:data:`GENESIS` with at most one entry).
    """

    entries: int
    hash: str
    prev_hash: str


def mark_path(ledger: Path) -> Path:
    """Return where the high-water mark of the ledger file ``ledger`` lives (beside it).

    Parameters
    ----------
    ledger : Path
        The ledger's SQLite file.

    Returns
    -------
    Path
        ``<ledger>.mark``.
    """
    return ledger.with_name(ledger.name + ".mark")


def read_mark(path: Path) -> Head | None:
    """Read a ledger's high-water mark.

    Parameters
    ----------
    path : Path
        The mark file (:func:`mark_path`).

    Returns
    -------
    Head or None
        The longest the ledger was known to be; None when there is no mark yet.

    Raises
    ------
    LedgerError
        The mark exists but is unreadable or malformed.
    """
    try:
        data = json.loads(path.read_text())
        head = Head(int(data["entries"]), str(data["hash"]), str(data["prev_hash"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LedgerError(f"{path}: ledger high-water mark unreadable ({exc!r})") from exc
    if head.entries < 0 or len(head.hash) != len(GENESIS):
        raise LedgerError(f"{path}: ledger high-water mark malformed: {data}")
    return head


def write_mark(path: Path, head: Head) -> None:
    """Write a ledger's high-water mark: temp file, fsync, rename, owner-only.

    Parameters
    ----------
    path : Path
        The mark file (:func:`mark_path`).
    head : Head
        Where the ledger stands now.

    Raises
    ------
    OSError
        The file could not be written (the previous mark, if any, stays).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(asdict(head), sort_keys=True))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_mark(ledger: Path, mark: Head, hashes: list[str]) -> None:
    """Check that a ledger still holds what its high-water mark says it once held.

    Parameters
    ----------
    ledger : Path
        The ledger's file, for the message.
    mark : Head
        Its high-water mark (:func:`read_mark`).
    hashes : list of str
        The ``hash`` of each of its entries now, in order.

    Raises
    ------
    LedgerTruncated
        Fewer entries than the mark, or another entry where the mark's last one was.
    """
    if len(hashes) < mark.entries:
        raise LedgerTruncated(
            f"{ledger}: the privacy ledger holds {len(hashes)} entries but held {mark.entries} "
            f"({mark_path(ledger)}): truncated or replaced by an older copy; refusing to train "
            "on an under-counted epsilon"
        )
    if mark.entries and hashes[mark.entries - 1] != mark.hash:
        raise LedgerTruncated(
            f"{ledger}: entry {mark.entries} of the privacy ledger is not the one it held "
            f"({mark_path(ledger)}): the ledger was replaced; refusing to train"
        )
