"""Check one site's reply and record it in the round's log.

The coordinator's checks of the reply contract: what a train or evaluation reply must report
(:data:`TRAIN_METRICS`, :data:`EVALUATE_METRICS`), the validation it passes
(:mod:`fedhealth.security.validation`) and what of it goes to the run directory. A reply that
fails is recorded as rejected, with the reason, and never ends the round.
"""

from __future__ import annotations

import logging
from typing import Final

from flwr.app import ArrayRecord, Message

from fedhealth.errors import LedgerShrank, UpdateRejected
from fedhealth.protocol import keys as K
from fedhealth.runs.ledgers import ledger_fields
from fedhealth.runs.records import PrivacyRow, RoundLog, SiteMetrics
from fedhealth.security.validation import validate_accounting, validate_metrics, validate_update
from fedhealth.serverapp.replies import (
    Metrics,
    SiteRecord,
    metrics_of,
    scalars,
    site_record,
    split_folded,
)

log = logging.getLogger("fedhealth.coordinator")

TRAIN_METRICS: Final = (K.NUM_EXAMPLES,)
"""What a plain train reply must report (FedAvg's weight); beside a masked update, nothing."""
EVALUATE_METRICS: Final = (K.NUM_EXAMPLES, K.DICE, K.LOSS)
"""What an evaluation (its own reply, or folded into a train reply) must report."""
EVALUATE_BOUNDS: Final = {K.dice_of_class(k): (0.0, 1.0) for k in range(1, K.MAX_CLASSES)}
EVALUATE_BOUNDS[K.DICE] = (0.0, 1.0)
"""Closed ranges of evaluation metrics; a value outside is rejected."""
NO_TEST_CASES: Final = {K.NUM_EXAMPLES: 0}
"""The whole evaluation of a site without labelled test cases: it reports no Dice."""


def _no_test_cases(metrics: Metrics, name: str, server_round: int) -> bool:
    if none := dict(metrics) == NO_TEST_CASES:
        log.info("round %d evaluate: site %s has no labelled test case", server_round, name)
    return none


DP_OFF_STATUS: Final = "dp off by the site's own choice"
"""Privacy-table status of a site that trained without DP under its ``require_dp: false``."""


def _numbers(about: SiteRecord, key: str) -> list[int | float]:
    value = about.get(key, [])
    return [v for v in value if isinstance(v, int | float)] if isinstance(value, list) else []


def privacy_row(metrics: SiteMetrics, about: SiteRecord) -> PrivacyRow:
    """Return one site's row of the privacy table from its validated reply.

    Parameters
    ----------
    metrics : dict[str, int | float]
        The reply's validated train metrics, with :data:`~fedhealth.protocol.keys.EPSILON`.
    about : dict[str, ConfigRecordValues]
        The reply's ``site`` record, checked by
        :func:`fedhealth.security.validation.validate_accounting` (equal-length history lists).

    Returns
    -------
    dict
        The DP metrics of :data:`~fedhealth.protocol.keys.PRIVACY_METRICS` under snake_case
        names, the ``accountant``, the site's ``privacy_unit`` (``"patient"``, ``"scan"`` or
        ``"unstated"``), ``noise_seeded`` when the site fixed its noise seed, and the
        ``history`` as ``[noise, sample rate, steps]`` rows.
    """
    row: PrivacyRow = {k.replace("-", "_"): metrics[k] for k in K.PRIVACY_METRICS if k in metrics}
    row["accountant"] = str(about.get(K.ACCOUNTANT, ""))
    if all(k in metrics for k in K.LEDGER_METRICS):  # checked by check_ledger
        row.update(ledger_fields(metrics, "?"))
    unit = about.get(K.PRIVACY_UNIT)
    row["privacy_unit"] = unit if isinstance(unit, str) and unit in K.PRIVACY_UNITS else "unstated"
    if about.get(K.DP_NOISE_SEEDED) is True:
        row["noise_seeded"] = True
    history = zip(  # lengths checked equal by validate_accounting
        _numbers(about, K.HISTORY_NOISE),
        _numbers(about, K.HISTORY_RATE),
        _numbers(about, K.HISTORY_STEPS),
        strict=True,
    )
    row["history"] = [list(h) for h in history]
    return row


def check_ledger(entry: RoundLog, name: str, metrics: Metrics, server_round: int) -> None:
    """Check a train reply's ledger report: the site's ledger may only grow within a run.

    Parameters
    ----------
    entry : RoundLog
        The round's log (its :class:`~fedhealth.runs.ledgers.LedgerWatch` is the run's).
    name : str
        The site's name.
    metrics : dict[str, MetricRecordValues]
        Its validated train metrics; with ``epsilon`` they must carry
        :data:`~fedhealth.protocol.keys.LEDGER_METRICS`.
    server_round : int
        The round (run-wide).

    Raises
    ------
    UpdateRejected
        A DP reply without its ledger report.
    LedgerShrank
        The site's ledger got shorter or was replaced, now or earlier in the run.
    """
    if K.EPSILON in metrics:
        entry.ledgers.check(name, server_round, ledger_fields(metrics, name))
    elif name in entry.ledgers.stopped:
        raise LedgerShrank(f"{entry.ledgers.stopped[name]}; no update of site {name} is taken")


