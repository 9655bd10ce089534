"""Typed configuration: Hydra composes the YAML in ``configs/``, dataclasses validate it.

The dataclasses live in :mod:`fedhealth.config_schema` and are importable from here.

What crosses the network is never this object: :func:`flatten` turns it into plain scalars
(``{"model.name": "unet", ...}``), the only form a Flower run config or ConfigRecord carries.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, cast, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhealth.config_schema import (
    Config,
    DataConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    StrategyConfig,
    TrackingConfig,
    TrainConfig,
)
from fedhealth.errors import ConfigError

__all__ = [
    "SECTIONS",
    "SITE_KEYS",
    "Config",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TrackingConfig",
    "TrainConfig",
    "compose",
    "config_dir",
    "config_groups",
    "flatten",
    "from_site_settings",
    "site_settings",
    "to_yaml",
    "unflatten",
    "validate",
]


def config_dir() -> Path:
    """Find the Hydra config directory: ``$FEDHEALTH_CONFIG_DIR``, else ``fedhealth.configs``.

    ``fedhealth.configs`` is the repository's ``configs/`` folder, installed inside the wheel.

    Returns
    -------
    Path
        A directory holding ``config.yaml`` and its groups.

    Raises
    ------
    ConfigError
        If that directory has no ``config.yaml``, or ``fedhealth.configs`` has no file
        location.
    """
    env = os.environ.get("FEDHEALTH_CONFIG_DIR")
    if env:
        path = Path(env)
    else:
        # imported by name: the package is mapped from configs/, which mypy cannot see
        configs = importlib.import_module("fedhealth.configs")
        if configs.__file__ is None:
            raise ConfigError("fedhealth.configs has no file location (set FEDHEALTH_CONFIG_DIR)")
        path = Path(configs.__file__).resolve().parent
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in config directory {path} (set FEDHEALTH_CONFIG_DIR)")
    return path


def config_groups() -> dict[str, list[str]]:
    """List the config groups and their options, as Hydra's config loader sees them.

    Returns
    -------
    dict of str to list of str
        Group path (e.g. ``"model"``, ``"privacy/site_policy"``) -> option names, sorted; the
        composed defaults are those of ``config.yaml``'s ``defaults`` list.

    Raises
    ------
    ConfigError
        The config directory is missing (as :func:`config_dir`).
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        pending = [g for g in loader.list_groups("") if g != "hydra"]
        while pending:
            group = pending.pop(0)
            groups[group] = sorted(loader.get_group_options(group))
            pending += [f"{group}/{sub}" for sub in loader.list_groups(group)]
    return dict(sorted(groups.items()))


def compose(overrides: list[str] | None = None) -> Config:
    """Compose ``configs/config.yaml`` with Hydra overrides and validate it.

    Parameters
    ----------
    overrides : list of str or None, default None
        Hydra overrides such as ``"rounds=5"`` or ``"strategy=fedprox"``.

    Returns
    -------
    Config
        The validated configuration, interpolations resolved.

    Raises
    ------
    ConfigError
        If the config directory is missing, an override is malformed, or :func:`validate`
        refuses the result.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as exc:
        raise ConfigError(f"bad override in {overrides}: {exc}") from exc
    # a composed DictConfig converts to a dict; OmegaConf's return type covers lists too
    return validate(cast(dict[str, Any], OmegaConf.to_container(raw, resolve=True)))


def validate(raw: dict[str, Any]) -> Config:
    """Merge ``raw`` onto the schema; unknown keys and wrong types are errors naming the field.

    Parameters
    ----------
    raw : dict of str to Any
        A (partial, nested) configuration; missing fields take their defaults.

    Returns
    -------
    Config
        The validated configuration.

    Raises
    ------
    ConfigError
        Naming the unknown or ill-typed field, or every field out of range.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"invalid config field {getattr(exc, 'full_key', '?')}: "
            f"{str(exc.msg).splitlines()[0] if exc.msg else type(exc).__name__}"
        ) from exc
    if cfg.data.site_dirs:  # a hospital's own sites: as many as it names
        cfg.sites = len(cfg.data.site_dirs)
    _check_ranges(cfg)
    return cfg


