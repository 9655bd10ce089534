"""What a run directory records, as types: per-site metrics, round logs, metrics lines, manifest.

``metrics.jsonl`` holds one :class:`MetricsLine` per round and ``manifest.json`` one
:class:`Manifest`; both are plain JSON, so the types describe what a reader finds there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

from fedhealth.protocol.keys import NUM_EXAMPLES
from fedhealth.runs.ledgers import LedgerWatch

SiteMetrics = dict[str, float | int]
"""One site's validated metrics of one round (``loss``, ``num-examples``, ``dice``, ...)."""
PrivacyRow = dict[str, float | int | str | list[list[float | int]]]
"""One site's row of the privacy table: its DP metrics (snake_case), ``accountant`` and
``history`` (``[noise multiplier, sample rate, steps]`` per ledger phase)."""


class CheckpointRef(TypedDict):
    """The global-model checkpoint a metrics line refers to."""

    file: str
    sha256: str


class PhaseSummary(TypedDict):
    """One message phase of a round, over the sites (``train`` or ``evaluate``)."""

    sites: dict[str, SiteMetrics]
    weighted: dict[str, float]
    rejected: dict[str, str]
    failed: int


class TrainSummary(PhaseSummary):
    """A round's training; ``secure_sum`` (example count, weighted loss, sites) when summed."""

    secure_sum: NotRequired[SiteMetrics]


class EvaluateSummary(PhaseSummary):
    """The evaluation of a round's model; ``with_round`` when it rode with the next round."""

    with_round: NotRequired[int]


class MetricsLine(TypedDict):
    """One line of ``metrics.jsonl``: a round's checkpoint and (from round 1) its metrics."""

    round: int
    time: str
    elapsed_s: float
    checkpoint: CheckpointRef
    train: NotRequired[TrainSummary]
    evaluate: NotRequired[EvaluateSummary]
    coordinator_s: NotRequired[dict[str, float]]  # aggregate and checkpoint seconds


class Resumed(TypedDict):
    """A restart of the coordinator: when, after which completed round."""

    at: str
    after_round: int


class Stopped(TypedDict):
    """A run that stopped cleanly before its last round."""

    round: int
    reason: str


class Manifest(TypedDict):
    """``manifest.json``: the run's identity, versions and progress."""

    run: str
    started: str
    finished: str | None
    seed: int
    config_sha256: str
    versions: dict[str, str]
    rounds_planned: int
    rounds_completed: int
    checkpoints: dict[str, str]
    pending_line: NotRequired[MetricsLine]
    resumed: NotRequired[list[Resumed]]
    stopped: NotRequired[Stopped]
    mlflow: NotRequired[dict[str, str]]


def weighted(rows: dict[str, SiteMetrics], keys: tuple[str, ...]) -> dict[str, float]:
    """Return the example-weighted mean of ``keys`` over the sites' metric rows.

    Parameters
    ----------
    rows : dict[str, SiteMetrics]
        Site name -> its metrics; rows without ``num-examples`` (the weight: a site whose
        count is inside the secure sum) are left out.
    keys : tuple[str, ...]
        The metrics to average; one missing from any row is left out.

    Returns
    -------
    dict[str, float]
        Metric -> weighted mean; empty when the weights sum to zero or less.
    """
    rows = {name: r for name, r in rows.items() if NUM_EXAMPLES in r}
    total = sum(float(r[NUM_EXAMPLES]) for r in rows.values())
    if total <= 0:
        return {}
    return {
        k: sum(float(r[k]) * float(r[NUM_EXAMPLES]) for r in rows.values()) / total
        for k in keys
        if all(k in r for r in rows.values())
    }


@dataclass
class RoundLog:
    """What the coordinator learnt about one round, by site, until its line is written.

    Parameters
    ----------
    train : dict[str, SiteMetrics], default {}
        Site -> its accepted train metrics.
    evaluate : dict[str, SiteMetrics], default {}
        Site -> its accepted evaluation metrics.
    rejected : dict[str, str], default {}
        Site -> why its train reply was rejected.
    rejected_evaluate : dict[str, str], default {}
        Site -> why its evaluation was rejected.
    privacy : dict[str, PrivacyRow], default {}
        Site -> its privacy-table row (DP-trained updates only).
    refused : dict[str, str], default {}
        Site -> why it refused the round before training: ``budget`` (its cap) or
        ``policy: <field>`` (a limit of its privacy policy).
    failed : dict[str, int], default {"train": 0, "evaluate": 0}
        Error replies per phase, other than refusals.
    secure_sum : SiteMetrics, default {}
        The secure sum's metrics when the round was securely aggregated: the summed sites'
        example count and example-weighted training loss (each site's own stay inside it).
    seconds : dict[str, float], default {}
        Where the coordinator's own time went in the round, by step (``aggregate``:
        validating and aggregating the train replies; ``checkpoint``: writing the global
        model), in seconds.
    ledgers : LedgerWatch, default a new one
        The run's watch over the sites' ledgers, shared by every round's log
        (:meth:`fedhealth.runs.rundir.RunDir.log`).
    """

    train: dict[str, SiteMetrics] = field(default_factory=dict)
    evaluate: dict[str, SiteMetrics] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # train replies: site -> reason
    rejected_evaluate: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, PrivacyRow] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=lambda: {"train": 0, "evaluate": 0})
    secure_sum: SiteMetrics = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    ledgers: LedgerWatch = field(default_factory=LedgerWatch, repr=False, compare=False)
