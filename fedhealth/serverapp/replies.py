"""Read, sort and reshape the sites' replies before the strategy aggregates them.

The coordinator's side of the reply contract (the site's side is
:func:`fedhealth.clientapp.handlers._reply`): which record holds what, which metrics a reply
must carry, how a site names itself, and how the validated replies are handed to Flower's
aggregation. Every name comes from :mod:`fedhealth.protocol.keys`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Final, Literal

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.app.typing import ConfigRecordValues, MetricRecordValues
from flwr.common.constant import ErrorCode as FlowerErrorCode

from fedhealth.errors import BUDGET_REFUSAL, ErrorCode
from fedhealth.protocol import keys as K
from fedhealth.protocol.replies import POLICY_FIELD_TAG
from fedhealth.runs.records import RoundLog, SiteMetrics

log = logging.getLogger("fedhealth.coordinator")

SiteRecord = dict[str, ConfigRecordValues]
"""A reply's ``site`` ConfigRecord as a plain dict (who replied, its accounting history)."""
Metrics = dict[str, MetricRecordValues]
"""A reply's one MetricRecord as a plain dict, before validation."""
Phase = Literal["train", "evaluate"]

_SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ERROR_SITE = re.compile(r"^site ([A-Za-z0-9_.-]{1,64}): ")
APP_REFUSALS = frozenset({int(ErrorCode.SITE_APP_REFUSED), int(FlowerErrorCode.INVALID_FAB)})
"""Error codes of a site that refused the run's app: fedhealth's gate, and Flower's own
``INVALID_FAB`` (a SuperNode with ``--trusted-entities``)."""
REFUSALS: Final = (BUDGET_REFUSAL, int(ErrorCode.SITE_REFUSED_POLICY))
"""Error codes of a site that refused a train round before training (nothing charged)."""
_POLICY_FIELD = re.compile(r"\[" + re.escape(POLICY_FIELD_TAG) + r"(\w+)\]$")


def refusal(reason: str | None) -> str:
    """Say why a site refused a train round, from its error reply's public reason.

    Parameters
    ----------
    reason : str or None
        The reply's reason: the code's fixed text, ending ``[policy: <field>]`` for a policy
        refusal.

    Returns
    -------
    str
        ``"policy: <field>"``, ``"policy"`` when no field is named, or ``"budget"``.
    """
    found = _POLICY_FIELD.search(reason or "")
    if found:
        return f"policy: {found.group(1)}"
    return "policy" if "privacy policy" in (reason or "") else "budget"


def site_record(msg: Message) -> SiteRecord:
    """Return the reply's ``site`` ConfigRecord as a dict.

    Parameters
    ----------
    msg : Message
        A site's reply (an error reply has no content).

    Returns
    -------
    dict[str, ConfigRecordValues]
        The record's items; empty when the reply has no content or no such record.
    """
    record = msg.content.config_records.get(K.SITE) if msg.has_content() else None
    return dict(record.items()) if record is not None else {}


def site_name(msg: Message) -> str:
    """Return the site's self-declared name, or ``node-<id>`` when it declares no valid one.

    Parameters
    ----------
    msg : Message
        A site's reply; the name is :data:`~fedhealth.protocol.keys.SITE_NAME` of its
        :data:`~fedhealth.protocol.keys.SITE` ConfigRecord.

    Returns
    -------
    str
        1 to 64 characters of ``[A-Za-z0-9_.-]``; otherwise ``node-<src_node_id>``.
    """
    name = site_record(msg).get(K.SITE_NAME)
    if isinstance(name, str) and _SITE_NAME.fullmatch(name):  # "$" would pass "name\n"
        return name
    return f"node-{msg.metadata.src_node_id}"


def metrics_of(msg: Message) -> Metrics:
    """Return the items of the reply's first (after sorting: only) MetricRecord.

    Parameters
    ----------
    msg : Message
        A reply with content and at least one MetricRecord.

    Returns
    -------
    dict[str, MetricRecordValues]
        The record's items, not yet validated.

    Raises
    ------
    StopIteration
        The reply holds no MetricRecord (:func:`sort_replies` drops those first).
    """
    record = next(iter(msg.content.metric_records.values()))
    return dict(record.items())


def split_folded(metrics: Metrics) -> tuple[Metrics, Metrics]:
    """Split a train reply's metrics into its own and the folded evaluation's.

    Parameters
    ----------
    metrics : dict[str, MetricRecordValues]
        A train reply's metrics; a folded evaluation's carry
        :data:`~fedhealth.protocol.keys.FOLDED_PREFIX`.

    Returns
    -------
    tuple[dict, dict]
        (train metrics, evaluation metrics with the prefix removed).
    """
    train = {k: v for k, v in metrics.items() if not k.startswith(K.FOLDED_PREFIX)}
    evaluation = {
        k[len(K.FOLDED_PREFIX) :]: v for k, v in metrics.items() if k.startswith(K.FOLDED_PREFIX)
    }
    return train, evaluation


