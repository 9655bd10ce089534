"""Every key that crosses the coordinator <-> site boundary, declared once.

Both sides import these names: the site's reply builders (:mod:`fedhealth.clientapp`) and the
coordinator's strategy, secure-aggregation grid and validators (:mod:`fedhealth.serverapp`,
:mod:`fedhealth.security.validation`). A key renamed here is renamed on both sides; a literal
typed on one side only would make the other silently drop replies. Shaped after MONAI's
``monai/fl/utils/constants.py``.

Torch-free: the light secure-aggregation stages import it in a fresh ClientApp process.
"""

from __future__ import annotations

from typing import Final

# -- RecordDict record names ----------------------------------------------------------------------
ARRAYS: Final = "arrays"
"""ArrayRecord: the global model (instruction) or the site's update (train reply)."""
METRICS: Final = "metrics"
"""MetricRecord: a reply's aggregate metrics (:data:`NUM_EXAMPLES`, :data:`LOSS`, ...)."""
CONFIG: Final = "config"
"""ConfigRecord: the instruction's settings (flattened run config plus the keys below)."""
SITE: Final = "site"
"""ConfigRecord: who replied (:data:`SITE_NAME`) and its accounting history."""
SECAGG: Final = "secagg"
"""ConfigRecord: one secure-aggregation stage's fields (the ``SECAGG_*`` keys)."""
MASKED: Final = "masked"
"""ArrayRecord (and its one Array): a site's masked, quantised update and example count."""

# -- instruction config keys ----------------------------------------------------------------------
SERVER_ROUND: Final = "server-round"
"""int: the round this instruction belongs to (set by Flower's strategies)."""
EVALUATE_ROUND: Final = "evaluate-round"
"""int: with folded evaluation, the round whose global model the site evaluates after training."""
RUN_KEY: Final = "run-key"
"""str: the run's stable identity across coordinator restarts (the ledger's run key)."""
PROXIMAL_MU: Final = "proximal-mu"
"""float: FedProx's proximal term weight (set by Flower's ``FedProx``)."""

# -- metrics --------------------------------------------------------------------------------------
NUM_EXAMPLES: Final = "num-examples"
"""int: the weight of a reply in FedAvg (Flower's ``weighted_by_key`` default)."""
LOSS: Final = "loss"
DICE: Final = "dice"
"""float: Dice averaged over the foreground classes and the site's labelled test volumes."""
MAX_CLASSES: Final = 16
"""Most classes (background included) a model may segment; bounds the ``dice-<k>`` keys."""


def dice_of_class(k: int) -> str:
    """Return the metric key of foreground class ``k``'s Dice: ``"dice-<k>"``.

    Parameters
    ----------
    k : int
        The class's voxel value, 1 to ``MAX_CLASSES - 1`` (as the datalist's ``labels``).

    Returns
    -------
    str
        ``"dice-<k>"``.
    """
    return f"{DICE}-{k}"


STEPS: Final = "steps"
TRAIN_SECONDS: Final = "train-seconds"
FOLDED_PREFIX: Final = "eval-"
"""Prefix of a folded evaluation's metrics inside a train reply (``eval-dice``, ...)."""
EVALUATION_WITHHELD: Final = "withheld"
"""A folded evaluation's only metric (``eval-withheld`` = 1) at a site whose policy withholds it."""
EPSILON: Final = "epsilon"
EPSILON_CAP: Final = "epsilon-cap"
DELTA: Final = "delta"
NOISE_MULTIPLIER: Final = "noise-multiplier"
SAMPLE_RATE: Final = "sample-rate"
DP_STEPS: Final = "dp-steps"
MAX_GRAD_NORM: Final = "max-grad-norm"
PRIVACY_METRICS: Final = (
    EPSILON,
    EPSILON_CAP,
    DELTA,
    NOISE_MULTIPLIER,
    SAMPLE_RATE,
    DP_STEPS,
    MAX_GRAD_NORM,
)
"""The DP metrics a site reports with every DP-trained update."""
LEDGER_ENTRIES: Final = "ledger-entries"
"""int: how many entries the site's privacy ledger holds after charging the round."""
LEDGER_HEAD: Final = "ledger-head"
"""int: the ledger's last entry hash, its first 60 bits (:func:`fedhealth.privacy.records.tag`)."""
LEDGER_HEAD_PREV: Final = "ledger-head-prev"
"""int: the hash that last entry extends (its ``prev_hash``), first 60 bits."""
LEDGER_METRICS: Final = (LEDGER_ENTRIES, LEDGER_HEAD, LEDGER_HEAD_PREV)
"""Where a DP site's ledger stands, reported with every DP-trained update: the coordinator stops
taking updates from a site whose ledger got shorter or was replaced within a run."""

