"""The coordinator's strategy: Flower's FedAvg, FedProx or FedAdam, guarded.

The algorithms are Flower's (``flwr.serverapp.strategy``). :class:`GuardedStrategy` wraps one,
as Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy, and adds what a
consortium needs around the algorithm:

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
import time
from collections.abc import Iterable
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedhealth.errors import CheckpointError, ConfigError, RunStopped
from fedhealth.protocol import keys as K
from fedhealth.protocol.npy import array_view, viewed
from fedhealth.protocol.packing import repack
from fedhealth.runs.rundir import RunDir
from fedhealth.serverapp.checks import TRAIN_METRICS, check_evaluation, check_train_replies
from fedhealth.serverapp.replies import Phase, as_dtype, plain, site_name, sort_replies
from fedhealth.serverapp.waiting import wait_for_sites

__all__ = ["TRAIN_METRICS", "GuardedStrategy", "site_name"]

log = logging.getLogger("fedhealth.coordinator")

MOMENTS: Final = ("m_t", "v_t")
"""FedOpt's state across rounds (FedAdam's first and second moments), by attribute name."""


class GuardedStrategy(Strategy):
    """Run a Flower strategy with deadlines, reply validation and a run directory.

    Wraps FedAvg (implementation based on https://arxiv.org/abs/1602.05629), FedProx
    (https://arxiv.org/abs/1812.06127) or FedAdam (https://arxiv.org/abs/2003.00295) as
    Flower implements them, in the shape of Flower's
    ``DifferentialPrivacyServerSideFixedClipping``: the algorithm stays in ``strategy``, this
    wrapper guards what goes in and out of it (see the module docstring).

    Parameters
    ----------
    strategy : FedAvg
        The Flower strategy that samples sites and aggregates: ``FedAvg``, ``FedProx`` or
        ``FedAdam`` (any ``FedAvg`` subclass).
    run_dir : RunDir
        Where per-site metrics, rejections and failures of every round are recorded.
    max_examples : int
        Upper bound on the example count a site may report (FedAvg weighs by it); >= 1.
    min_sites : int
        Valid updates a round needs, and sites that must be connected before a round starts;
        >= 1. Fewer stop the run cleanly (:class:`~fedhealth.errors.RunStopped`).
    wait_timeout : float
        Seconds to wait for ``min_sites`` sites before a round; > 0.
    secure : bool, default False
        Replies come from :class:`~fedhealth.serverapp.secure_grid.SecureGrid`, so its
        ``secagg-*`` markers are trusted; without it a site's markers are dropped.
    fold_evaluate : bool, default False
        Evaluate round r's model with round r+1's train message (needs a strategy with
        ``fraction_evaluate > 0``); the last round keeps its own evaluate phase.
    last_round : int, default 0
        The run's last round (run-wide numbering), where folding ends; >= 0.
    rejoin_wait : float, default 0.0
        Seconds to wait for sites of the previous round that are gone before a round goes on
        without them; >= 0.
    transport : str, default "float32"
        Wire dtype of a packed global model (:data:`~fedhealth.protocol.packing.TRANSPORT_DTYPES`):
        the strategy keeps, aggregates and checkpoints float32; each message carries the model
        rounded to ``transport``, and 16-bit replies are widened before aggregation.

    Attributes
    ----------
    round_offset : int
        Rounds completed before a resumed run's Flower loop started (0 for a fresh run);
        Flower's round numbers are shifted by it, so resumed rounds keep their numbers.

    Raises
    ------
    ConfigError
        A parameter is out of its range.

    Examples
    --------
    Wrap a Flower strategy::

        strategy = GuardedStrategy(
            FedAvg(fraction_train=1.0), run_dir=run_dir, max_examples=1000, min_sites=2,
            wait_timeout=600.0,
        )
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        run_dir: RunDir,
        max_examples: int,
        min_sites: int,
        wait_timeout: float,
        secure: bool = False,
        fold_evaluate: bool = False,
        last_round: int = 0,
        rejoin_wait: float = 0.0,
        transport: str = "float32",
    ) -> None:
        super().__init__()
        checks = {
            "max_examples": max_examples >= 1,
            "min_sites": min_sites >= 1,
            "wait_timeout": wait_timeout > 0,
            "last_round": last_round >= 0,
            "rejoin_wait": rejoin_wait >= 0,
            "fold_evaluate": not fold_evaluate or strategy.fraction_evaluate > 0,
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ConfigError(f"GuardedStrategy: {', '.join(bad)} out of range")
        self.strategy = strategy
        self.run_dir, self.max_examples = run_dir, max_examples
        self.min_sites, self.wait_timeout = min_sites, wait_timeout
        self.secure = secure
        self.fold_evaluate, self.last_round = fold_evaluate, last_round
        self.rejoin_wait = rejoin_wait
        self.round_offset = 0
        self.transport = transport
        self.node_names: dict[int, str] = {}
        self._reference: ArrayRecord | None = None  # the model as sent (wire dtype)
        self._global: ArrayRecord | None = None  # the model as kept (float32)
        self._sent = 0  # sites the last train round was sent to

    def __repr__(self) -> str:
        return f"GuardedStrategy({self.strategy.__class__.__name__})"

    def summary(self) -> None:
        """Log the guards, then the wrapped strategy's summary."""
        log.info(
            "guarded %s: min sites %d, max examples %d, wait %.0fs, rejoin %.0fs, secure %s, "
            "folded evaluation %s",
            self.strategy.__class__.__name__,
            self.min_sites,
            self.max_examples,
            self.wait_timeout,
            self.rejoin_wait,
            self.secure,
            self.fold_evaluate,
        )
        self.strategy.summary()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return the wrapped strategy's state across rounds, as a checkpoint stores it.

        Shaped after Opacus's ``IAccountant.state_dict``: what a resumed run needs to continue
        exactly where the saved one stopped.

        Returns
        -------
        dict[str, np.ndarray]
            FedOpt strategies (FedAdam): the moments as ``"m_t/<param>"`` and ``"v_t/<param>"``
            (each of the parameter's shape), once a first aggregation has set them. FedAvg and
            FedProx keep no state: empty.
        """
        out: dict[str, np.ndarray] = {}
        if isinstance(self.strategy, FedOpt):
            for name, moment in (("m_t", self.strategy.m_t), ("v_t", self.strategy.v_t)):
                for key, value in (moment or {}).items():
                    out[f"{name}/{key}"] = np.asarray(value)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the wrapped strategy's state from :meth:`state_dict`'s output.

        Parameters
        ----------
        state : dict[str, np.ndarray]
            ``"m_t/<param>"`` and ``"v_t/<param>"`` arrays for a FedOpt strategy; a moment
            absent from it stays as it is. Empty for FedAvg and FedProx.

        Raises
        ------
        CheckpointError
            A key is not a moment of the wrapped strategy (a checkpoint of another strategy).
        """
        fedopt = self.strategy if isinstance(self.strategy, FedOpt) else None
        allowed = MOMENTS if fedopt is not None else ()
        if unknown := sorted(k for k in state if "/" not in k or k.split("/")[0] not in allowed):
            raise CheckpointError(
                f"strategy state for {self.strategy.__class__.__name__}: unexpected keys "
                f"{unknown[:5]}"
            )
        if fedopt is not None:
            m_t, v_t = _moment(state, "m_t"), _moment(state, "v_t")
            if m_t:
                fedopt.m_t = m_t
            if v_t:
                fedopt.v_t = v_t

    def _wait(self, grid: Grid, server_round: int) -> None:
        wait_for_sites(
            grid,
            server_round,
            min_sites=self.min_sites,
            timeout=self.wait_timeout,
            previous=self._sent,
            rejoin_wait=self.rejoin_wait,
        )

    def folds(self, server_round: int) -> bool:
        """Return whether round ``server_round``'s model is evaluated with the next train message.

        Parameters
        ----------
        server_round : int
            Run-wide round number.

        Returns
        -------
        bool
            True with ``fold_evaluate`` for rounds 1 to ``last_round - 1``.
        """
        return self.fold_evaluate and 0 < server_round < self.last_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait for the sites, then let the wrapped strategy sample them for training."""
        server_round += self.round_offset
        self._wait(grid, server_round)
        self._global, self._reference = arrays, repack(arrays, self.transport)
        if self.folds(server_round - 1):
            config = ConfigRecord({**config, K.EVALUATE_ROUND: server_round - 1})
        # the wrapped strategy keeps the float32 model (FedAdam steps from it); the wire gets
        # the transport dtype, one record shared by every message (pushed once)
        messages = self._on_wire(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = len(messages)
        return messages

    def _on_wire(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        wire = self._reference
        if wire is not None and wire is not self._global:
            for msg in messages:
                msg.content[self.strategy.arrayrecord_key] = wire
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing for a folded round; otherwise wait for the sites and delegate."""
        server_round += self.round_offset
        if self.folds(server_round):
            return []  # evaluated with the next round's train message
        self._wait(grid, server_round)
        self._global, self._reference = arrays, repack(arrays, self.transport)
        return self._on_wire(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and record every reply; aggregate the valid ones in site-name order.

        Raises
        ------
        RunStopped
            Fewer than ``min_sites`` valid updates: the global model stays as it was.
        """
        server_round += self.round_offset
        started = time.perf_counter()
        entry = self.run_dir.log(server_round)
        folded = self.folds(server_round - 1)
        replies = list(replies)
        if folded:  # a site that failed or refused this round's task evaluated nothing either
            self.run_dir.log(server_round - 1).failed["evaluate"] += sum(
                msg.has_error() for msg in replies
            )
        accepted, contributors = check_train_replies(
            self._sorted(server_round, replies, "train"),
            entry=entry,
            evaluated=self.run_dir.log(server_round - 1) if folded else None,
            # a secure sum's mean comes back in float32 whatever the wire dtype
            reference=self._global if self.secure else self._reference,
            max_examples=self.max_examples,
            server_round=server_round,
            secure=self.secure,
        )
        if contributors < self.min_sites or not accepted:
            reason = (
                f"round {server_round}: {contributors} valid update(s), fewer than the "
                f"{self.min_sites} required (refused: {sorted(entry.refused) or 'none'}, "
                f"failed: {entry.failed['train']}, rejected: {sorted(entry.rejected) or 'none'})"
            )
            log.warning("%s; stopping the run, global model unchanged", reason)
            raise RunStopped(reason)
        inputs = plain(accepted, arrays=True)
        key = self.strategy.arrayrecord_key
        for msg in inputs:  # 16-bit updates are averaged in float32, read in place
            msg.content[key] = viewed(repack(msg.content.array_records[key], "float32"))
        arrays, aggregated = self.strategy.aggregate_train(server_round, inputs)
        if arrays is not None and self._global is not None:
            # FedAdam's step (and any mean of integer buffers) comes back as float64: sites train
            # and reply in the global model's dtypes, which validation then requires exactly.
            arrays = ArrayRecord(
                {
                    k: arrays[k]
                    if arrays[k].dtype == ref.dtype
                    else Array(as_dtype(array_view(arrays[k]), ref.dtype))
                    for k, ref in self._global.items()
                }
            )
        entry.seconds["aggregate"] = round(time.perf_counter() - started, 3)
        return arrays, aggregated

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate and record every evaluation; aggregate the valid ones in site-name order."""
        server_round += self.round_offset
        entry = self.run_dir.log(server_round)
        accepted = [
            msg
            for name, msg in self._sorted(server_round, replies, "evaluate")
            if check_evaluation(
                entry, name, msg, max_examples=self.max_examples, server_round=server_round
            )
        ]
        if not accepted:
            return None
        return self.strategy.aggregate_evaluate(server_round, plain(accepted, arrays=False))

    def _sorted(
        self, server_round: int, replies: Iterable[Message], phase: Phase
    ) -> list[tuple[str, Message]]:
        entry = self.run_dir.log(server_round)
        return sort_replies(
            replies, server_round=server_round, phase=phase, entry=entry, node_names=self.node_names
        )


def _moment(state: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
