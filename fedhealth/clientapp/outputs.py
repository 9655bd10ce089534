"""What a train reply releases to the coordinator: the minimum, plus what the site's policy adds.

By default a site's train reply carries its update (masked, inside the secure sum), what the
secure sum needs for weighting (the example count and the example-weighted training loss ride
*inside* the masked vector, :mod:`fedhealth.clientapp.secagg_stages`), the epsilon it has spent
(with its cap, delta and the clip norm the run set) and where its ledger stands (its length and
head hash, so the coordinator notices a ledger that shrank). A plain train reply, at a site
whose policy allows one, also carries its example count: FedAvg weights by it.

The training loss, time, step count, exact example count, sample rate, noise multiplier and the
site's DP history across runs stay in the site's own log and ledger report unless its policy
lists them in ``release`` (:data:`fedhealth.privacy.policy.RELEASABLE`): each of them, next to
the round's epsilon, tells a curious coordinator something the epsilon does not cover (the
sample rate and the noise multiplier reveal the patient count; the loss is not noised).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecordValues

from fedhealth.privacy.policy import SitePolicy
from fedhealth.protocol import keys as K

ALWAYS: tuple[str, ...] = (K.EPSILON, K.EPSILON_CAP, K.DELTA, K.MAX_GRAD_NORM, *K.LEDGER_METRICS)
"""Metrics every DP train reply carries: the spend, its terms, and the ledger's standing."""

RELEASES: dict[str, tuple[str, ...]] = {
    "loss": (K.LOSS,),
    "train-seconds": (K.TRAIN_SECONDS,),
    "num-examples": (K.NUM_EXAMPLES,),
    "sample-rate": (K.SAMPLE_RATE, K.DP_STEPS, K.STEPS),
    "noise-multiplier": (K.NOISE_MULTIPLIER,),
}
"""``policy.release`` item -> the reply metrics it adds (``history`` adds the site record's
DP history lists, :data:`HISTORY`)."""

HISTORY: tuple[str, ...] = (K.HISTORY_NOISE, K.HISTORY_RATE, K.HISTORY_STEPS)
"""The site record's DP history lists, released only with ``history`` in ``policy.release``."""


def released(
    metrics: Mapping[str, float | int],
    accounting: Mapping[str, ConfigRecordValues],
    policy: SitePolicy,
    *,
    secure: bool,
) -> tuple[dict[str, float | int], dict[str, ConfigRecordValues]]:
    """Select what a train reply may carry from everything the round measured.

    Parameters
    ----------
    metrics : mapping of str to float or int
        Everything the round measured: loss, steps, train seconds, example count, the privacy
        figures and the ledger's standing.
    accounting : mapping of str to ConfigRecordValues
        The reply's ``site`` record fields: the accountant, the DP history lists, the privacy
        unit and the site's DP flags.
    policy : SitePolicy
        The site's policy; its ``release`` list adds to the minimum.
    secure : bool
        Keyword-only. The update goes into a secure sum (the example count and loss ride inside
        it); False: a plain train reply, which also carries the example count.

    Returns
    -------
    tuple of (dict, dict)
        The reply's metrics and its ``site`` record fields.
    """
    keep = set(ALWAYS)
    if not secure:
        keep.add(K.NUM_EXAMPLES)
    for item in policy.release:
        keep.update(RELEASES.get(item, ()))
    out = {key: value for key, value in metrics.items() if key in keep}
    about = {
        key: value
        for key, value in accounting.items()
        if key not in HISTORY or policy.releases("history")
    }
    return out, about
