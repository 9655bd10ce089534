"""The site's side of secure aggregation (:class:`fedhealth.serverapp.secure_grid.SecureGrid`).

Each stage arrives as a ``train.<stage>`` message; the protocol secrets live in the SuperNode's
``context.state`` between stages and never leave the site. Only the mask stage trains (and loads
torch, MONAI and Opacus); the other three start fast in a fresh ClientApp process. The protocol
is SecAgg+ (Bell et al. 2020, https://eprint.iacr.org/2020/704), as
:mod:`fedhealth.security.secagg` implements it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from fedhealth.clientapp.sitelog import emit_failure
from fedhealth.errors import ConfigError
from fedhealth.privacy.policy import node_policy, refuse
from fedhealth.protocol import keys as K
from fedhealth.protocol.packing import flatten, packed_dtype, packed_vector
from fedhealth.protocol.replies import error_reply, node_site_name
from fedhealth.security.secagg import SecAggParams, SecAggSite

if TYPE_CHECKING:
    from fedhealth.config import PrivacyConfig

log = logging.getLogger("fedhealth.site")

STATE_KEY = "secagg"  # the site's protocol state in ``context.state`` (never sent)

Record = dict[str, ConfigRecordValues]


def handle_stage(
    msg: Message,
    context: Context,
    stage: str,
    site_dirs: tuple[str, ...] | None = None,
    privacy: PrivacyConfig | None = None,
    device: str = "auto",
) -> Message:
    """Run the site's side of one stage; protocol secrets stay in ``context.state``.

    Parameters
    ----------
    msg : Message
        The stage's message; its ``secagg`` record holds the stage's inputs.
    context : Context
        Flower's context: the SuperNode's node config and the site's protocol state.
    stage : str
        One of :data:`fedhealth.protocol.keys.STAGES` (advertise, share, mask, unmask).
    site_dirs : tuple of str, optional
        Simulation only: every virtual site's folder, by partition id (default None: the
        node config names the site's data directory).
    privacy : PrivacyConfig, optional
        Simulation only: the sites' budgets (default None).

    Returns
    -------
    Message
        The stage's reply, or a catalogued error reply (no secret, file or stack frame). The
        site's ``policy.min_secagg_sites`` is checked against the sum's announced size
        (advertise) and its survivors (unmask): below it, the site refuses (reply 1007).
    """
    name = "unknown"
    try:
        rec = _record(msg.content.config_records.get(K.SECAGG), K.SECAGG)
        node = context.node_config
        name = node_site_name(node, site_dirs)
        policy = node_policy(node, None if privacy is None else privacy.site_policy)
        if stage == K.STAGE_ADVERTISE:  # the sum's size, before any key exists or data is read
            size, neighbours = _int(rec, K.SECAGG_SIZE), _ints(rec, K.SECAGG_NEIGHBOURS)
            policy.check_secure_sum(name, size, stage)
            params = SecAggParams(
                _int(rec, K.SECAGG_THRESHOLD),
                _float(rec, K.SECAGG_CLIP),
                _int(rec, K.SECAGG_LEVELS),
                _int(rec, K.SECAGG_MAX_EXAMPLES),
            )
            params.check(size)  # threshold within the sum, a sum that cannot wrap
            check_threshold(name, params.threshold, len(set(neighbours)) + 1)
            agent = SecAggSite(_int(rec, K.SECAGG_SITE_ID), params, neighbours)
            c_pub, s_pub = agent.advertise()
            reply = RecordDict(
                {K.SECAGG: ConfigRecord({K.SECAGG_PUBLIC_C: c_pub, K.SECAGG_PUBLIC_S: s_pub})}
            )
        else:
            agent = SecAggSite.from_state(
                _record(context.state.config_records.get(STATE_KEY), "site state")
            )
            if stage == K.STAGE_SHARE:
                ids, c_keys, s_keys = (
                    _ints(rec, K.SECAGG_IDS),
                    _blobs(rec, K.SECAGG_PUBLIC_C),
                    _blobs(rec, K.SECAGG_PUBLIC_S),
                )
                publics = {i: (c, s) for i, c, s in zip(ids, c_keys, s_keys, strict=True)}
                blobs = agent.share_keys(publics)
                reply = RecordDict(
                    {
                        K.SECAGG: ConfigRecord(
                            {K.SECAGG_TO: list(blobs), K.SECAGG_BLOBS: list(blobs.values())}
                        )
                    }
                )
            elif stage == K.STAGE_MASK:
                reply = _mask(msg, context, agent, rec, site_dirs, privacy, device)
            else:
                dropped = [d for d in _ints(rec, K.SECAGG_DROPPED) if d]
                survivors = _ints(rec, K.SECAGG_SURVIVORS)
                # before any reveal; only survivors that shared with this site count (the
                # coordinator could list made-up ids)
                policy.check_secure_sum(name, len(set(survivors) & agent.heard_from), stage)
                shares = agent.unmask(survivors, dropped)
                reply = RecordDict(
                    {
                        K.SECAGG: ConfigRecord(
                            {
                                K.SECAGG_OWNERS: list(shares) or [0],
                                K.SECAGG_SHARES: list(shares.values()) or [b""],
                            }
                        )
                    }
                )
        context.state[STATE_KEY] = ConfigRecord(agent.to_state())
        return Message(reply, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a catalogued error reply
        emit_failure(log, exc, site=name, server_round=_server_round(msg), phase=stage)
        return error_reply(msg, exc, stage, name)


def check_threshold(site: str, threshold: int, holders: int) -> None:
    """Refuse a Shamir threshold of half the share holders or fewer.

    At unmask, each holder reveals either a site's self-mask seed share (the coordinator says
    it survived) or its masking-key share (it dropped), never both; with ``threshold`` above
    half the holders, no two disjoint sets of holders both reach it, so a coordinator that
    tells sites different survivor lists cannot rebuild both secrets of one site and unmask its
    update (Bonawitz et al. 2017, https://eprint.iacr.org/2017/281, Sec. 6: t > n/2).

    Parameters
    ----------
    site : str
        The site's name.
    threshold : int
        The announced Shamir threshold.
    holders : int
        The site's share holders: its neighbours and itself.

    Raises
    ------
    PolicyRefused
        ``2 * threshold <= holders`` (reply 1007, ``[policy: secagg-threshold]``).
    """
    if 2 * threshold <= holders:
        refuse(
            site,
            K.SECAGG_THRESHOLD,
            f"advertise: a Shamir threshold of {threshold} among {holders} share holders; this "
            "site shares its secrets only with a threshold above half the holders",
        )


def _mask(
    msg: Message,
    context: Context,
    agent: SecAggSite,
    rec: Record,
    site_dirs: tuple[str, ...] | None,
    privacy: PrivacyConfig | None,
    device: str = "auto",
) -> RecordDict:
    """Train, then mask the update and its loss for the secure sum (the only stage that trains).

    The masked vector is the flattened update, the training loss, and (last word, added by
    :meth:`~fedhealth.security.secagg.SecAggSite.masked_input`) the example count; the reply's
    plaintext metrics are only what :func:`fedhealth.clientapp.outputs.released` allows.
    """
    from fedhealth.clientapp import handlers  # torch, MONAI, Opacus: mask stage only

    site, data, cfg, instruction, seed = handlers.prepare(
        msg, context, "train", site_dirs, privacy, secure=True, device=device
    )
    update = handlers.train_update(msg, context, site, data, cfg, instruction, seed, secure=True)
    metrics = {**update.metrics, **handlers.folded_evaluation(msg, site, data, cfg, instruction)}
    senders, blobs = _ints(rec, K.SECAGG_FROM), _blobs(rec, K.SECAGG_BLOBS)
    received = {i: b for i, b in zip(senders, blobs, strict=True) if i}
    # the loss rides inside the sum as one more weighted value: the coordinator learns only
    # the example-weighted mean loss of the summed sites, like the model
    if (
        packed_dtype(update.arrays) is not None
    ):  # float32, quantised block by block: no float64 copy
        values = packed_vector(update.arrays)
        vector = np.empty(values.size + 1, dtype=np.float32)
        vector[:-1] = values
        vector[-1] = update.loss
    else:
        vector = np.concatenate([flatten(update.arrays), np.array([update.loss])])
    masked = agent.masked_input(vector, update.examples, received, rng=np.random.default_rng(seed))
    about: Record = {K.SITE_NAME: site.name, **update.accounting}
    return RecordDict(
        {
            K.MASKED: ArrayRecord({K.MASKED: Array(masked)}),
            K.METRICS: MetricRecord(dict[str, MetricRecordValues](metrics)),
            K.SITE: ConfigRecord(about),
        }
    )


def _server_round(msg: Message) -> int | None:
    """Return the server round a stage's message names in its ``config`` record, if any."""
    config = msg.content.config_records.get(K.CONFIG)
    value = None if config is None else config.get(K.SERVER_ROUND)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _record(record: ConfigRecord | None, what: str) -> Record:
    if record is None:
        raise ConfigError(f"secure aggregation: no '{what}' record")
    return dict(record.items())


def _int(rec: Record, key: str) -> int:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"secure aggregation: field '{key}'={value!r}: not an integer")
    return value


def _float(rec: Record, key: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"secure aggregation: field '{key}'={value!r}: not a number")
    return float(value)


def _ints(rec: Record, key: str) -> list[int]:
    value = rec.get(key)
    items = value if isinstance(value, list) else []
    ints = [v for v in items if isinstance(v, int) and not isinstance(v, bool)]
    if not isinstance(value, list) or len(ints) != len(value):
        raise ConfigError(f"secure aggregation: field '{key}': not a list of integers")
    return ints


def _blobs(rec: Record, key: str) -> list[bytes]:
    value = rec.get(key)
    items = value if isinstance(value, list) else []
    blobs = [v for v in items if isinstance(v, bytes)]
    if not isinstance(value, list) or len(blobs) != len(value):
        raise ConfigError(f"secure aggregation: field '{key}': not a list of byte strings")
    return blobs
