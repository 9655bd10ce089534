"""Whole-volume inference: MONAI's sliding window over a volume, windows on the model's device."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

__all__ = ["infer"]


@torch.no_grad()
def infer(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: int,
    *,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Segment whole volumes with MONAI's sliding-window inference (Gaussian-weighted blend).

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode; logits of shape (B, K, p, p, p) for (B, C, p, p, p).
    image : torch.Tensor, shape (B, C, X, Y, Z)
        Whole volumes (any size: windows past an edge are padded).
    patch_size : int
        Window edge ``p``, in voxels: the training patch size.
    sw_batch_size : int, default 4
        Keyword-only. Windows per forward pass.
    overlap : float, default 0.25
        Keyword-only. Overlap of neighbouring windows, in [0, 1).
    device : torch.device or None, default None
        Keyword-only. Where the windows run (the model's device); None: the model's. The
        volume and the blended logits stay where ``image`` is.

    Returns
    -------
    torch.Tensor, shape (B, K, X, Y, Z)
        The blended logits, on ``image``'s device.
    """
    from monai.inferers.utils import sliding_window_inference

    out = sliding_window_inference(
        image,
        roi_size=(patch_size,) * 3,
        sw_batch_size=sw_batch_size,
        predictor=model,
        overlap=overlap,
        mode="gaussian",
        sw_device=device or _model_device(model, image.device),
        device=image.device,
    )
    return cast(torch.Tensor, out)


def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    """Where ``model``'s parameters are; ``default`` for a model without any."""
    first = next(model.parameters(), None)
    return default if first is None else first.device
