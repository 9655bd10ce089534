"""Check a site's data before training: image files, and patient ids where DP needs them.

Every file is readable NIfTI with finite voxels; an image has the channels its datalist
declares (``modality``: one 3-D file, a 4-D file with the channels last, or one file per
channel); its label lies on the image's grid (shape, and affine within :data:`AFFINE_TOL_MM`,
a mismatch reported in mm) and holds only the declared ``labels`` after the header's scaling.
A bad scan fails here with an error that names the file, instead of a tensor-shape error deep
inside a batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from numpy.typing import NDArray

from fedhealth.errors import DataError, PrivacyUnitMissing

if TYPE_CHECKING:
    from fedhealth.data.datalist import DatalistItem, SiteData

__all__ = ["AFFINE_TOL_MM", "affine_distance_mm", "check_item", "require_patient_ids"]

AFFINE_TOL_MM = 0.01
"""Largest distance, in mm, between where two files put the same voxel corner."""
LABEL_TOL = 1e-3
"""Largest distance of a scaled label value from its integer class."""


def _load_nifti(path: Path) -> tuple[SpatialImage, NDArray[np.float32]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # nibabel's loader is typed as any image; a non-spatial one fails get_fdata below
        img = cast(SpatialImage, nib.load(str(path)))
        data = img.get_fdata(dtype=np.float32)  # a full read, scaled: truncated gzip fails here
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    return img, data


def affine_distance_mm(
    a: NDArray[np.float64], b: NDArray[np.float64], shape: tuple[int, ...]
) -> float:
    """Return how far apart two affines put the corners of a voxel grid, in mm.

    Parameters
    ----------
    a, b : numpy.ndarray of float, shape (4, 4)
        Voxel -> world (mm) affines.
    shape : tuple of int
        The grid's shape (its first three entries are used).

    Returns
    -------
    float
        The largest distance between the two images of the grid's 8 corners, in mm.
    """
    corners = np.array(
        [[*c, 1.0] for c in itertools.product(*[(0.0, max(n - 1, 0)) for n in shape[:3]])]
    ).T
    return float(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0).max())


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:3]


def _image(files: list[str], channels: int) -> tuple[SpatialImage, tuple[int, ...]]:
    """Check an image's file(s); return the first image and the spatial shape."""
    first: SpatialImage | None = None
    found = 0
    for name in files:
        path = Path(name)
        img, data = _load_nifti(path)
        if not np.isfinite(data).all():
            raise DataError(f"{path}: image contains NaN or infinite voxels")
        if data.ndim == 3:
            found += 1
        elif data.ndim == 4 and len(files) == 1:
            found += data.shape[3]
        else:
            raise DataError(
                f"{path}: image of shape {data.shape}: a 3-D volume, or one 4-D file with the "
                "channels last"
            )
        if first is None:
            first = img
        elif _spatial(img.shape) != _spatial(first.shape):
            raise DataError(f"{path}: shape {img.shape[:3]} != {files[0]}'s {first.shape[:3]}")
        else:
            gap = affine_distance_mm(first.affine, img.affine, first.shape)
            if gap > AFFINE_TOL_MM:
                raise DataError(f"{path}: its grid lies up to {gap:.3f} mm from {files[0]}'s")
    assert first is not None  # a datalist image names at least one file
    if found != channels:
        raise DataError(
            f"{files[0]}: {found} channel(s), but the datalist's 'modality' declares {channels}"
        )
    return first, _spatial(first.shape)


def check_item(item: DatalistItem, labels: Mapping[int, str], channels: int) -> None:
    """Check one datalist entry's files against what its datalist declares.

    Parameters
    ----------
    item : DatalistItem
        One entry: image file(s) and, if labelled, its label.
    labels : mapping of int to str
        The declared classes (voxel value -> name).
    channels : int
        The declared number of channels (entries of ``modality``).

    Raises
    ------
    DataError
        Naming the file that is missing or unreadable, has non-finite voxels or the wrong
        number of channels, or (label) lies off the image's grid (shape, or affine: the
        distance in mm) or holds values outside ``labels`` after its header's scaling.
    """
    image_files = [item["image"]] if isinstance(item["image"], str) else list(item["image"])
    image, shape = _image(image_files, channels)
    if "label" not in item:
        return
    label_path = Path(item["label"])
    label, data = _load_nifti(label_path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != shape:
        raise DataError(f"{label_path}: label shape {data.shape} != image shape {shape}")
    gap = affine_distance_mm(image.affine, label.affine, shape)
    if gap > AFFINE_TOL_MM:
        raise DataError(
            f"{label_path}: label grid lies up to {gap:.3f} mm from its image {image_files[0]}"
        )
    values = np.unique(data)
    rounded = np.round(values)
    bad = values[(np.abs(values - rounded) > LABEL_TOL) | ~np.isin(rounded, list(labels))]
    if bad.size:
        raise DataError(
            f"{label_path}: label values {bad.tolist()[:5]} (after the header's scaling) are not "
            f"among the declared labels {sorted(labels)}"
        )


def require_patient_ids(data: SiteData, privacy_unit: str, site: str) -> None:
    """Refuse DP training whose privacy unit is the patient when a scan names no patient.

    Parameters
    ----------
    data : SiteData
        The site's datalists.
    privacy_unit : str
        The site's ``privacy_unit`` (site.yaml): ``"patient"`` or ``"scan"``.
    site : str
        The site's name, for the message.

    Raises
    ------
    PrivacyUnitMissing
        ``privacy_unit`` is ``"patient"`` and a ``training`` entry has no ``patient`` id; the
        message names the site, the ``dataset.json``, how many entries and the fix.
    """
    if privacy_unit == "patient" and data.unidentified:
        first = ", ".join(map(str, data.unidentified[:5]))
        raise PrivacyUnitMissing(
            f"site {site}: {data.dataset_json}: {len(data.unidentified)} of {len(data.train)} "
            f"'training' entries have no 'patient' id (entries {first}"
            f"{', ...' if len(data.unidentified) > 5 else ''}), so DP cannot count each patient "
            "as one record. Add a 'patient' id to every training entry, or declare "
            "'privacy_unit: scan' in site.yaml (each scan then counts as one record; the "
            "report says 'per scan, not per patient')"
        )
