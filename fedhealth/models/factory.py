"""Build MONAI segmentation networks that DP-SGD can train.

DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) needs per-sample gradients, so
BatchNorm (which mixes samples) is never used: the networks use InstanceNorm or GroupNorm, and
activations are not in-place (Opacus's hook mode cannot handle in-place ops on its
backward-hook views).

The networks are MONAI's: ``UNet``, a residual U-Net (Kerfoot et al. 2018,
https://doi.org/10.1007/978-3-030-12029-0_40), and ``SegResNet`` (Myronenko 2018,
https://arxiv.org/abs/1810.11654).

``DP_READY`` maps each network to the Opacus ``grad_sample_mode`` it works with.
"""

from __future__ import annotations

from monai.networks.nets.segresnet import SegResNet
from monai.networks.nets.unet import UNet
from torch import nn

from fedhealth.config import ModelConfig
from fedhealth.errors import ConfigError

# Network -> Opacus grad_sample_mode known to work, each tested in tests/unit/models.
# UNet: "functorch" (vmap'd per-sample grads; its ConvTranspose3d has no dedicated hook sampler
# and "ew" cannot handle conv_transpose3d; measured 1.45x a plain step vs 2.1x for "hooks").
# SegResNet: its in-place residual ``x += identity`` needs "ew".
DP_READY: dict[str, str] = {"unet": "functorch", "segresnet": "ew"}
"""``model.name`` -> the Opacus ``grad_sample_mode`` that network is tested with."""

_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})


def _norm(cfg: ModelConfig) -> tuple[str, dict[str, object]]:
    if cfg.norm == "instance":
        return ("instance", {"affine": True})
    if cfg.norm == "group":
        return ("group", {"num_groups": cfg.num_groups})
    raise ConfigError(
        f"model.norm={cfg.norm!r}: only 'instance' or 'group' (BatchNorm is not DP-compatible)"
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build a fresh 3-D network for ``cfg``; the same torch seed gives the same weights.

    ``unet``: MONAI ``UNet`` with ``cfg.channels``, ``cfg.strides`` and
    ``cfg.num_res_units``, LeakyReLU(0.1). ``segresnet``: MONAI ``SegResNet`` with
    ``init_filters = cfg.channels[0]``, ReLU. Both take (B, in_channels, D, H, W) and return
    logits of shape (B, out_channels, D, H, W), with ``cfg.norm`` normalisation, never
    in-place activations.

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
        If ``cfg.name`` or ``cfg.norm`` is unknown, or ``cfg.strides`` does not have one entry
        fewer than ``cfg.channels`` (``unet``).
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
