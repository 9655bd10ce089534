"""Build MONAI segmentation networks that DP-SGD can train.

DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) needs per-sample gradients, so
BatchNorm (which mixes samples) is never used: the networks use InstanceNorm or GroupNorm, and
activations are not in-place (Opacus's hook mode cannot handle in-place ops on its
backward-hook views).

The networks are MONAI's: ``UNet``, a residual U-Net (Kerfoot et al. 2018,
https://doi.org/10.1007/978-3-030-12029-0_40), and ``SegResNet`` (Myronenko 2018,
https://arxiv.org/abs/1810.11654).

``DP_READY`` maps each network to the Opacus ``grad_sample_mode`` it works with.

GroupNorm (Wu & He 2018, https://arxiv.org/abs/1803.08494) needs ``num_groups`` to divide a
layer's channels. ``model.num_groups`` must divide every feature width the config sets
(``model.channels``); a layer whose width the config does not set, the U-Net's output-level
up-convolution with ``out_channels`` (the class count, e.g. 2) channels, gets the largest divisor
of its channels not above ``model.num_groups`` (2 groups of 1 channel for 2 classes).
"""

from __future__ import annotations

from monai.networks.layers.factories import Norm
from monai.networks.nets.segresnet import SegResNet
from monai.networks.nets.unet import UNet
from torch import nn

from fedhealth.config import ModelConfig
from fedhealth.errors import ConfigError

# Network -> Opacus grad_sample_mode known to work, each tested in tests/unit/models.
# UNet: "hooks" with fedhealth's groups-trick samplers for Conv3d and ConvTranspose3d
# (fedhealth/training/grad_samplers.py, registered when fedhealth.training trains with DP):
# a DP step 1.45x a plain one, against 1.6x with "functorch"; "ew" cannot take
# conv_transpose3d.
# SegResNet: its in-place residual ``x += identity`` needs "ew".
DP_READY: dict[str, str] = {"unet": "hooks", "segresnet": "ew"}
"""``model.name`` -> the Opacus ``grad_sample_mode`` that network is tested with."""

_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})


# MONAI's Norm factory name of _divisor_group_norm; get_norm_layer looks a norm up by name only.
_GROUP_NORM = "fedhealth_group"


def _divisor_group_norm(
    num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True
) -> nn.GroupNorm:
    """GroupNorm with the largest divisor of ``num_channels`` not above ``num_groups`` groups."""
    groups = max(g for g in range(1, min(num_groups, num_channels) + 1) if num_channels % g == 0)
    return nn.GroupNorm(groups, num_channels, eps=eps, affine=affine)


if _GROUP_NORM.upper() not in Norm.names:
    # a plain nn.GroupNorm comes out, so Opacus's per-layer grad samplers still apply
    Norm.add_factory_callable(_GROUP_NORM, lambda spatial_dims=None: _divisor_group_norm)


def _feature_widths(cfg: ModelConfig) -> tuple[str, list[int]]:
    # UNet normalises each model.channels width, plus out_channels at its output level;
    # SegResNet normalises channels[0] * 2**k, all divisible by whatever divides channels[0].
    if cfg.name == "segresnet":
        return f"model.channels[0]={cfg.channels[0]}", cfg.channels[:1]
    return f"model.channels={list(cfg.channels)}", list(cfg.channels)


def _norm(cfg: ModelConfig) -> tuple[str, dict[str, object]]:
    if cfg.norm == "instance":
        return ("instance", {"affine": True})
    if cfg.norm == "group":
        field, widths = _feature_widths(cfg)
        if cfg.num_groups < 1 or any(w % cfg.num_groups for w in widths):
            raise ConfigError(
                f"model.num_groups={cfg.num_groups} must be a positive divisor of every feature "
                f"width, {field} (GroupNorm splits a layer's channels into equal groups)"
            )
        return (_GROUP_NORM, {"num_groups": cfg.num_groups})
    raise ConfigError(
        f"model.norm={cfg.norm!r}: only 'instance' or 'group' (BatchNorm is not DP-compatible)"
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build a fresh 3-D network for ``cfg``; the same torch seed gives the same weights.

    ``unet``: MONAI ``UNet`` with ``cfg.channels``, ``cfg.strides`` and
    ``cfg.num_res_units``, LeakyReLU(0.1). ``segresnet``: MONAI ``SegResNet`` with
    ``init_filters = cfg.channels[0]``, ReLU. Both take (B, in_channels, D, H, W) and return
    logits of shape (B, out_channels, D, H, W), with ``cfg.norm`` normalisation, never
    in-place activations. With ``norm="group"`` every feature layer has ``cfg.num_groups``
    groups; the U-Net's output-level layer (``out_channels`` wide) has the largest divisor of
    ``out_channels`` not above ``cfg.num_groups`` (Wu & He 2018,
    https://arxiv.org/abs/1803.08494).

    Parameters
    ----------
    cfg : ModelConfig
        The ``model`` section of the run configuration.

    Returns
    -------
    torch.nn.Module
        The network, checked by :func:`check_dp_compatible`.

    Raises
    ------
    ConfigError
        If ``cfg.name`` or ``cfg.norm`` is unknown, ``cfg.strides`` does not have one entry
        fewer than ``cfg.channels`` (``unet``), or, with ``norm="group"``, ``cfg.num_groups`` is
        not a positive divisor of every ``cfg.channels`` entry (``unet``) or of
        ``cfg.channels[0]`` (``segresnet``).
    """
    if cfg.name == "unet":
        if len(cfg.strides) != len(cfg.channels) - 1:
            raise ConfigError(
                f"model.strides needs len(model.channels)-1 = {len(cfg.channels) - 1} entries"
            )
        model: nn.Module = UNet(
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units,
            act=_ACT,
            norm=_norm(cfg),
        )
    elif cfg.name == "segresnet":
        model = SegResNet(
            spatial_dims=3,
            init_filters=cfg.channels[0],
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            act=("relu", {"inplace": False}),
            norm=_norm(cfg),
        )
    else:
        raise ConfigError(f"model.name={cfg.name!r}: choose one of {sorted(DP_READY)}")
    check_dp_compatible(model)
    return model


def check_dp_compatible(model: nn.Module) -> None:
    """Check that a network holds no layer that breaks per-sample gradients.

    Parameters
    ----------
    model : torch.nn.Module
        The network to check, every submodule included.

    Raises
    ------
    ConfigError
        Naming the first BatchNorm layer or in-place module found.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"layer {name!r} is BatchNorm, which DP-SGD cannot train")
        if getattr(module, "inplace", False):
            raise ConfigError(f"layer {name!r} is in-place, which breaks Opacus hooks")


def num_parameters(model: nn.Module) -> int:
    """Count a network's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The network.

    Returns
    -------
    int
        Total number of scalar parameters (trainable or not).
    """
    return sum(p.numel() for p in model.parameters())