def record_site(entry: RoundLog, name: str, metrics: SiteMetrics, about: SiteRecord) -> None:
    """Record a site's accepted train metrics, and its privacy row when it reports epsilon.

    A site that trained without DP by its own policy (``dp-off-by-site``) gets a privacy row
    whose status is :data:`DP_OFF_STATUS`.

    Parameters
    ----------
    entry : RoundLog
        The round's log.
    name : str
        The site's name.
    metrics : dict[str, int | float]
        Its validated train metrics.
    about : dict[str, ConfigRecordValues]
        Its validated ``site`` record.
    """
    entry.train[name] = metrics
    if K.EPSILON in metrics:
        entry.privacy[name] = privacy_row(metrics, about)
    elif about.get(K.DP_OFF_BY_SITE) is True:
        entry.privacy[name] = {"status": DP_OFF_STATUS}


def check_metrics_only(
    entry: RoundLog,
    name: str,
    metrics: Metrics,
    about: SiteRecord,
    *,
    max_examples: int,
    server_round: int,
) -> None:
    """Check and record a site's metrics whose update is inside the secure sum.

    Parameters
    ----------
    entry : RoundLog
        The round's log: the site's metrics, or why they were rejected, go there.
    name : str
        The site's name.
    metrics : dict[str, MetricRecordValues]
        Its train metrics (a folded evaluation's split off).
    about : dict[str, ConfigRecordValues]
        Its ``site`` record (accounting history when it reports epsilon).
    max_examples : int
        Upper bound on its example count.
    server_round : int
        The round, for the log.
    """
    try:
        validate_metrics(metrics, max_examples, name, (), weighted=False)
        if K.EPSILON in metrics:
            validate_accounting(about, name)
        check_ledger(entry, name, metrics, server_round)
    except UpdateRejected as exc:
        log.warning(
            "round %d: metrics not recorded (the update is in the secure sum): %s",
            server_round,
            exc,
        )
        entry.rejected[name] = f"{exc} (metrics only: the update is in the sum)"
        return
    record_site(entry, name, scalars(metrics), about)


def check_update(
    entry: RoundLog,
    name: str,
    msg: Message,
    metrics: Metrics,
    about: SiteRecord,
    *,
    reference: ArrayRecord | None,
    max_examples: int,
    server_round: int,
) -> bool:
    """Check a train reply's update against the global model; record the site when accepted.

    The secure sum (``secagg-sum`` in ``about``) may count up to ``secagg-sites`` times
    ``max_examples`` and is not recorded as a site.

    Parameters
    ----------
    entry : RoundLog
        The round's log: the site's metrics, or why its update was rejected, go there.
    name : str
        The site's name.
    msg : Message
        Its reply: one ArrayRecord ``arrays``, one MetricRecord (a folded evaluation may ride in
        it).
    metrics : dict[str, MetricRecordValues]
        The reply's train metrics (a folded evaluation's split off).
    about : dict[str, ConfigRecordValues]
        Its ``site`` record; ``secagg-*`` markers only when they are trusted.
    reference : ArrayRecord or None
        The global model sent this round (keys, shapes, dtypes the update must have).
    max_examples : int
        Upper bound on one site's example count.
    server_round : int
        The round, for the log.

    Returns
    -------
    bool
        Whether the update may be aggregated.
    """
    summed = about.get(K.SECAGG_SITES, 1)
    bound = max_examples * (summed if isinstance(summed, int) else 1)
    try:
        if reference is None:
            raise UpdateRejected("no reference model for this round")
        validate_update(reference, msg.content, bound, name, TRAIN_METRICS)
        if K.EPSILON in metrics:
            validate_accounting(about, name)
        if not about.get(K.SECAGG_SUM):
            check_ledger(entry, name, metrics, server_round)
    except UpdateRejected as exc:
        log.warning("round %d: rejected update: %s", server_round, exc)
        entry.rejected[name] = str(exc)
        return False
    if about.get(K.SECAGG_SUM):
        entry.secure_sum = {
            **scalars(metrics),
            "sites": int(summed) if isinstance(summed, int) else 1,
        }
    else:
        record_site(entry, name, scalars(metrics), about)
    return True


