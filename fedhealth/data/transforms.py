"""The MONAI preprocessing every volume goes through, at a site and at prediction.

Whole volumes in one common frame: load, channel first, reorient to RAS (``Orientationd``
before ``Spacingd``, as MONAI's tutorials do), resample to an isotropic spacing (bilinear image,
nearest label), round the label to its classes, z-score each image channel. Training then
draws one random patch per record (``RandCropByPosNegLabeld``, a foreground or a background
centre with equal odds) and flips it; evaluation and prediction keep the whole volume for
sliding-window inference (:func:`fedhealth.training.inference.infer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import RandCropByPosNegLabeld, SpatialPadd
from monai.transforms.intensity.dictionary import NormalizeIntensityd
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd, RandFlipd, Spacingd
from monai.transforms.transform import MapTransform
from monai.transforms.utility.dictionary import EnsureChannelFirstd, EnsureTyped, Lambdad

__all__ = ["AXCODES", "preprocess", "train_augment"]

AXCODES = "RAS"
"""Every volume is reoriented to this frame (x to the patient's Right... as NIfTI's RAS+)."""


def preprocess(
    target_spacing: float, *, keys: Sequence[str] = ("image", "label"), pad_to: int = 0
) -> Compose:
    """Build the deterministic preprocessing of a path dict: one volume in the common frame.

    Parameters
    ----------
    target_spacing : float
        Isotropic voxel edge to resample to, in mm.
    keys : sequence of str, default ("image", "label")
        Keyword-only. The dict's keys: ``"image"`` (one path, or one per channel) and, when
        labelled, ``"label"``.
    pad_to : int, default 0
        Keyword-only. Pad every spatial edge to at least this many voxels (the training patch
        edge, so a small volume still yields a whole patch); 0 pads nothing.

    Returns
    -------
    Compose
        Maps ``{"image": path(s)[, "label": path]}`` to MONAI ``MetaTensor`` s of shape
        (C, X, Y, Z) (image, float32, each channel zero mean and unit variance) and
        (1, X, Y, Z) (label, integral class values), in RAS at ``target_spacing``. Invertible:
        MONAI's ``Invertd`` maps a prediction back to the scan's own grid.
    """
    keys = list(keys)
    labelled = "label" in keys
    steps: list[MapTransform] = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes=AXCODES, labels=None),
        Spacingd(
            keys=keys,
            pixdim=(target_spacing,) * 3,
            mode=["bilinear", "nearest"][: len(keys)] if labelled else "bilinear",
        ),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]
    if labelled:  # a label stored with a header scale factor is 0.9999 after scaling
        steps.append(Lambdad(keys="label", func=torch.round))
    steps.append(NormalizeIntensityd(keys="image", channel_wise=True))
    if pad_to:
        steps.append(SpatialPadd(keys=keys, spatial_size=(pad_to,) * 3))
    return Compose(steps)


def train_augment(patch_size: int) -> Compose:
    """Build the random part of training: one patch per record, random flips, plain tensors.

    Parameters
    ----------
    patch_size : int
        Edge of the cubic patch, in voxels.

    Returns
    -------
    Compose
        Maps a preprocessed volume (padded to ``patch_size``) to a list of exactly one dict of
        (C, p, p, p) image and (1, p, p, p) label tensors, ``p = patch_size``, its centre on a
        foreground voxel (label > 0) or a background voxel with probability 1/2 each.
    """
    keys = ["image", "label"]
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=(patch_size,) * 3,
                pos=1,
                neg=1,
                num_samples=1,
                allow_smaller=False,
            ),
            *(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
