"""Build the coordinator's strategy from config: Flower's FedAvg, FedProx or FedAdam, guarded.

The strategies themselves are Flower's (``flwr.serverapp.strategy``). :class:`GuardedRounds` is
mixed in front of them and adds what a consortium needs around the algorithm:

* every wait for sites has a deadline (Flower's node sampling would wait forever);
* every reply is validated (:func:`fedhealth.security.validation.validate_update`) and a bad
  or failed reply is dropped and recorded instead of ending the run;
* replies are aggregated in site-name order, so the result does not depend on arrival order;
* per-site metrics go to the run directory.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedhealth.config import Config
from fedhealth.errors import BUDGET_REFUSAL, ConfigError, FederationError, RunStopped, UpdateRejected
from fedhealth.federation.rundir import RunDir
from fedhealth.security.validation import WEIGHT_KEY, validate_update

log = logging.getLogger("fedhealth.coordinator")

BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}
_SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ERROR_SITE = re.compile(r"^site ([A-Za-z0-9_.-]{1,64}): ")


PRIVACY_KEYS = ("epsilon", "epsilon-cap", "delta", "noise-multiplier", "sample-rate", "dp-steps",
                "max-grad-norm")


def _about(msg: Message) -> dict[str, Any]:
    record = msg.content.config_records.get("site") if msg.has_content() else None
    return dict(record.items()) if record is not None else {}


def site_name(msg: Message) -> str:
    """The site's self-declared name from the reply's ``site`` ConfigRecord, or its node id."""
    name = _about(msg).get("name")
    if isinstance(name, str) and _SITE_NAME.match(name):
        return name
    return f"node-{msg.metadata.src_node_id}"


class GuardedRounds:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    run_dir: RunDir
    max_examples: int
    min_sites: int
    wait_timeout: float
    _reference: ArrayRecord | None = None

    def guard(self, run_dir: RunDir, max_examples: int, min_sites: int, wait_timeout: float,
              secure: bool = False) -> None:
        self.run_dir, self.max_examples = run_dir, max_examples
        self.min_sites, self.wait_timeout = min_sites, wait_timeout
        # Only with secure aggregation do replies come from SecureGrid (built on the
        # coordinator); otherwise a site could forge the secagg markers, so they are ignored.
        self.secure = secure
        self.node_names: dict[int, str] = {}

    def wait_for_sites(self, grid: Grid, server_round: int) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < self.min_sites:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"round {server_round}: only {connected} of the {self.min_sites} required "
                    f"sites connected within {self.wait_timeout:.0f}s"
                )
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.wait_for_sites(grid, server_round)
        self._reference = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.wait_for_sites(grid, server_round)
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.run_dir.log(server_round)
        accepted, contributors = [], 0
        for msg in self._without_errors(server_round, replies, "train"):
            name = site_name(msg)
            about = _about(msg)
            if not self.secure:
                about = {k: v for k, v in about.items() if not k.startswith("secagg")}
            if about.get("secagg-metrics-only"):  # a site's metrics; its update is in the sum
                self._record_site(entry, name, _metrics(msg), about)
                contributors += 1
                continue
            bound = self.max_examples * int(about.get("secagg-sites", 1))
            try:
                if self._reference is None:
                    raise UpdateRejected("no reference model for this round")
                validate_update(self._reference, msg.content, bound, site=name)
            except UpdateRejected as exc:
                log.warning("round %d: rejected update: %s", server_round, exc)
                entry.rejected[name] = str(exc)
                continue
            metrics = _metrics(msg)
            if accepted and set(metrics) != set(_metrics(accepted[0])):
                entry.rejected[name] = f"site {name}: metric keys {sorted(metrics)} differ"
                continue
            if not about.get("secagg-sum"):
                self._record_site(entry, name, metrics, about)
                contributors += 1
            accepted.append(msg)
        if contributors < self.min_sites or not accepted:
            reason = (f"round {server_round}: {contributors} valid update(s), fewer than the "
                      f"{self.min_sites} required (refused: {sorted(entry.refused) or 'none'}, "
                      f"failed: {entry.failed['train']}, rejected: {sorted(entry.rejected) or 'none'})")
            log.warning("%s; stopping the run, global model unchanged", reason)
            raise RunStopped(reason)
        accepted.sort(key=site_name)
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        entry = self.run_dir.log(server_round)
        accepted = []
        for msg in self._without_errors(server_round, replies, "evaluate"):
            metrics = _metrics(msg)
            count = metrics.get(WEIGHT_KEY)
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
            if not finite or not isinstance(count, int) or not 1 <= count <= self.max_examples:
                log.warning("round %d: malformed evaluation from %s", server_round, site_name(msg))
                continue
            entry.evaluate[site_name(msg)] = metrics
            accepted.append(msg)
        if not accepted:
            return None
        accepted.sort(key=site_name)
        return super().aggregate_evaluate(server_round, accepted)  # type: ignore[misc]

    @staticmethod
    def _record_site(entry: Any, name: str, metrics: dict[str, Any], about: dict[str, Any]) -> None:
        entry.train[name] = metrics
        if "epsilon" in metrics:
            entry.privacy[name] = {
                **{k.replace("-", "_"): metrics[k] for k in PRIVACY_KEYS if k in metrics},
                "accountant": str(about.get("accountant", "")),
                "history": [list(h) for h in zip(about.get("history-noise", []),
                                                 about.get("history-rate", []),
                                                 about.get("history-steps", []))],
            }

    def _without_errors(
        self, server_round: int, replies: Iterable[Message], phase: str
    ) -> list[Message]:
        kept = []
        entry = self.run_dir.log(server_round)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                named = _ERROR_SITE.match(msg.error.reason or "")
                if named:
                    self.node_names.setdefault(node, named.group(1))
                if msg.error.code == BUDGET_REFUSAL and phase == "train":
                    entry.refused.append(self.node_names.get(node, f"node-{node}"))
                else:
                    entry.failed[phase] += 1
                log.warning(
                    "round %d %s: node %d replied with error %d: %s", server_round, phase,
                    msg.metadata.src_node_id, msg.error.code, msg.error.reason,
                )
            elif len(msg.content.metric_records) == 1:
                self.node_names[node] = site_name(msg)
                kept.append(msg)
            else:
                log.warning("round %d %s: reply from %s has no single MetricRecord",
                            server_round, phase, site_name(msg))
        return kept


def _metrics(msg: Message) -> dict[str, Any]:
    record = next(iter(msg.content.metric_records.values()))
    return dict(record.items())


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
    strategy.guard(run_dir, s.max_examples_per_site, need, cfg.federation.round_timeout,
                   secure=cfg.federation.secure_aggregation)
    return strategy
