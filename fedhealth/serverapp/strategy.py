"""Build the coordinator's strategy from config: Flower's FedAvg, FedProx or FedAdam, guarded.

The strategies themselves are Flower's (``flwr.serverapp.strategy``). :class:`GuardedRounds` is
mixed in front of them and adds what a consortium needs around the algorithm:

* every wait for sites has a deadline (Flower's node sampling would wait forever);
* every reply is validated (:func:`fedhealth.security.validation.validate_update`) and a bad
  or failed reply is dropped and recorded instead of ending the run;
* replies are aggregated in site-name order, so the result does not depend on arrival order;
* per-site metrics go to the run directory;
* with ``fold_evaluate``, the sites evaluate the global model of round r-1 when they receive it
  with round r's train message (``evaluate-round`` in its config; the results come back in the
  train reply as ``eval-*`` metrics): one message phase per round instead of two. Only the last
  round has its own evaluate phase.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedhealth.config import Config
from fedhealth.errors import BUDGET_REFUSAL, ConfigError, RunStopped, UpdateRejected
from fedhealth.protocol import keys as K
from fedhealth.runs.rundir import RunDir
from fedhealth.security.validation import validate_accounting, validate_metrics, validate_update

log = logging.getLogger("fedhealth.coordinator")

BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}
_SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ERROR_SITE = re.compile(r"^site ([A-Za-z0-9_.-]{1,64}): ")


TRAIN_METRICS = (K.NUM_EXAMPLES, K.LOSS)  # what a reply must report (the round log, secure sum)
EVALUATE_METRICS = (K.NUM_EXAMPLES, K.DICE, K.LOSS)
EVALUATE_BOUNDS = {K.DICE: (0.0, 1.0)}


def _about(msg: Message) -> dict[str, Any]:
    record = msg.content.config_records.get(K.SITE) if msg.has_content() else None
    return dict(record.items()) if record is not None else {}


def site_name(msg: Message) -> str:
    """The site's self-declared name from the reply's ``site`` ConfigRecord, or its node id."""
    name = _about(msg).get(K.SITE_NAME)
    if isinstance(name, str) and _SITE_NAME.fullmatch(name):  # "$" would pass "name\n"
        return name
    return f"node-{msg.metadata.src_node_id}"


class GuardedRounds:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    run_dir: RunDir
    max_examples: int
    min_sites: int
    wait_timeout: float
    _reference: ArrayRecord | None = None
    round_offset: int = 0  # rounds completed before a resumed run's Flower loop started
    fold_evaluate: bool = False
    last_round: int = 0
    rejoin_wait: float = 0.0
    _sent: int = 0  # sites the last train round was sent to

    def guard(
        self,
        run_dir: RunDir,
        max_examples: int,
        min_sites: int,
        wait_timeout: float,
        secure: bool = False,
        fold_evaluate: bool = False,
        last_round: int = 0,
        rejoin_wait: float = 0.0,
    ) -> None:
        self.run_dir, self.max_examples = run_dir, max_examples
        self.fold_evaluate, self.last_round = fold_evaluate, last_round
        self.rejoin_wait = rejoin_wait
        self.min_sites, self.wait_timeout = min_sites, wait_timeout
        # Only with secure aggregation do replies come from SecureGrid (built on the
        # coordinator); otherwise a site could forge the secagg markers, so they are ignored.
        self.secure = secure
        self.node_names: dict[int, str] = {}

    def wait_for_sites(self, grid: Grid, server_round: int) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < self.min_sites:
            if time.monotonic() > deadline:
                raise RunStopped(
                    f"round {server_round}: only {connected} of the {self.min_sites} required "
                    f"sites connected within {self.wait_timeout:.0f}s"
                )
            time.sleep(1.0)
        if connected < self._sent:  # sites of the last round are gone: a moment to come back
            deadline = time.monotonic() + self.rejoin_wait
            while connected < self._sent and time.monotonic() < deadline:
                time.sleep(0.5)
                connected = len(list(grid.get_node_ids()))
            if connected < self._sent:
                log.info(
                    "round %d: %d of the previous round's %d sites connected after %.0fs; "
                    "going on without the others",
                    server_round,
                    connected,
                    self._sent,
                    self.rejoin_wait,
                )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self.wait_for_sites(grid, server_round)
        self._reference = arrays
        if self.folds(server_round - 1):
            config = ConfigRecord({**config, K.EVALUATE_ROUND: server_round - 1})
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sent = len(messages)
        return messages

    def folds(self, server_round: int) -> bool:
        """Is round ``server_round``'s model evaluated with the next round's train message?"""
        return self.fold_evaluate and 0 < server_round < self.last_round

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.folds(server_round):
            return []  # evaluated with the next round's train message
        self.wait_for_sites(grid, server_round)
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        entry = self.run_dir.log(server_round)
        accepted, contributors = [], 0
        folded = self.folds(server_round - 1)
        replies = list(replies)
        if folded:  # a site that failed or refused this round's task evaluated nothing either
            self.run_dir.log(server_round - 1).failed["evaluate"] += sum(
                msg.has_error() for msg in replies
            )
        for name, msg in self._without_errors(server_round, replies, "train"):
            about = _about(msg)
            if not self.secure:
                about = {k: v for k, v in about.items() if not k.startswith(K.SECAGG_MARKER_PREFIX)}
            metrics, evaluation = _split_folded(_metrics(msg))
            if folded and not about.get(K.SECAGG_SUM):
                self._record_evaluation(server_round - 1, name, evaluation)
            if about.get(K.SECAGG_METRICS_ONLY):  # a site's metrics; its update is in the sum
                contributors += 1
                try:
                    validate_metrics(metrics, self.max_examples, name, TRAIN_METRICS)
                    if K.EPSILON in metrics:
                        validate_accounting(about, name)
                except UpdateRejected as exc:
                    log.warning(
                        "round %d: metrics not recorded (the update is in the secure sum): %s",
                        server_round,
                        exc,
                    )
                    entry.rejected[name] = f"{exc} (metrics only: the update is in the sum)"
                    continue
                self._record_site(entry, name, metrics, about)
                continue
            bound = self.max_examples * int(about.get(K.SECAGG_SITES, 1))
            try:
                if self._reference is None:
                    raise UpdateRejected("no reference model for this round")
                validate_update(self._reference, msg.content, bound, name, TRAIN_METRICS)
                if K.EPSILON in metrics:
                    validate_accounting(about, name)
            except UpdateRejected as exc:
                log.warning("round %d: rejected update: %s", server_round, exc)
                entry.rejected[name] = str(exc)
                continue
            if not about.get(K.SECAGG_SUM):
                self._record_site(entry, name, metrics, about)
                contributors += 1
            accepted.append(msg)
        if contributors < self.min_sites or not accepted:
            reason = (
                f"round {server_round}: {contributors} valid update(s), fewer than the "
                f"{self.min_sites} required (refused: {sorted(entry.refused) or 'none'}, "
                f"failed: {entry.failed['train']}, rejected: {sorted(entry.rejected) or 'none'})"
            )
            log.warning("%s; stopping the run, global model unchanged", reason)
            raise RunStopped(reason)
        arrays, metrics = super().aggregate_train(  # type: ignore[misc]
            server_round, _plain(accepted, True)
        )
        if arrays is not None and self._reference is not None:
            # FedAdam's step (and any mean of integer buffers) comes back as float64: sites train
            # and reply in the global model's dtypes, which validation then requires exactly.
            arrays = ArrayRecord(
                {
                    k: Array(_as_dtype(arrays[k].numpy(), ref.dtype))
                    for k, ref in self._reference.items()
                }
            )
        return arrays, metrics

    def _record_evaluation(self, server_round: int, name: str, metrics: dict[str, Any]) -> None:
        """A folded evaluation of round ``server_round``'s model from a train reply."""
        entry = self.run_dir.log(server_round)
        if not metrics:
            entry.failed["evaluate"] += 1
            log.warning(
                "round %d evaluate: site %s trained but sent no evaluation", server_round, name
            )
            return
        try:
            validate_metrics(metrics, self.max_examples, name, EVALUATE_METRICS, EVALUATE_BOUNDS)
        except UpdateRejected as exc:
            log.warning("round %d: rejected evaluation: %s", server_round, exc)
            entry.rejected_evaluate[name] = str(exc)
            return
        entry.evaluate[name] = metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        entry = self.run_dir.log(server_round)
        accepted = []
        for name, msg in self._without_errors(server_round, replies, "evaluate"):
            metrics = _metrics(msg)
            try:
                if msg.content.array_records:
                    raise UpdateRejected(
                        f"site {name}: an evaluation reply carries no "
                        f"ArrayRecord, got {len(msg.content.array_records)}"
                    )
                validate_metrics(
                    metrics, self.max_examples, name, EVALUATE_METRICS, EVALUATE_BOUNDS
                )
            except UpdateRejected as exc:
                log.warning("round %d: rejected evaluation: %s", server_round, exc)
                entry.rejected_evaluate[name] = str(exc)
                continue
            entry.evaluate[name] = metrics
            accepted.append(msg)
        if not accepted:
            return None
        plain = _plain(accepted, False)
        return super().aggregate_evaluate(server_round, plain)  # type: ignore[misc]

    @staticmethod
    def _record_site(entry: Any, name: str, metrics: dict[str, Any], about: dict[str, Any]) -> None:
        entry.train[name] = metrics
        if K.EPSILON in metrics:
            entry.privacy[name] = {
                **{k.replace("-", "_"): metrics[k] for k in K.PRIVACY_METRICS if k in metrics},
                "accountant": str(about.get(K.ACCOUNTANT, "")),
                "history": [
                    list(h)
                    for h in zip(
                        about.get(K.HISTORY_NOISE, []),
                        about.get(K.HISTORY_RATE, []),
                        about.get(K.HISTORY_STEPS, []),
                    )
                ],
            }

    def _without_errors(
        self, server_round: int, replies: Iterable[Message], phase: str
    ) -> list[tuple[str, Message]]:
        """Error replies counted and logged; the others as (site name, reply) in name, then
        node order, those without exactly one MetricRecord rejected. A name that more than one
        node claims this round is ambiguous: each claimant gets its node id appended.
        """
        kept, answered, errors = [], [], []
        entry = self.run_dir.log(server_round)
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
                self.node_names[msg.metadata.src_node_id] = name
                kept.append((name, msg))
            else:
                rejected[name] = (
                    f"site {name}: expected exactly one MetricRecord, got {len(records)}"
                )
                log.warning("round %d %s: rejected reply: %s", server_round, phase, rejected[name])
        owner = {name: node for node, name in self.node_names.items()}
        for msg in errors:
            node = msg.metadata.src_node_id
            named_in = _ERROR_SITE.match(msg.error.reason or "")
            # an error's text names the site only if no other node is known by that name
            if named_in and owner.setdefault(named_in.group(1), node) == node:
                self.node_names.setdefault(node, named_in.group(1))
            if msg.error.code == BUDGET_REFUSAL and phase == "train":
                entry.refused.append(self.node_names.get(node, f"node-{node}"))
            else:
                entry.failed[phase] += 1
            log.warning(  # the reason is the site's text: shortened, quoted
                "round %d %s: node %d replied with error %d: %r",
                server_round,
                phase,
                node,
                msg.error.code,
                (msg.error.reason or "")[:200],
            )
        return kept