MAX_SW_OVERLAP, MAX_RES_UNITS = 0.9, 8  # 0.999 overlap: windows one voxel apart; units/level


def _check_ranges(cfg: Config) -> None:
    d, t, f, p = cfg.data, cfg.train, cfg.federation, cfg.privacy
    checks = [  # (field, holds, the rule in words)
        ("sites", cfg.sites >= 1, ">= 1"),
        ("rounds", cfg.rounds >= 1, ">= 1"),
        ("data.train_per_site", d.train_per_site >= 1, ">= 1"),
        ("data.test_per_site", d.test_per_site >= 1, ">= 1"),
        ("data.patch_size", d.patch_size >= 16 and d.patch_size % 4 == 0, ">= 16, a multiple of 4"),
        ("data.fov", d.fov >= 16, ">= 16"),
        ("data.target_spacing", d.target_spacing > 0, "> 0"),
        ("data.sw_overlap", 0 <= d.sw_overlap <= MAX_SW_OVERLAP, f"in [0, {MAX_SW_OVERLAP}]"),
        ("model.num_res_units", 0 <= cfg.model.num_res_units <= MAX_RES_UNITS,
         f"in [0, {MAX_RES_UNITS}]"),
        ("train.weight_decay", t.weight_decay >= 0, ">= 0"),
        ("data.sw_batch_size", d.sw_batch_size >= 1, ">= 1"),
        ("train.local_epochs", t.local_epochs >= 1, ">= 1"),
        ("train.batch_size", t.batch_size >= 1, ">= 1"),
        ("train.device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
         "auto, cpu, cuda or cuda:N"),
        ("federation.gpus_per_site", f.gpus_per_site >= 0, ">= 0"),
        ("train.lr", t.lr > 0, "> 0"),
        ("train.lr_decay", 0 < t.lr_decay <= 1, "in (0, 1]"),
        ("strategy.min_sites", 1 <= cfg.strategy.min_sites, ">= 1"),
        ("strategy.fraction_train", 0 < cfg.strategy.fraction_train <= 1, "in (0, 1]"),
        ("federation.round_timeout", f.round_timeout >= 0, ">= 0"),
        ("federation.site_link_mbps", f.site_link_mbps > 0, "> 0"),
        ("federation.transport_dtype", f.transport_dtype in ("float32", "float16", "bfloat16")
         and (f.pack_arrays or f.transport_dtype == "float32"),
         "float32, float16 or bfloat16; 16 bits need federation.pack_arrays"),
        ("federation.reply_poll_interval", 0.01 <= f.reply_poll_interval <= 10, "in [0.01, 10]"),
        ("federation.rejoin_wait", f.rejoin_wait >= 0, ">= 0"),
        ("federation.secagg_threshold", 0.5 < f.secagg_threshold <= 1, "in (0.5, 1]"),
        ("federation.secagg_max_examples", f.secagg_max_examples >= 1, ">= 1"),
        ("privacy.epsilon", p.epsilon > 0, "> 0"),
        ("privacy.delta", 0 < p.delta < 1, "in (0, 1)"),
        ("privacy.max_grad_norm", p.max_grad_norm > 0, "> 0"),
        ("privacy.accountant", p.accountant in ("rdp", "prv"), "rdp or prv"),
        ("privacy.noise_multiplier", p.noise_multiplier >= 0, ">= 0"),
    ]  # fmt: skip
    if bad := [
        f"{name}={functools.reduce(getattr, name.split('.'), cast(Any, cfg))!r} ({rule})"
        for name, ok, rule in checks
        if not ok
    ]:
        raise ConfigError(f"config field(s) out of range: {'; '.join(bad)}")