def scalars(metrics: Metrics) -> SiteMetrics:
    """Return the numbers among ``metrics``: after validation, all of them.

    Parameters
    ----------
    metrics : dict[str, MetricRecordValues]
        Metrics that :func:`fedhealth.security.validation.validate_metrics` accepted (it
        rejects lists), so nothing is dropped.

    Returns
    -------
    dict[str, int | float]
        The same metrics, typed as the run directory stores them.
    """
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast an aggregate back to the global model's dtype, rounding for integer dtypes.

    Parameters
    ----------
    values : np.ndarray
        An aggregated parameter (FedAdam's step comes back as float64), any shape.
    dtype : str
        The global model's dtype for it, e.g. ``"float32"`` or ``"int64"``.

    Returns
    -------
    np.ndarray
        Same shape, in ``dtype`` (a view when it already is).
    """
    if np.dtype(dtype).kind in "iu":
        values = np.rint(values)
    return np.asarray(values).astype(dtype, copy=False)


def plain(replies: list[Message], *, arrays: bool) -> list[Message]:
    """Return the validated replies as Flower's aggregation gets them.

    Flower stops the round when record names or metric keys differ between replies; a site
    with DP metrics among sites without is no reason to. So each reply keeps its arrays (when
    ``arrays``) and the train metrics that every reply has, under the same record names.

    Parameters
    ----------
    replies : list[Message]
        Validated replies, in the order they are to be aggregated.
    arrays : bool
        Keep each reply's :data:`~fedhealth.protocol.keys.ARRAYS` record (train) or not
        (evaluate).

    Returns
    -------
    list[Message]
        One message per reply, same metadata, same order.
    """
    metrics = [split_folded(metrics_of(msg))[0] for msg in replies]
    common = set.intersection(*(set(m) for m in metrics)) if metrics else set()
    out = []
    for msg, values in zip(replies, metrics, strict=True):
        content = RecordDict({K.METRICS: MetricRecord({k: values[k] for k in sorted(common)})})
        if arrays:
            content[K.ARRAYS] = msg.content.array_records[K.ARRAYS]
        out.append(make_message(msg.metadata, content))
    return out


def sort_replies(
    replies: Iterable[Message],
    *,
    server_round: int,
    phase: Phase,
    entry: RoundLog,
    node_names: dict[int, str],
) -> list[tuple[str, Message]]:
    """Count and log the error replies; return the others by site name, then node id.

    A reply without exactly one MetricRecord is rejected (recorded in ``entry``). A name that
    more than one node claims this round is ambiguous: each claimant gets ``#node-<id>``
    appended. An error reply counts as refused when its code is
    one of :data:`REFUSALS` (budget, site policy) in a train round, otherwise as failed; its
    text names the site only if no other node is known or claimed by that name.

    Parameters
    ----------
    replies : Iterable[Message]
        The round's replies, in arrival order.
    server_round : int
        The round (run-wide, resumed offset included), for the log.
    phase : {"train", "evaluate"}
        Which message phase the replies answer.
    entry : RoundLog
        The round's log; rejections, refusals and failures are recorded in it.
    node_names : dict[int, str]
        Node id -> site name as learnt so far in the run; updated in place.

    Returns
    -------
    list[tuple[str, Message]]
        (site name, reply) of the replies kept, sorted by name, then node id.
    """
    kept: list[tuple[str, Message]] = []
    answered: list[Message] = []
    errors: list[Message] = []
    rejected = entry.rejected if phase == "train" else entry.rejected_evaluate
    for msg in replies:
        (errors if msg.has_error() else answered).append(msg)
    claims: dict[str, set[int]] = {}
    for msg in answered:
        claims.setdefault(site_name(msg), set()).add(msg.metadata.src_node_id)
    if clashes := sorted(n for n, nodes in claims.items() if len(nodes) > 1):
        log.warning(
            "round %d %s: site name(s) %s claimed by more than one node",
            server_round,
            phase,
            clashes[:5],
        )
    named = sorted(
        (
            (f"{name}#node-{msg.metadata.src_node_id}" if name in clashes else name, msg)
            for name, msg in ((site_name(m), m) for m in answered)
        ),
        key=lambda pair: (pair[0], pair[1].metadata.src_node_id),
    )
    for name, msg in named:
        records = msg.content.metric_records
        if len(records) == 1:
            node_names[msg.metadata.src_node_id] = name
            kept.append((name, msg))
        else:
            rejected[name] = f"site {name}: expected exactly one MetricRecord, got {len(records)}"
            log.warning("round %d %s: rejected reply: %s", server_round, phase, rejected[name])
    owner = {name: node for node, name in node_names.items()}
    for name in clashes:  # claimed by several nodes: no error text may take the plain name
        owner.setdefault(name, -1)
    for msg in errors:
        node = msg.metadata.src_node_id
        named_in = _ERROR_SITE.match(msg.error.reason or "")
        if named_in and owner.setdefault(named_in.group(1), node) == node:
            node_names.setdefault(node, named_in.group(1))
        if msg.error.code in APP_REFUSALS:
            name = node_names.get(node, f"node-{node}")
            rejected[name] = (
                f"app not approved at site {name} (E{int(ErrorCode.SITE_APP_REFUSED):04d}): "
                "its code did not run there; the site must approve this FAB's sha256"
            )
            entry.failed[phase] += 1
            log.error("round %d %s: node %d: %s", server_round, phase, node, rejected[name])
            continue
        if msg.error.code in REFUSALS and phase == "train":
            entry.refused[node_names.get(node, f"node-{node}")] = refusal(msg.error.reason)
        elif phase != "evaluate" or refusal(msg.error.reason) != "policy: release":
            entry.failed[phase] += 1  # (a site whose policy withholds evaluation: not failed)
        log.warning(  # the reason is the site's text: shortened, quoted
            "round %d %s: node %d replied with error %d: %r",
            server_round,
            phase,
            node,
            msg.error.code,
            (msg.error.reason or "")[:200],
        )
    return kept
