"""Typed configuration: Hydra composes the YAML in ``configs/``, these dataclasses validate it.

What crosses the network is never this object: :func:`flatten` turns it into plain scalars
(``{"model.name": "unet", ...}``), the only form a Flower run config or ConfigRecord carries.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhealth.errors import ConfigError


@dataclass
class ModelConfig:
    """A MONAI segmentation network; see :mod:`fedhealth.models`."""

    name: str = "unet"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    num_res_units: int = 1
    norm: str = "instance"
    num_groups: int = 4
    in_channels: int = 1
    out_channels: int = 2


@dataclass
class DataConfig:
    """Synthetic multi-site MRI cohort; see :mod:`fedhealth.data.synth`."""

    root: str = "data/synthetic"
    train_per_site: int = 64
    test_per_site: int = 8
    roi: int = 32
    target_spacing: float = 1.0
    heterogeneity: float = 1.0
    cache: bool = True


@dataclass
class TrainConfig:
    """Local training at a site; round ``r`` trains with ``lr * lr_decay ** (r - 1)``."""

    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-2
    lr_decay: float = 0.9
    weight_decay: float = 0.0
    num_threads: int = 1


@dataclass
class StrategyConfig:
    """Server strategy from ``flwr.serverapp.strategy``."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    proximal_mu: float = 0.0
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    max_examples_per_site: int = 100000


@dataclass
class FederationConfig:
    """How rounds are run: deadlines, the simulation backend, secure aggregation (SecAgg+:
    Shamir threshold as a fraction of the round's sites, neighbours per site with 0 = all,
    update clipping range and the public bound on a site's example count).
    """

    round_timeout: float = 600.0
    reply_poll_interval: float = 0.1  # seconds between reply pulls (Flower's own: 3 s)
    fold_evaluate: bool = True  # evaluate round r's model with round r+1's train message
    pack_arrays: bool = True  # the model travels as one float32 vector, not one array per tensor
    rejoin_wait: float = 30.0  # fewer sites than the last round sent to: wait this for them
    cpus_per_site: float = 1.0
    ray_num_cpus: int = 0
    secure_aggregation: bool = True
    secagg_threshold: float = 0.51
    secagg_degree: int = 0
    secagg_clipping_range: float = 8.0
    secagg_max_examples: int = 1024


@dataclass
class PrivacyConfig:
    """DP-SGD at every site (Opacus) and the site's budget.

    ``enabled``, ``max_grad_norm``, ``accountant``, ``secure_rng`` and ``noise_multiplier`` are
    the consortium's training settings, sent to sites each round. ``epsilon``, ``delta`` and
    ``ledger_root`` are the site's own: in deployment each site sets them in its node config
    (``epsilon-cap``, ``delta``, ``ledger-dir``) and the coordinator never sees them as inputs.
    """

    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 0.5
    accountant: str = "rdp"
    secure_rng: bool = False
    noise_multiplier: float = 0.0
    ledger_root: str = "ledgers"


@dataclass
class Config:
    """The whole run configuration (``configs/config.yaml``)."""

    seed: int = 0
    sites: int = 3
    rounds: int = 10
    run_root: str = "runs"
    run_name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def config_dir() -> Path:
    """The Hydra config directory: ``$FEDHEALTH_CONFIG_DIR``, else the installed ``fedhealth.configs``.

    Returns
    -------
    Path
        A directory holding ``config.yaml`` and its groups.

    Raises
    ------
    ConfigError
        If that directory has no ``config.yaml``.
    """
    env = os.environ.get("FEDHEALTH_CONFIG_DIR")
    if env:
        path = Path(env)
    else:
        import fedhealth.configs

        path = Path(fedhealth.configs.__file__).resolve().parent
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in config directory {path} (set FEDHEALTH_CONFIG_DIR)")
    return path


def compose(overrides: list[str] | None = None) -> Config:
    """Compose ``configs/config.yaml`` with Hydra-style overrides and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as exc:
        raise ConfigError(f"bad override in {overrides}: {exc}") from exc
    return validate(OmegaConf.to_container(raw, resolve=True))


def validate(raw: dict[str, Any]) -> Config:
    """Merge ``raw`` onto the schema; unknown keys and wrong types are errors naming the field."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"invalid config field {getattr(exc, 'full_key', '?')}: {exc.msg}"
        ) from exc
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg: Config) -> None:
    checks = {
        "sites": cfg.sites >= 1,
        "rounds": cfg.rounds >= 1,
        "data.train_per_site": cfg.data.train_per_site >= 1,
        "data.test_per_site": cfg.data.test_per_site >= 1,
        "data.roi": cfg.data.roi >= 16 and cfg.data.roi % 4 == 0,
        "train.local_epochs": cfg.train.local_epochs >= 1,
        "train.batch_size": cfg.train.batch_size >= 1,
        "train.lr": cfg.train.lr > 0,
        "train.lr_decay": 0 < cfg.train.lr_decay <= 1,
        "strategy.min_sites": 1 <= cfg.strategy.min_sites,
        "strategy.fraction_train": 0 < cfg.strategy.fraction_train <= 1,
        "federation.round_timeout": cfg.federation.round_timeout > 0,
        "federation.reply_poll_interval": 0.01 <= cfg.federation.reply_poll_interval <= 10,
        "federation.rejoin_wait": cfg.federation.rejoin_wait >= 0,
        "federation.secagg_threshold": 0 < cfg.federation.secagg_threshold <= 1,
        "federation.secagg_max_examples": cfg.federation.secagg_max_examples >= 1,
        "privacy.epsilon": cfg.privacy.epsilon > 0,
        "privacy.delta": 0 < cfg.privacy.delta < 1,
        "privacy.max_grad_norm": cfg.privacy.max_grad_norm > 0,
        "privacy.accountant": cfg.privacy.accountant in ("rdp", "prv"),
        "privacy.noise_multiplier": cfg.privacy.noise_multiplier >= 0,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"config field(s) out of range: {', '.join(bad)}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config | dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Plain scalars only, dotted keys; lists become comma-separated strings."""
    tree = asdict(cfg) if not isinstance(cfg, dict) else cfg
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
}


def unflatten(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`flatten`, validated against the schema (unknown keys are errors)."""
    list_fields = {
        f"{section}.{f.name}"
        for section, schema in SECTIONS.items()
        for f in fields(schema)
        if str(f.type).startswith("list")
    }
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if key in list_fields and isinstance(value, str):
            value = [int(v) for v in value.split(",") if v]
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(tree)


# What a site needs to train: sent by the coordinator as plain scalars in every instruction.
SITE_KEYS = (
    "seed",
    "rounds",
    "model.",
    "train.",
    "data.roi",
    "data.target_spacing",
    "data.cache",
    "privacy.enabled",
    "privacy.max_grad_norm",
    "privacy.accountant",
    "privacy.secure_rng",
    "privacy.noise_multiplier",
)


def site_settings(cfg: Config) -> dict[str, bool | int | float | str]:
    """The flattened subset of ``cfg`` a site needs (no paths, no class names)."""
    return {k: v for k, v in flatten(cfg).items() if k.startswith(SITE_KEYS) or k in SITE_KEYS}


def from_site_settings(flat: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`site_settings` keys; other keys are ignored."""
    return unflatten({k: v for k, v in flat.items() if k.startswith(SITE_KEYS) or k in SITE_KEYS})