def to_yaml(cfg: Config) -> str:
    """Render a configuration as YAML.

    Parameters
    ----------
    cfg : Config
        The configuration.

    Returns
    -------
    str
        OmegaConf's YAML of every field.
    """
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config | dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten a configuration to plain scalars with dotted keys.

    Parameters
    ----------
    cfg : Config or dict of str to Any
        The configuration, or one of its (nested) sections as a dict.
    prefix : str, default ""
        Prepended to every key.

    Returns
    -------
    dict of str to bool, int, float or str
        ``{"model.name": "unet", ...}``; lists and tuples become comma-separated strings.
    """
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


SECTIONS: dict[str, type] = {  # the top-level sections and their schemas
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "tracking": TrackingConfig,
}


def unflatten(flat: dict[str, Any]) -> Config:
    """Rebuild a configuration from :func:`flatten`'s form, validated against the schema.

    Parameters
    ----------
    flat : dict of str to Any
        Dotted keys; a comma-separated string for a list field (of a section or a nested
        section) becomes a list of its item type.

    Returns
    -------
    Config
        The validated configuration; missing fields take their defaults.

    Raises
    ------
    ConfigError
        As :func:`validate` (unknown keys, wrong types, values out of range).
    ValueError
        If a list field's string holds a non-integer item.
    """
    list_fields = dict(
        item for section, schema in SECTIONS.items() for item in _list_fields(schema, section)
    )
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if key in list_fields and isinstance(value, str):
            value = [list_fields[key](v) for v in value.split(",") if v]
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(tree)


def _list_fields(schema: type, prefix: str) -> list[tuple[str, type]]:
    """Dotted names of ``schema``'s list fields (nested sections too) and their item types."""
    hints = get_type_hints(schema)
    out: list[tuple[str, type]] = []
    for f in fields(schema):
        hint = hints[f.name]
        if get_origin(hint) is list:
            out.append((f"{prefix}.{f.name}", get_args(hint)[0]))
        elif is_dataclass(hint):
            out.extend(_list_fields(cast(type, hint), f"{prefix}.{f.name}"))
    return out


# What a site needs to train: sent by the coordinator as plain scalars in every instruction.
SITE_KEYS = (
    "seed",
    "rounds",
    "model.",
    "train.",
    "data.patch_size",
    "data.target_spacing",
    "data.sw_overlap",
    "data.sw_batch_size",
    "data.cache",
    "privacy.enabled",
    "privacy.max_grad_norm",
    "privacy.accountant",
    "privacy.noise_multiplier",
)


SITE_OWN_KEYS = ("train.device",)
"""Under :data:`SITE_KEYS` but the site's own choice: never sent, ignored when received."""


def site_settings(cfg: Config) -> dict[str, bool | int | float | str]:
    """Select the flattened subset of ``cfg`` a site needs (no paths, no class names).

    Parameters
    ----------
    cfg : Config
        The run configuration.

    Returns
    -------
    dict of str to bool, int, float or str
        The :func:`flatten` entries whose key is in, or starts with an entry of,
        :data:`SITE_KEYS`.
    """
    return {
        k: v
        for k, v in flatten(cfg).items()
        if (k.startswith(SITE_KEYS) or k in SITE_KEYS) and k not in SITE_OWN_KEYS
    }


def from_site_settings(flat: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`site_settings` keys; other keys are ignored.

    Parameters
    ----------
    flat : dict of str to Any
        Settings as a site receives them.

    Returns
    -------
    Config
        The configuration, fields outside :data:`SITE_KEYS` at their defaults.

    Raises
    ------
    ConfigError
        As :func:`unflatten`.
    """
    return unflatten(
        {
            k: v
            for k, v in flat.items()
            if (k.startswith(SITE_KEYS) or k in SITE_KEYS) and k not in SITE_OWN_KEYS
        }
    )
