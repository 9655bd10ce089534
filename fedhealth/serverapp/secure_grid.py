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

The first two stages do not depend on the model: once a round's unmask replies are in, the
next round's keys are set up (advertise, share) while the coordinator aggregates and checkpoints.
The next round uses them if it samples the same sites and each completed both stages (else it
keys again). A site still gets four stages a round, one message at a time: any later call first
waits for that keying.

Every stage has the round's deadline. A site that fails a stage is dropped; when fewer than the
threshold remain, the round fails cleanly: the strategy receives no update and the global model
stays as it was.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedhealth.errors import ConfigError, LedgerShrank, SecAggError, UpdateRejected
from fedhealth.protocol import keys as K
from fedhealth.protocol.npy import array_view
from fedhealth.protocol.packing import is_packed, unflatten
from fedhealth.runs.ledgers import LedgerWatch, ledger_fields
from fedhealth.security.secagg import SecAggParams, SecAggServer, auto_degree, neighbour_graph
from fedhealth.serverapp.delegating_grid import DelegatingGrid
from fedhealth.serverapp.secagg_replies import (
    Keys,
    MaskedReply,
    parse_blobs,
    parse_masked,
    parse_publics,
    parse_reveals,
    server_round_of,
)

log = logging.getLogger("fedhealth.secagg")