def check_folded_evaluation(
    entry: RoundLog, name: str, metrics: Metrics, *, max_examples: int, server_round: int
) -> None:
    """Check and record a folded evaluation of round ``server_round``'s model.

    Parameters
    ----------
    entry : RoundLog
        The log of the evaluated round (the one before the train reply's).
    name : str
        The site's name.
    metrics : dict[str, MetricRecordValues]
        The evaluation's metrics, prefix removed: none, a failure; only ``withheld``, the site's
        policy withholds its evaluation (not a failure).
    max_examples, server_round : int
        Upper bound on the example count; the evaluated round, for the log.
    """
    if metrics.get(K.EVALUATION_WITHHELD):
        log.info("round %d evaluate: site %s withholds its evaluation", server_round, name)
        return
    if not metrics:
        entry.failed["evaluate"] += 1
        log.warning("round %d evaluate: site %s trained but sent no evaluation", server_round, name)
        return
    if _no_test_cases(metrics, name, server_round):
        return
    try:
        validate_metrics(metrics, max_examples, name, EVALUATE_METRICS, EVALUATE_BOUNDS)
    except UpdateRejected as exc:
        log.warning("round %d: rejected evaluation: %s", server_round, exc)
        entry.rejected_evaluate[name] = str(exc)
        return
    entry.evaluate[name] = scalars(metrics)


def check_evaluation(
    entry: RoundLog, name: str, msg: Message, *, max_examples: int, server_round: int
) -> bool:
    """Check an evaluation reply (no arrays, bounded metrics); record it when accepted.

    Parameters
    ----------
    entry : RoundLog
        The round's log: the site's metrics, or why they were rejected, go there.
    name : str
        The site's name.
    msg : Message
        Its reply, with exactly one MetricRecord.
    max_examples : int
        Upper bound on the example count.
    server_round : int
        The round, for the log.

    Returns
    -------
    bool
        Whether the evaluation may be aggregated.
    """
    metrics = metrics_of(msg)
    try:
        if msg.content.array_records:
            raise UpdateRejected(
                f"site {name}: an evaluation reply carries no "
                f"ArrayRecord, got {len(msg.content.array_records)}"
            )
        if _no_test_cases(metrics, name, server_round):
            return False
        validate_metrics(metrics, max_examples, name, EVALUATE_METRICS, EVALUATE_BOUNDS)
    except UpdateRejected as exc:
        log.warning("round %d: rejected evaluation: %s", server_round, exc)
        entry.rejected_evaluate[name] = str(exc)
        return False
    entry.evaluate[name] = scalars(metrics)
    return True


def check_train_replies(
    named: list[tuple[str, Message]],
    *,
    entry: RoundLog,
    evaluated: RoundLog | None,
    reference: ArrayRecord | None,
    max_examples: int,
    server_round: int,
    secure: bool,
) -> tuple[list[Message], int]:
    """Check and record a train round's replies; return those to aggregate.

    Parameters
    ----------
    named : list[tuple[str, Message]]
        (site name, reply) in aggregation order, error replies removed
        (:func:`~fedhealth.serverapp.replies.sort_replies`).
    entry : RoundLog
        The round's log.
    evaluated : RoundLog or None
        With folded evaluation, the previous round's log (the replies carry its evaluation);
        None otherwise.
    reference : ArrayRecord or None
        The global model sent this round.
    max_examples : int
        Upper bound on one site's example count.
    server_round : int
        The round (run-wide).
    secure : bool
        Replies come from the coordinator's ``SecureGrid``: its ``secagg-*`` markers are
        trusted. Otherwise a site's markers are dropped.

    Returns
    -------
    tuple[list[Message], int]
        The replies to aggregate (the secure sum, or the accepted updates) and the number of
        sites that contributed (a site whose update is in the sum counts even when its own
        metrics are rejected).
    """
    accepted, contributors = [], 0
    for name, msg in named:
        about = site_record(msg)
        if not secure:
            about = {k: v for k, v in about.items() if not k.startswith(K.SECAGG_MARKER_PREFIX)}
        metrics, evaluation = split_folded(metrics_of(msg))
        if evaluated is not None and not about.get(K.SECAGG_SUM):
            check_folded_evaluation(
                evaluated,
                name,
                evaluation,
                max_examples=max_examples,
                server_round=server_round - 1,
            )
        if about.get(K.SECAGG_METRICS_ONLY):  # a site's metrics; its update is in the sum
            contributors += 1
            check_metrics_only(
                entry, name, metrics, about, max_examples=max_examples, server_round=server_round
            )
        elif check_update(
            entry,
            name,
            msg,
            metrics,
            about,
            reference=reference,
            max_examples=max_examples,
            server_round=server_round,
        ):
            contributors += 0 if about.get(K.SECAGG_SUM) else 1
            accepted.append(msg)
    return accepted, contributors
