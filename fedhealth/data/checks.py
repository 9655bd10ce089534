"""Check a site's data before training: image files, and patient ids where DP needs them.

Every image is readable NIfTI with finite voxels, on its label's grid, the label binary: a bad
scan fails here with an error that names the file, instead of a tensor-shape error deep inside
a batch. Re-exported by :mod:`fedhealth.data.loading`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from fedhealth.errors import DataError, PrivacyUnitMissing

if TYPE_CHECKING:
    from fedhealth.data.loading import SiteData

__all__ = ["check_pair", "require_patient_ids"]


def _load_nifti(path: Path) -> SpatialImage:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # nibabel's loader is typed as any image; a non-spatial one fails get_fdata below
        img = cast(SpatialImage, nib.load(str(path)))
        img.get_fdata(dtype=np.float32)  # forces a full read: truncated gzip fails here
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    return img


def check_pair(image_path: Path, label_path: Path) -> None:
    """Check that an image and its label are readable, finite and on the same grid.

    Each file is read in full; the affines must agree within 1e-3 and every label voxel must
    be 0 or 1.

    Parameters
    ----------
    image_path : Path
        The image NIfTI file.
    label_path : Path
        Its label NIfTI file.

    Raises
    ------
    DataError
        Naming the file that is missing or unreadable, whose shape or affine differs, whose
        voxels are not finite (image) or not binary (label).
    """
    image, label = _load_nifti(image_path), _load_nifti(label_path)
    if image.shape != label.shape:
        raise DataError(f"{label_path}: label shape {label.shape} != image shape {image.shape}")
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        raise DataError(f"{label_path}: label affine differs from its image {image_path}")
    if not np.isfinite(image.get_fdata(dtype=np.float32)).all():
        raise DataError(f"{image_path}: image contains NaN or infinite voxels")
    values = np.unique(np.asarray(label.dataobj))
    if not set(values.tolist()) <= {0, 1}:
        raise DataError(f"{label_path}: label values {values.tolist()[:5]} are not binary 0/1")


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