T = TypeVar("T")
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, UpdateRejected)
"""What a parser raises on a reply it cannot read: that site is dropped."""


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
        two disjoint groups can each unmask); in (0.5, 1]: sites refuse a lower one.
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
    last_round : int or None, default None
        The run's last server round: after the unmask stage of any earlier round (as its
        instructions' ``config`` record names it), the same sites' keys for the next round are
        set up in the background. None never keys ahead.

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
        last_round: int | None = None,
    ) -> None:
        checks = {
            "threshold_fraction": 0.5 < threshold_fraction <= 1,
            "degree": degree >= -1,
            "clipping_range": clipping_range > 0,
            "max_examples": max_examples >= 1,
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ConfigError(f"SecureGrid: {', '.join(bad)} out of range")
        super().__init__(grid)
        self.threshold_fraction, self.degree = threshold_fraction, degree
        self.clipping_range, self.max_examples = clipping_range, max_examples
        self.ledgers, self.last_round = ledgers, last_round
        self._ahead: threading.Thread | None = None
        self._next: Keys | None = None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run a train round as secure aggregation; pass any other messages through.

        Either way, keys being set up ahead are waited for first: no site gets two messages
        at once.

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
        if not msgs:  # nothing sent (a folded round's evaluate): the keying goes on meanwhile
            return []
        self.join()
        if msgs[0].metadata.message_type != "train":
            return self.grid.send_and_receive(msgs, timeout=timeout)
        ahead, self._next = self._next, None
        nodes = tuple(sorted({m.metadata.dst_node_id for m in msgs}))
        keys: Keys | None = None
        try:
            if ahead is not None and sorted(ahead.nodes) == list(nodes) and ahead.complete:
                keys = ahead
            else:  # other sites, or one failed while keyed ahead: it gets another chance
                if ahead is not None:
                    log.info("the keys set up ahead do not fit this round: keying again")
                keys = self._new_keys(nodes)
                self._exchange(keys, timeout)
            return [*self._secure_round(msgs, keys, timeout), *keys.errors]
        except SecAggError as exc:
            log.warning("secure aggregation failed, no update this round: %s", exc)
        except Exception:  # noqa: BLE001 - whatever a site sent, the coordinator goes on
            log.exception("secure aggregation failed on a malformed reply, no update this round")
        return [] if keys is None else list(keys.errors)  # the strategy sees who failed

    def join(self) -> None:
        """Wait for the next round's keys being set up ahead, if they are (kept for it)."""
        if self._ahead is not None:
            self._ahead.join()
            self._ahead = None

    def finish(self, timeout: float = 60.0) -> None:
        """Wait up to ``timeout`` seconds for keys being set up ahead, then drop them.

        For a run that ends early (stopped after a round that is not its last): the keying
        thread is a daemon, so a site that never answers cannot keep the ServerApp alive.
        """
        if self._ahead is not None:
            self._ahead.join(timeout)
            if self._ahead.is_alive():
                log.warning("the next round's keying still runs after %.0f s; left behind", timeout)
            self._ahead = None
        self._next = None

    def _key_ahead(self, nodes: tuple[int, ...], timeout: float | None) -> None:
        def run() -> None:
            try:
                keys = self._new_keys(nodes)
                self._exchange(keys, timeout)
                self._next = keys
            except Exception:  # noqa: BLE001 - the next round keys afresh
                log.exception("setting up the next round's keys failed; the round will retry")

        self._ahead = threading.Thread(target=run, name="secagg-key-ahead", daemon=True)
        self._ahead.start()

    def _stage(
        self,
        stage: str,
        contents: dict[int, RecordDict],
        keys: Keys,
        timeout: float | None,
        parse: Callable[[Message], T],
    ) -> dict[int, T]:
        """Send each protocol id its content; return the parsed replies by protocol id.

        An error reply (kept in ``keys.errors``), or one ``parse`` cannot read, drops that site.
        """
        node_of = keys.node_of
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
                keys.errors.append(reply)  # passed on: the strategy counts failures/refusals
                continue
            try:
                replies[pid] = parse(reply)
            except MALFORMED as exc:
                log.warning(
                    "%s: site %d dropped: malformed reply (%s: %.200s)",
                    stage,
                    pid,
                    type(exc).__name__,
                    exc,
                )
        return replies

    def _new_keys(self, nodes: tuple[int, ...]) -> Keys:
        """Size the sum and draw its SecAgg+ graph for these Flower nodes (nothing is sent)."""
        order = list(nodes)
        secrets.SystemRandom().shuffle(order)  # protocol ids: not chosen by node ids
        pids = list(range(1, len(nodes) + 1))
        degree = auto_degree(len(pids)) if self.degree == -1 else self.degree or len(pids) - 1
        graph = neighbour_graph(pids, degree)
        # SecAgg+: each secret is shared within a site's neighbourhood (itself + neighbours)
        neighbourhood = 1 + min(len(peers) for peers in graph.values())
        threshold = max(2, math.ceil(self.threshold_fraction * neighbourhood))
        if len(pids) < threshold:
            raise SecAggError(f"{len(pids)} site(s) sampled, fewer than the threshold {threshold}")
        params = SecAggParams.sized(len(pids), threshold, self.clipping_range, self.max_examples)
        return Keys(tuple(order), SecAggServer(params, graph))

    def _exchange(self, keys: Keys, timeout: float | None) -> None:
        """Stages 1-2: the sites' public keys advertised, their encrypted shares routed."""
        server, graph, params = keys.server, keys.server.graph, keys.server.params
        pids = list(keys.node_of)
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
                            K.SECAGG_SIZE: len(pids),
                        }
                    )
                }
            )
            for n in pids
        }
        server.publics.update(self._stage(K.STAGE_ADVERTISE, setup, keys, timeout, parse_publics))
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
        server.shared.update(self._stage(K.STAGE_SHARE, shares, keys, timeout, parse_blobs))

    def _secure_round(
        self, msgs: list[Message], keys: Keys, timeout: float | None
    ) -> list[Message]:
        """Stages 3-4 with ``keys``; then, unless this is the last round, key the next."""
        server = keys.server
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        by_pid = {pid: by_node[node] for pid, node in keys.node_of.items()}
        masks = {}
        for n, received in server.route().items():
            content = RecordDict({**by_pid[n].content})
            content[K.SECAGG] = ConfigRecord(
                {
                    K.SECAGG_FROM: list(received) or [0],
                    K.SECAGG_BLOBS: list(received.values()) or [b""],
                }
            )
            masks[n] = content
        template = msgs[0].content.array_records[K.ARRAYS]
        size = sum(array_view(a).size for a in template.values()) + 2  # + the loss and the count

        def masked(reply: Message) -> MaskedReply:
            pid = keys.nodes.index(reply.metadata.src_node_id) + 1
            parsed = parse_masked(reply, size, self.max_examples, pid)
            name = str(parsed.site.get(K.SITE_NAME, pid))
            if self.ledgers is not None and K.EPSILON in parsed.metrics:  # before the sum
                metrics = dict(parsed.metrics.items())
                round_ = server_round_of(by_pid[pid])
                self.ledgers.check(name, round_, ledger_fields(metrics, name))
            elif self.ledgers is not None and name in self.ledgers.stopped:  # epsilon left out
                raise LedgerShrank(
                    f"{self.ledgers.stopped[name]}; no update of site {name} is taken"
                )
            return parsed

        site_replies = self._stage(K.STAGE_MASK, masks, keys, timeout, masked)
        for pid, parsed in site_replies.items():
            server.masked[pid] = parsed.vector.astype(np.uint32, copy=False)

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
        reveals = self._stage(K.STAGE_UNMASK, unmask, keys, timeout, parse_reveals)
        server_round = server_round_of(msgs[0])
        if self.last_round is not None and 0 < server_round < self.last_round:
            # the survivors (alive a moment ago) are idle until the next round
            self._key_ahead(tuple(sorted(keys.nodes[p - 1] for p in survivors)), timeout)
        template = by_pid[survivors[0]].content.array_records[K.ARRAYS]
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
            reply_to=by_pid[survivors[0]],
        )
        per_site = [
            Message(
                RecordDict(
                    {
                        K.METRICS: site_replies[n].metrics,
                        K.SITE: ConfigRecord({**site_replies[n].site, K.SECAGG_METRICS_ONLY: True}),
                    }
                ),
                reply_to=by_pid[n],
            )
            for n in survivors
        ]
        return [aggregate, *per_site]
