"""The coordinator's watch over each site's privacy ledger within a run: it may only grow.

Every DP-trained reply reports where the site's ledger stands after charging the round
(:data:`~fedhealth.protocol.keys.LEDGER_METRICS`: entry count, head hash and the hash the head
extends, each hash as its first 60 bits). The coordinator keeps the last report of each site
(and writes every one to ``privacy.jsonl``); a report with fewer entries, the same count but
another head, or one more entry whose head does not extend the head seen before is a ledger
that was truncated or replaced at the site, so its epsilon is under-counted. That site's
updates are refused from then on, for the rest of the run, with :class:`LedgerShrank`.

A jump of more than one entry (another run charged the same ledger in between) cannot be
checked from heads alone and is accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedhealth.errors import LedgerShrank, UpdateRejected
from fedhealth.protocol import keys as K

HEX_DIGITS = 15
"""Hex digits of a reported hash (60 bits; :func:`fedhealth.privacy.records.tag`)."""


@dataclass(frozen=True)
class Seen:
    """A site's ledger as it reported it in one round.

    Parameters
    ----------
    round : int
        The round of the report.
    entries : int
        Its entry count.
    head : str
        Its head hash, first :data:`HEX_DIGITS` hex digits.
    head_prev : str
        The hash its head extends, same form.
    """

    round: int
    entries: int
    head: str
    head_prev: str


def ledger_fields(metrics: Mapping[str, Any], site: str) -> dict[str, int | str]:
    """Return a DP reply's ledger report as privacy-table fields (hashes as hex).

    Parameters
    ----------
    metrics : mapping of str to Any
        The reply's validated train metrics (with :data:`~fedhealth.protocol.keys.EPSILON`).
    site : str
        The site's name, for the error.

    Returns
    -------
    dict
        ``ledger_entries`` (int), ``ledger_head`` and ``ledger_head_prev`` (hex strings).

    Raises
    ------
    UpdateRejected
        A ledger metric is missing, not an int, or out of range.
    """
    values = {key: metrics.get(key) for key in K.LEDGER_METRICS}
    for key, value in values.items():
        if type(value) is not int or not 0 <= value < 16**HEX_DIGITS:
            raise UpdateRejected(
                f"site {site}: a DP reply must report {key!r} as an int in [0, 2**60), got "
                f"{value!r}"
            )
    return {
        "ledger_entries": int(values[K.LEDGER_ENTRIES] or 0),
        "ledger_head": f"{values[K.LEDGER_HEAD]:0{HEX_DIGITS}x}",
        "ledger_head_prev": f"{values[K.LEDGER_HEAD_PREV]:0{HEX_DIGITS}x}",
    }


@dataclass
class LedgerWatch:
    """Each site's last reported ledger in this run, and the sites stopped for shrinking.

    Parameters
    ----------
    seen : dict of str to Seen, default {}
        Site -> its last accepted report.
    stopped : dict of str to str, default {}
        Site -> why its updates are refused for the rest of the run.
    """

    seen: dict[str, Seen] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)

    def check(self, site: str, server_round: int, fields: Mapping[str, int | str]) -> None:
        """Check a site's ledger report against its last one; remember it when it holds.

        Parameters
        ----------
        site : str
            The site's name.
        server_round : int
            The round of the report.
        fields : mapping
            From :func:`ledger_fields`.

        Raises
        ------
        LedgerShrank
            The site is stopped already, or its ledger got shorter or was replaced since its
            last report (the site is then stopped for the rest of the run).
        """
        if site in self.stopped:
            raise LedgerShrank(f"{self.stopped[site]}; no update of site {site} is taken")
        now = Seen(
            server_round,
            int(fields["ledger_entries"]),
            str(fields["ledger_head"]),
            str(fields["ledger_head_prev"]),
        )
        before = self.seen.get(site)
        reason = None if before is None else _shrunk(site, before, now)
        if reason is not None:
            self.stopped[site] = reason
            raise LedgerShrank(f"{reason}; no update of site {site} is taken in this run")
        if before is None or (now.round, now.entries) >= (before.round, before.entries):
            self.seen[site] = now

    def load(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rebuild the watch from a resumed run's ``privacy.jsonl`` rows (in round order).

        Parameters
        ----------
        rows : iterable of mapping
            The privacy table's lines; those without a ledger report are skipped. A row that
            fails the check stops its site, as it would have then.
        """
        for row in rows:
            if "ledger_entries" in row and "site" in row:
                try:
                    self.check(str(row["site"]), int(row["round"]), row)
                except LedgerShrank:
                    continue


def _shrunk(site: str, before: Seen, now: Seen) -> str | None:
    """Say how the ledger went backwards between two reports, or None when it did not."""
    where = f"ledger of site {site} went from {before.entries} entries (round {before.round})"
    if now.entries < before.entries:
        return f"{where} to {now.entries} (round {now.round}): truncated or replaced"
    if now.entries == before.entries and now.head != before.head:
        return f"{where} to another ledger of as many entries (round {now.round}): replaced"
    if now.entries == before.entries + 1 and now.head_prev != before.head:
        return (
            f"{where} to {now.entries} (round {now.round}) whose last entry does not extend "
            f"head {before.head}: truncated or replaced"
        )
    return None