def _metrics(msg: Message) -> dict[str, Any]:
    record = next(iter(msg.content.metric_records.values()))
    return dict(record.items())


def _split_folded(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train metrics, folded evaluation metrics without their prefix)."""
    train = {k: v for k, v in metrics.items() if not k.startswith(K.FOLDED_PREFIX)}
    evaluation = {
        k[len(K.FOLDED_PREFIX) :]: v for k, v in metrics.items() if k.startswith(K.FOLDED_PREFIX)
    }
    return train, evaluation


def _as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind in "iu":
        values = np.rint(values)
    return np.asarray(values).astype(dtype, copy=False)


def _plain(replies: list[Message], arrays: bool) -> list[Message]:
    """The validated replies as Flower's aggregation gets them: the arrays, and the metrics that
    every reply has under one record name (Flower stops the round when record names or metric
    keys differ; a site with DP metrics among sites without is no reason to).
    """
    metrics = [_split_folded(_metrics(msg))[0] for msg in replies]
    common = set.intersection(*(set(m) for m in metrics)) if metrics else set()
    out = []
    for msg, values in zip(replies, metrics):
        content = RecordDict({K.METRICS: MetricRecord({k: values[k] for k in sorted(common)})})
        if arrays:
            content[K.ARRAYS] = msg.content[K.ARRAYS]
        out.append(Message(content=content, metadata=msg.metadata))
    return out


def build_strategy(cfg: Config, run_dir: RunDir) -> FedAvg:
    """The configured Flower strategy, wrapped in :class:`GuardedRounds`."""
    s = cfg.strategy
    if s.name not in BASES:
        raise ConfigError(f"strategy.name={s.name!r}: choose one of {sorted(BASES)}")
    base = BASES[s.name]
    need = max(1, min(s.min_sites, cfg.sites))
    kwargs: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": need,
        "min_evaluate_nodes": need,
        "min_available_nodes": need,
    }
    if s.name == "fedprox":
        kwargs["proximal_mu"] = s.proximal_mu
    if s.name == "fedadam":
        kwargs.update(eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    cls = type(f"Guarded{base.__name__}", (GuardedRounds, base), {})
    strategy = cls(**kwargs)
    strategy.guard(
        run_dir,
        s.max_examples_per_site,
        need,
        cfg.federation.round_timeout,
        secure=cfg.federation.secure_aggregation,
        fold_evaluate=cfg.federation.fold_evaluate and s.fraction_evaluate > 0,
        last_round=cfg.rounds,
        rejoin_wait=cfg.federation.rejoin_wait,
    )
    return strategy
