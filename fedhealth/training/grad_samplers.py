"""Per-sample gradients of 3D (transposed) convolutions for Opacus, by the groups trick.

Opacus's own Conv3d sampler unfolds every input patch (``unfold3d``), and it has none for
ConvTranspose3d (its functorch fallback re-runs the layer per sample). The weight gradient of one
convolution for a whole batch can instead be computed as a single grouped convolution with one
group per sample (Rochette, Manoel & Tramel 2019, https://arxiv.org/abs/1912.06015), which is what
PyTorch's ExpandedWeights use for small batches
(``torch.nn.utils._expanded_weights.conv_utils.conv_group_weight_grad_sample``, reused here). A
transposed convolution's weight gradient is that of the convolution it is the adjoint of, with
the layer's output gradient as that convolution's input and the layer's input as its output
gradient. Registered with Opacus's ``register_grad_sampler``, they serve ``grad_sample_mode=
"hooks"`` (per-sample gradients equal to a brute-force loop: ``tests/unit/training/test_dp.py``).
Measured with ``benchmarks/dp.py``: a DP step of the default U-Net 1.45x a plain step, against
1.6x with Opacus's functorch mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.nn.utils._expanded_weights.conv_utils import conv_group_weight_grad_sample

__all__ = ["conv3d_grad_sample", "conv_transpose3d_grad_sample"]


# PyTorch's ExpandedWeights helper (untyped): the batch's per-sample weight gradients at once
_group_weight_grad: Callable[..., torch.Tensor] = conv_group_weight_grad_sample


def _bias(layer: nn.Module, backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    bias = getattr(layer, "bias", None)
    if bias is None or not bias.requires_grad:
        return {}
    return {bias: backprops.sum(dim=tuple(range(2, backprops.dim())))}


def conv3d_grad_sample(
    layer: nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a Conv3d's weight and bias.

    Parameters
    ----------
    layer : torch.nn.Conv3d
        The layer (``groups == 1``; grouped convolutions fall back to Opacus's unfold).
    activations : list of torch.Tensor
        The layer's input, shape (B, C_in, D, H, W).
    backprops : torch.Tensor, shape (B, C_out, D', H', W')
        The gradient of the loss with respect to the layer's output.

    Returns
    -------
    dict of Tensor to Tensor
        ``weight`` -> shape (B, C_out, C_in, k, k, k); ``bias`` -> shape (B, C_out).
    """
    x = activations[0]
    out = _bias(layer, backprops)
    if layer.weight.requires_grad:
        if layer.groups != 1:  # the groups trick needs one group per sample
            from opacus.grad_sample.conv import compute_conv_grad_sample

            return cast(
                dict[torch.Tensor, torch.Tensor],
                compute_conv_grad_sample(layer, activations, backprops),
            )
        out[layer.weight] = _group_weight_grad(
            x,
            backprops,
            layer.weight.shape,
            layer.stride,
            layer.padding,
            layer.dilation,
            x.shape[0],
            F.conv3d,
        )
    return out


def conv_transpose3d_grad_sample(
    layer: nn.ConvTranspose3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a ConvTranspose3d's weight and bias.

    ``y = conv_transpose3d(x, W)`` is the adjoint of ``conv3d(., W)``, so ``dL/dW`` per sample is
    the weight gradient of ``conv3d(dL/dy, W)`` whose output gradient is ``x``.

    Parameters
    ----------
    layer : torch.nn.ConvTranspose3d
        The layer (``groups == 1``, ``dilation == 1``).
    activations : list of torch.Tensor
        The layer's input ``x``, shape (B, C_in, D, H, W).
    backprops : torch.Tensor, shape (B, C_out, D', H', W')
        ``dL/dy``.

    Returns
    -------
    dict of Tensor to Tensor
        ``weight`` -> shape (B, C_in, C_out, k, k, k) (the layer's weight layout); ``bias`` ->
        shape (B, C_out).

    Raises
    ------
    NotImplementedError
        Grouped or dilated transposed convolutions (no such layer in fedhealth's models).
    """
    if layer.groups != 1 or any(d != 1 for d in layer.dilation):
        raise NotImplementedError("per-sample gradients of grouped/dilated ConvTranspose3d")
    x = activations[0]
    out = _bias(layer, backprops)
    if layer.weight.requires_grad:
        out[layer.weight] = _group_weight_grad(
            backprops,
            x,
            layer.weight.shape,
            layer.stride,
            layer.padding,
            layer.dilation,
            x.shape[0],
            F.conv3d,
        )
    return out


register_grad_sampler(nn.Conv3d)(conv3d_grad_sample)
register_grad_sampler(nn.ConvTranspose3d)(conv_transpose3d_grad_sample)
