"""What a site's privacy ledger holds: one hash-chained entry per DP-SGD phase, one plan per run.

Stored by :class:`fedhealth.privacy.ledger.PrivacyLedger`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from fedhealth.privacy.accounting import Phase

GENESIS = "0" * 64  # the ``prev_hash`` of a ledger's first entry


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