# -- the reply's ``site`` record ------------------------------------------------------------------
SITE_NAME: Final = "name"
ACCOUNTANT: Final = "accountant"
HISTORY_NOISE: Final = "history-noise"
HISTORY_RATE: Final = "history-rate"
HISTORY_STEPS: Final = "history-steps"
"""The ledger's phases (noise, sampling rate, steps) behind the reported epsilon."""
PRIVACY_UNIT: Final = "privacy-unit"
"""str: with DP, what one DP record is at the site: ``"patient"`` or ``"scan"``."""
DP_OFF_BY_SITE: Final = "dp-off-by-site"
"""bool: True when the site trained without DP by its own policy (``require_dp: false``)."""
DP_NOISE_SEEDED: Final = "dp-noise-seeded"
"""bool: True when the site drew its DP noise from its own fixed seed (``dp_noise_seed``), not
from its OS entropy: reproducible by whoever knows that seed (tests only)."""
SECAGG_MARKER_PREFIX: Final = "secagg"
"""Markers below are set only by the coordinator's own :class:`SecureGrid`; a site's are dropped."""
SECAGG_SIZE: Final = "secagg-size"
"""int: how many sites the coordinator sampled into this secure sum (advertise stage); a site
refuses below its ``policy.min_secagg_sites``, and checks the survivors again before unmasking."""
SECAGG_SUM: Final = "secagg-sum"
SECAGG_SITES: Final = "secagg-sites"
SECAGG_METRICS_ONLY: Final = "secagg-metrics-only"
SECURE_SUM_NAME: Final = "secure-sum"

# -- secure-aggregation stages (message types ``train.<stage>``) -----------------------------------
STAGE_ADVERTISE: Final = "secagg_advertise"
STAGE_SHARE: Final = "secagg_share"
STAGE_MASK: Final = "secagg_mask"
STAGE_UNMASK: Final = "secagg_unmask"
STAGES: Final = (STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASK, STAGE_UNMASK)
# advertise (coordinator -> site)
SECAGG_SITE_ID: Final = "site-id"
SECAGG_NEIGHBOURS: Final = "neighbours"
SECAGG_THRESHOLD: Final = "threshold"
SECAGG_CLIP: Final = "clip"
SECAGG_LEVELS: Final = "levels"
SECAGG_MAX_EXAMPLES: Final = "max-examples"
# advertise (site -> coordinator), share (coordinator -> site)
SECAGG_PUBLIC_C: Final = "c"
SECAGG_PUBLIC_S: Final = "s"
SECAGG_IDS: Final = "ids"
# share (site -> coordinator), mask (coordinator -> site)
SECAGG_TO: Final = "to"
SECAGG_FROM: Final = "from"
SECAGG_BLOBS: Final = "blobs"
# unmask
SECAGG_SURVIVORS: Final = "survivors"
SECAGG_DROPPED: Final = "dropped"
SECAGG_OWNERS: Final = "owners"
SECAGG_SHARES: Final = "shares"

# -- run config (``flwr run --run-config``) --------------------------------------------------------
RUN_CONFIG: Final = "fedhealth-config"
"""The run's resolved config as one JSON string of plain values."""

# -- node config (site daemon -> its ClientApps, never over the network) ---------------------------
NODE_DATA_DIR: Final = "data-dir"
NODE_SITE_NAME: Final = "site-name"
NODE_LEDGER_DIR: Final = "ledger-dir"
NODE_EPSILON_CAP: Final = "epsilon-cap"
NODE_DELTA: Final = "delta"
NODE_EGRESS_LOG: Final = "egress-log"
NODE_PRIVACY_UNIT: Final = "privacy-unit"
"""str: the site's privacy unit, ``"patient"`` (default) or ``"scan"`` (site.yaml only)."""
NODE_POLICY: Final = "site-policy"
"""str: the site's privacy policy as JSON (:class:`fedhealth.privacy.policy.SitePolicy`, site.yaml
``policy:``); absent: the policy's defaults (DP and secure aggregation required)."""
NODE_NOISE_SEED: Final = "dp-noise-seed"
NODE_DEVICE: Final = "device"
"""Node config: where the site trains (site.yaml ``device``: auto, cpu, cuda, cuda:N)."""
"""The site's own seed for deterministic DP noise (site.yaml ``dp_noise_seed``; tests only)."""
PRIVACY_UNITS: Final = ("patient", "scan")
"""The values of :data:`NODE_PRIVACY_UNIT`; the first is the default."""
NODE_PARTITION_ID: Final = "partition-id"
"""Simulation only: the virtual site's index under ``data.root``."""
