"""Secure aggregation on Flower's Message API: the coordinator learns only the sum.

Flower's own SecAgg+ runs only on its legacy workflow, so this module carries the protocol of
:mod:`fedhealth.security.secagg` over Message-API messages:

* :class:`SecureGrid` wraps the ServerApp's ``Grid``. When a strategy sends a round's ``train``
  instructions, it runs the four stages instead (``train.secagg_advertise``,
  ``train.secagg_share``, ``train.secagg_mask`` carrying the real training instruction,
  ``train.secagg_unmask``) and hands the strategy one reply holding the unmasked weighted mean
  with the total example count, plus one metrics-only reply per contributing site. Any Flower
  strategy (FedAvg, FedProx, FedAdam) then aggregates as usual.
* :func:`fedhealth.clientapp.secagg_stages.handle_stage` is the site's side. Its protocol
  secrets live in the SuperNode's ``context.state`` between stages and never leave the site.

Every stage has the round's deadline. A site that fails a stage is dropped; when fewer than the
threshold remain, the round fails cleanly: the strategy receives no update and the global model
stays as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.serverapp import Grid

from fedhealth.errors import ConfigError, LedgerShrank, SecAggError, UpdateRejected
from fedhealth.protocol import keys as K
from fedhealth.protocol.npy import array_view
from fedhealth.protocol.packing import is_packed, unflatten
from fedhealth.runs.ledgers import LedgerWatch, ledger_fields
from fedhealth.security.secagg import SecAggParams, SecAggServer, auto_degree, neighbour_graph
from fedhealth.security.validation import validate_metrics
from fedhealth.serverapp.delegating_grid import DelegatingGrid

log = logging.getLogger("fedhealth.secagg")

T = TypeVar("T")


@dataclass(frozen=True)
class MaskedReply:
    """A site's checked reply to the mask stage.

    Parameters
    ----------
    vector : np.ndarray
        The masked, quantised update, then its training loss, with the example count as its
        last word; shape ``(model size + 2,)``, unsigned or signed integers.
    metrics : MetricRecord
        The site's validated plaintext metrics (what its policy releases: epsilon, the ledger's
        standing; passed on to the strategy, metrics only).
    site : ConfigRecord
        The site's ``site`` record (its name and privacy unit).
    """

    vector: np.ndarray
    metrics: MetricRecord
    site: ConfigRecord


class SecureGrid(DelegatingGrid):
    """A ``Grid`` whose train rounds are securely aggregated (see the module docstring).

    Implements SecAgg+ (Bell et al., https://eprint.iacr.org/2020/704; SecAgg: Bonawitz et al.,
    https://eprint.iacr.org/2017/281) with :mod:`fedhealth.security.secagg`.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid; everything but train rounds passes through to it.
    threshold_fraction : float, default 0.51
        Shamir threshold as a fraction of the round's sites (at least 2; above one half, so no
        two disjoint groups can each unmask); in (0, 1].
    degree : int, default 0
        Neighbours per site in the SecAgg+ graph; 0 = all (SecAgg); -1 = SecAgg+'s
        logarithmic degree (:func:`~fedhealth.security.secagg_primitives.auto_degree`); >= -1.
        With fewer neighbours than other sites, the Shamir threshold is the fraction of a
        site's neighbourhood (itself and its neighbours), as in SecAgg+.
    clipping_range : float, default 8.0
        Update values are clipped to ``[-clipping_range, clipping_range]`` before quantisation;
        see :class:`fedhealth.security.secagg.SecAggParams`.
    max_examples : int, default 1024
        Public bound on one site's example count (it is summed inside the mask); >= 1.
    ledgers : LedgerWatch or None, default None
        The run's watch over the sites' reported ledgers: a mask reply whose ledger shrank is
        dropped before its masked update enters the sum (its masks are then removed as a
        dropped site's).

    Raises
    ------
    ConfigError
        A parameter is out of its range.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        threshold_fraction: float = 0.51,
        degree: int = 0,
        clipping_range: float = 8.0,
        max_examples: int = 1024,
        ledgers: LedgerWatch | None = None,
    ) -> None:
        checks = {
            "threshold_fraction": 0 < threshold_fraction <= 1,
            "degree": degree >= -1,
            "clipping_range": clipping_range > 0,
            "max_examples": max_examples >= 1,
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ConfigError(f"SecureGrid: {', '.join(bad)} out of range")
        super().__init__(grid)
        self.threshold_fraction, self.degree = threshold_fraction, degree
        self.clipping_range, self.max_examples = clipping_range, max_examples
        self.ledgers = ledgers
        self._errors: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run a train round as secure aggregation; pass any other messages through.

        Parameters
        ----------
        messages : Iterable[Message]
            One phase's instructions; a train round's have message type ``train``.
        timeout : float or None, default None
            Seconds each stage waits for replies.

        Returns
        -------
        list[Message]
            For a train round: one reply with the unmasked weighted mean and the total example
            count, one metrics-only reply per summed site, and every error reply of any stage.
            When the protocol fails, only the error replies (the model stays as it was).
        """
        msgs = list(messages)
        if not msgs or msgs[0].metadata.message_type != "train":
            return self.grid.send_and_receive(msgs, timeout=timeout)
        self._errors = []
        try:
            return [*self._secure_round(msgs, timeout), *self._errors]
        except SecAggError as exc:
            log.warning("secure aggregation failed, no update this round: %s", exc)
        except Exception:  # noqa: BLE001 - whatever a site sent, the coordinator goes on
            log.exception("secure aggregation failed on a malformed reply, no update this round")
        return list(self._errors)  # the strategy sees who failed; the model stays as it was

    def _stage(
        self,
        stage: str,
        contents: dict[int, RecordDict],
        node_of: dict[int, int],
        timeout: float | None,
        parse: Callable[[Message], T],
    ) -> dict[int, T]:
        """Send each protocol id its content; return the parsed replies by protocol id.

        An error reply, or one ``parse`` cannot read, drops that site.
        """
        pid_of = {node: pid for pid, node in node_of.items()}
        out = [
            Message(content, node_of[pid], f"train.{stage}") for pid, content in contents.items()
        ]
        replies: dict[int, T] = {}
        for reply in self.grid.send_and_receive(out, timeout=timeout):
            pid = pid_of.get(reply.metadata.src_node_id)
            if pid is None:
                continue
            if reply.has_error():
                log.warning("%s: site %d dropped (%s)", stage, pid, reply.error.reason)
                self._errors.append(reply)  # passed on: the strategy counts failures/refusals
                continue
            try:
                replies[pid] = parse(reply)
            except (
                KeyError,
                TypeError,
                ValueError,
                IndexError,
                AttributeError,
                UpdateRejected,
            ) as exc:
                log.warning(
                    "%s: site %d dropped: malformed reply (%s: %.200s)",
                    stage,
                    pid,
                    type(exc).__name__,
                    exc,
                )
        return replies

    def _secure_round(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        # Protocol ids 1..n (Flower node ids are unsigned 64-bit, beyond ConfigRecord's ints).
        node_of = {pid: m.metadata.dst_node_id for pid, m in enumerate(msgs, start=1)}
        by_node = {pid: m for pid, m in enumerate(msgs, start=1)}
        nodes = sorted(by_node)
        degree = auto_degree(len(nodes)) if self.degree == -1 else self.degree or len(nodes) - 1
        graph = neighbour_graph(nodes, degree)
        # SecAgg+: each secret is shared within a site's neighbourhood (itself + neighbours)
        neighbourhood = 1 + min(len(peers) for peers in graph.values())
        threshold = max(2, math.ceil(self.threshold_fraction * neighbourhood))
        if len(nodes) < threshold:
            raise SecAggError(f"{len(nodes)} site(s) sampled, fewer than the threshold {threshold}")
        params = SecAggParams.sized(len(nodes), threshold, self.clipping_range, self.max_examples)
        server = SecAggServer(params, graph)

        setup = {
            n: RecordDict(
                {
                    K.SECAGG: ConfigRecord(
                        {
                            K.SECAGG_SITE_ID: n,
                            K.SECAGG_NEIGHBOURS: graph[n],
                            K.SECAGG_THRESHOLD: params.threshold,
                            K.SECAGG_CLIP: params.clipping_range,
                            K.SECAGG_LEVELS: params.quantization_levels,
                            K.SECAGG_MAX_EXAMPLES: params.max_examples,
                            K.SECAGG_SIZE: len(nodes),
                        }
                    )
                }
            )
            for n in nodes
        }
        server.publics.update(self._stage(K.STAGE_ADVERTISE, setup, node_of, timeout, _publics))

        shares = {}
        for n in server.publics:
            peers = [p for p in [n, *graph[n]] if p in server.publics]
            shares[n] = RecordDict(
                {
                    K.SECAGG: ConfigRecord(
                        {
                            K.SECAGG_IDS: peers,
                            K.SECAGG_PUBLIC_C: [server.publics[p][0] for p in peers],
                            K.SECAGG_PUBLIC_S: [server.publics[p][1] for p in peers],
                        }
                    )
                }
            )
        server.shared.update(self._stage(K.STAGE_SHARE, shares, node_of, timeout, _blobs))

        inbox = server.route()
        masks = {}
        for n, received in inbox.items():
            content = RecordDict({**by_node[n].content})
            content[K.SECAGG] = ConfigRecord(
                {
                    K.SECAGG_FROM: list(received) or [0],
                    K.SECAGG_BLOBS: list(received.values()) or [b""],
                }
            )
            masks[n] = content
        template = by_node[nodes[0]].content.array_records[K.ARRAYS]
        size = sum(array_view(a).size for a in template.values()) + 2  # + the loss and the count
        pid_of_node = {node: pid for pid, node in node_of.items()}

        def masked(reply: Message) -> MaskedReply:
            pid = pid_of_node.get(reply.metadata.src_node_id, 0)
            parsed = _masked(reply, size, self.max_examples, pid)
            name = str(parsed.site.get(K.SITE_NAME, pid))
            if self.ledgers is not None and K.EPSILON in parsed.metrics:  # before the sum
                metrics = dict(parsed.metrics.items())
                self.ledgers.check(name, _round(by_node[pid]), ledger_fields(metrics, name))
            elif self.ledgers is not None and name in self.ledgers.stopped:  # epsilon left out
                raise LedgerShrank(
                    f"{self.ledgers.stopped[name]}; no update of site {name} is taken"
                )
            return parsed

        site_replies = self._stage(K.STAGE_MASK, masks, node_of, timeout, masked)
        for node, parsed in site_replies.items():
            server.masked[node] = parsed.vector.astype(np.uint32)

        survivors, dropped = server.survivors_and_dropped()
        unmask = {
            n: RecordDict(
                {
                    K.SECAGG: ConfigRecord(
                        {K.SECAGG_SURVIVORS: survivors, K.SECAGG_DROPPED: dropped or [0]}
                    )
                }
            )
            for n in survivors
        }
        reveals = self._stage(K.STAGE_UNMASK, unmask, node_of, timeout, _reveals)
        template = by_node[survivors[0]].content.array_records[K.ARRAYS]
        # a packed model is float32 whatever its wire dtype: no float64 copy of the mean; one
        # array per tensor keeps float64 until each is cast to its own dtype
        mean, count = server.aggregate(reveals, np.float32 if is_packed(template) else np.float64)
        log.info(
            "secure aggregation: %d site(s) summed, %d dropped, %d examples",
            len(survivors),
            len(dropped),
            count,
        )
        loss = float(mean[-1])  # the summed sites' example-weighted mean training loss
        aggregate = Message(
            RecordDict(
                {
                    K.ARRAYS: unflatten(mean[:-1], template),
                    K.METRICS: MetricRecord({K.NUM_EXAMPLES: count, K.LOSS: loss}),
                    K.SITE: ConfigRecord(
                        {
                            K.SITE_NAME: K.SECURE_SUM_NAME,
                            K.SECAGG_SUM: True,
                            K.SECAGG_SITES: len(survivors),
                        }
                    ),
                }
            ),
            reply_to=by_node[survivors[0]],
        )
        per_site = [
            Message(
                RecordDict(
                    {
                        K.METRICS: site_replies[n].metrics,
                        K.SITE: ConfigRecord({**site_replies[n].site, K.SECAGG_METRICS_ONLY: True}),
                    }
                ),
                reply_to=by_node[n],
            )
            for n in survivors
        ]
        return [aggregate, *per_site]


def _masked(reply: Message, size: int, max_examples: int, pid: int) -> MaskedReply:
    """Check a mask-stage reply: the vector's length and dtype, the metrics, the site record."""
    try:
        vector = array_view(reply.content.array_records[K.MASKED][K.MASKED], "masked vector")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if vector.shape != (size,) or vector.dtype.kind not in "ui":
        raise ValueError(
            f"masked vector {vector.dtype}{vector.shape}, expected "
            f"({size},): the model, the loss and the example count"
        )
    metrics = reply.content.metric_records[K.METRICS]
    # the count and the loss are inside the sum; a count the site releases is still checked
    validate_metrics(dict(metrics.items()), max_examples, f"protocol id {pid}", (), weighted=False)
    return MaskedReply(vector, metrics, reply.content.config_records[K.SITE])


def _round(msg: Message) -> int:
    """Return the server round an instruction names in its ``config`` record (0: none)."""
    config = msg.content.config_records.get(K.CONFIG)
    value = None if config is None else config.get(K.SERVER_ROUND)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _bytes(value: ConfigRecordValues) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _ints(value: ConfigRecordValues) -> list[int]:
    out = [v for v in value if isinstance(v, int)] if isinstance(value, list) else None
    if out is None or not isinstance(value, list) or len(out) != len(value):
        raise TypeError(f"expected a list of int, got {type(value).__name__}")
    return out


def _bytes_list(value: ConfigRecordValues) -> list[bytes]:
    out = [v for v in value if isinstance(v, bytes)] if isinstance(value, list) else None
    if out is None or not isinstance(value, list) or len(out) != len(value):
        raise TypeError(f"expected a list of bytes, got {type(value).__name__}")
    return out


def _publics(reply: Message) -> tuple[bytes, bytes]:
    rec = reply.content.config_records[K.SECAGG]
    keys = (_bytes(rec[K.SECAGG_PUBLIC_C]), _bytes(rec[K.SECAGG_PUBLIC_S]))
    if any(len(k) > 1024 for k in keys):
        raise ValueError("public key too long")
    return keys


def _blobs(reply: Message) -> dict[int, bytes]:
    rec = reply.content.config_records[K.SECAGG]
    to, blobs = _ints(rec[K.SECAGG_TO]), _bytes_list(rec[K.SECAGG_BLOBS])
    return {int(d): b for d, b in zip(to, blobs, strict=True)}


def _reveals(reply: Message) -> dict[int, bytes]:
    rec = reply.content.config_records[K.SECAGG]
    owners, shares = _ints(rec[K.SECAGG_OWNERS]), _bytes_list(rec[K.SECAGG_SHARES])
    return {int(o): sh for o, sh in zip(owners, shares, strict=True)}
