"""Build the configured Flower strategy (FedAvg, FedProx or FedAdam), guarded."""

from __future__ import annotations

from typing import Final, TypedDict

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedhealth.config import Config
from fedhealth.errors import ConfigError
from fedhealth.protocol.transport import round_deadline
from fedhealth.runs.rundir import RunDir
from fedhealth.serverapp.strategy import GuardedStrategy

__all__ = ["BASES", "build_strategy"]

BASES: Final[dict[str, type[FedAvg]]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}
"""``strategy.name`` -> the Flower strategy it runs."""


class _Sampling(TypedDict):
    """Flower's node sampling settings, common to FedAvg, FedProx and FedAdam."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


def build_strategy(cfg: Config, run_dir: RunDir, deadline: float | None = None) -> GuardedStrategy:
    """Build the configured Flower strategy, wrapped in :class:`GuardedStrategy`.

    Parameters
    ----------
    cfg : Config
        The run's config: ``strategy`` (algorithm and its settings), ``federation`` (deadlines,
        secure aggregation, folded evaluation), ``sites`` and ``rounds``.
    run_dir : RunDir
        The run directory the strategy records rounds in.
    deadline : float or None, default None
        Seconds to wait for the sites before a round; None:
        :func:`fedhealth.protocol.transport.round_deadline` of ``cfg``.

    Returns
    -------
    GuardedStrategy
        Its ``round_offset`` is 0; a resumed run sets it.

    Raises
    ------
    ConfigError
        ``strategy.name`` is not one of :data:`BASES`, or a setting is out of range.
    """
    s = cfg.strategy
    if s.name not in BASES:
        raise ConfigError(f"strategy.name={s.name!r}: choose one of {sorted(BASES)}")
    need = max(1, min(s.min_sites, cfg.sites))
    sampling = _Sampling(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=need,
        min_evaluate_nodes=need,
        min_available_nodes=need,
    )
    inner: FedAvg
    if s.name == "fedprox":
        inner = FedProx(**sampling, proximal_mu=s.proximal_mu)
    elif s.name == "fedadam":
        inner = FedAdam(
            **sampling, eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau
        )
    else:
        inner = FedAvg(**sampling)
    return GuardedStrategy(
        inner,
        run_dir=run_dir,
        max_examples=s.max_examples_per_site,
        min_sites=need,
        wait_timeout=round_deadline(cfg) if deadline is None else deadline,
        transport=cfg.federation.transport_dtype,
        secure=cfg.federation.secure_aggregation,
        fold_evaluate=cfg.federation.fold_evaluate and s.fraction_evaluate > 0,
        last_round=cfg.rounds,
        rejoin_wait=cfg.federation.rejoin_wait,
    )
