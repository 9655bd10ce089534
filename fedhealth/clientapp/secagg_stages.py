"""The site's side of secure aggregation (:class:`fedhealth.serverapp.secure_grid.SecureGrid`).

Each stage arrives as a ``train.<stage>`` message; the protocol secrets live in the SuperNode's
``context.state`` between stages and never leave the site. Only the mask stage trains (and loads
torch, MONAI and Opacus); the other three start fast in a fresh ClientApp process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedhealth.protocol import keys as K
from fedhealth.protocol.packing import flatten
from fedhealth.protocol.replies import error_reply
from fedhealth.security.secagg import SecAggParams, SecAggSite

if TYPE_CHECKING:
    from fedhealth.config import PrivacyConfig

STATE_KEY = "secagg"  # the site's protocol state in ``context.state`` (never sent)


def handle_stage(
    msg: Message,
    context: Context,
    stage: str,
    data_root: str | None = None,
    privacy: PrivacyConfig | None = None,
) -> Message:
    """The site's side of one stage; protocol secrets stay in ``context.state``."""
    name = "unknown"
    try:
        rec = dict(msg.content[K.SECAGG].items())
        if stage == K.STAGE_ADVERTISE:
            params = SecAggParams(
                int(rec[K.SECAGG_THRESHOLD]),
                float(rec[K.SECAGG_CLIP]),
                int(rec[K.SECAGG_LEVELS]),
                int(rec[K.SECAGG_MAX_EXAMPLES]),
            )
            agent = SecAggSite(
                int(rec[K.SECAGG_SITE_ID]), params, [int(n) for n in rec[K.SECAGG_NEIGHBOURS]]
            )
            c_pub, s_pub = agent.advertise()
            reply = RecordDict(
                {K.SECAGG: ConfigRecord({K.SECAGG_PUBLIC_C: c_pub, K.SECAGG_PUBLIC_S: s_pub})}
            )
        else:
            agent = SecAggSite.from_state(dict(context.state[STATE_KEY].items()))
            if stage == K.STAGE_SHARE:
                publics = {
                    int(i): (bytes(c), bytes(s))
                    for i, c, s in zip(
                        rec[K.SECAGG_IDS], rec[K.SECAGG_PUBLIC_C], rec[K.SECAGG_PUBLIC_S]
                    )
                }
                blobs = agent.share_keys(publics)
                reply = RecordDict(
                    {
                        K.SECAGG: ConfigRecord(
                            {K.SECAGG_TO: list(blobs), K.SECAGG_BLOBS: list(blobs.values())}
                        )
                    }
                )
            elif stage == K.STAGE_MASK:
                from fedhealth.clientapp import handlers  # torch/MONAI: mask stage only

                name = handlers.Site.from_context(context, data_root, privacy).name
                reply = _mask(msg, context, agent, rec, data_root, privacy)
            else:
                dropped = [int(d) for d in rec[K.SECAGG_DROPPED] if int(d)]
                shares = agent.unmask([int(s) for s in rec[K.SECAGG_SURVIVORS]], dropped)
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
        return error_reply(msg, exc, stage, name)


def _mask(
    msg: Message,
    context: Context,
    agent: SecAggSite,
    rec: dict[str, Any],
    data_root: str | None,
    privacy: PrivacyConfig | None,
) -> RecordDict:
    from fedhealth.clientapp import handlers

    site, data, cfg, settings, seed = handlers.prepare(msg, context, "train", data_root, privacy)
    arrays, metrics, accounting = handlers.train_update(
        msg, context, site, data, cfg, settings, seed
    )
    metrics.update(handlers.folded_evaluation(msg, site, data, cfg, settings))
    received = {int(i): bytes(b) for i, b in zip(rec[K.SECAGG_FROM], rec[K.SECAGG_BLOBS]) if int(i)}
    masked = agent.masked_input(
        flatten(arrays), int(metrics[K.NUM_EXAMPLES]), received, rng=np.random.default_rng(seed)
    )
    about = {K.SITE_NAME: site.name, **accounting}
    return RecordDict(
        {
            K.MASKED: ArrayRecord({K.MASKED: Array(masked)}),
            K.METRICS: MetricRecord(metrics),
            K.SITE: ConfigRecord(about),
        }
    )
