"""Synthetic multi-site MRI cohort written as real NIfTI files with Decathlon-style datalists.

Each volume is one patient: a head-like tissue ellipsoid with bright lesions drawn by MONAI's
:func:`monai.data.create_test_image_3d`, seen through a site-specific scanner profile
(:class:`ScannerProfile`): voxel spacing, contrast (gamma), smooth multiplicative bias field,
Rician noise, and the scanner's arbitrary intensity scale and offset. Lesion size and count also
differ per site, so the sites are non-IID in both images and labels. Everything is drawn from
``numpy.random.default_rng([seed, site, case])``: the same seed writes the same bytes of voxels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import create_test_image_3d
from monai.transforms import RandBiasField, RandRicianNoise

LABELS = {"0": "background", "1": "lesion"}


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and population shape its images.

    Parameters
    ----------
    spacing : float, voxel edge in mm (the field of view is kept, so coarser spacing = fewer voxels).
    gamma : float, contrast curve applied to the [0, 1] phantom.
    bias_coeff : float, amplitude of the smooth multiplicative bias field (MONAI ``RandBiasField``).
    noise_std : float, Rician noise standard deviation relative to tissue intensity.
    scale, offset : float, the scanner's arbitrary intensity units.
    lesion_count : int, maximum lesions per patient.
    lesion_rad_min, lesion_rad_max : int, lesion radius range in mm.
    lesion_contrast : float, lesion brightness above tissue (lower is harder).
    """

    spacing: float
    gamma: float
    bias_coeff: float
    noise_std: float
    scale: float
    offset: float
    lesion_count: int
    lesion_rad_min: int
    lesion_rad_max: int
    lesion_contrast: float


def site_profile(site: int, seed: int, heterogeneity: float = 1.0) -> ScannerProfile:
    """Draw site ``site``'s profile; ``heterogeneity`` 0 gives every site the same scanner."""
    rng = np.random.default_rng([seed, site, 7919])
    h = float(np.clip(heterogeneity, 0.0, 2.0))

    def around(center: float, spread: float) -> float:
        return float(center + h * spread * rng.uniform(-1.0, 1.0))

    rad_min = int(round(around(4.0, 1.5)))
    return ScannerProfile(
        spacing=round(around(1.0, 0.25), 3),
        gamma=round(around(1.0, 0.5), 3),
        bias_coeff=round(abs(around(0.15, 0.15)), 3),
        noise_std=round(abs(around(0.08, 0.05)), 3),
        scale=round(float(np.exp(around(np.log(500.0), 1.5))), 2),
        offset=round(around(0.0, 100.0), 2),
        lesion_count=max(1, int(round(around(4.0, 2.0)))),
        lesion_rad_min=max(2, rad_min),
        lesion_rad_max=max(rad_min + 2, int(round(around(8.0, 3.0)))),
        lesion_contrast=round(around(0.45, 0.15), 3),
    )


def phantom(
    profile: ScannerProfile, fov: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One patient's (image, label) on the site's voxel grid, image in scanner units."""
    n = max(16, int(round(fov / profile.spacing)))
    to_vox = 1.0 / profile.spacing
    rs = np.random.RandomState(rng.integers(0, 2**31 - 1))
    _, lesion = create_test_image_3d(
        n,
        n,
        n,
        num_objs=int(rng.integers(1, profile.lesion_count + 1)),
        rad_max=max(2, int(round(profile.lesion_rad_max * to_vox))),
        rad_min=max(1, int(round(profile.lesion_rad_min * to_vox))),
        num_seg_classes=1,
        random_state=rs,
    )
    grid = (np.mgrid[0:n, 0:n, 0:n].astype(np.float32) + 0.5) / n - 0.5
    axes = rng.uniform(0.40, 0.48, size=3).reshape(3, 1, 1, 1)
    head = ((grid / axes) ** 2).sum(0) <= 1.0
    lesion = (lesion > 0) & head
    tissue = 0.35 + 0.05 * np.cos(grid * rng.uniform(6, 14, size=(3, 1, 1, 1)) * np.pi).sum(0)
    image = np.where(head, tissue, 0.0) + profile.lesion_contrast * lesion
    image = np.clip(image, 0.0, 1.0) ** profile.gamma

    bias = RandBiasField(coeff_range=(profile.bias_coeff, profile.bias_coeff), prob=1.0)
    bias.set_random_state(int(rng.integers(0, 2**31 - 1)))
    image = np.asarray(bias(image[None].astype(np.float32)))[0]
    noise = RandRicianNoise(prob=1.0, std=profile.noise_std, sample_std=False)
    noise.set_random_state(int(rng.integers(0, 2**31 - 1)))
    image = np.asarray(noise(image[None].astype(np.float32)))[0]
    image = image * profile.scale + profile.offset
    return image.astype(np.float32), lesion.astype(np.uint8)


def _save(array: np.ndarray, spacing: float, path: Path) -> None:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))


def write_site(
    out: Path, site: int, seed: int, n_train: int, n_test: int, fov: int, heterogeneity: float
) -> Path:
    """Write one site: ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/``, ``dataset.json``."""
    profile = site_profile(site, seed, heterogeneity)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for case in range(n_train + n_test):
        split, tag = ("training", "Tr") if case < n_train else ("test", "Ts")
        rng = np.random.default_rng([seed, site, case])
        image, label = phantom(profile, fov, rng)
        name = f"site{site:03d}_case{case:04d}.nii.gz"
        _save(image, profile.spacing, out / f"images{tag}" / name)
        _save(label, profile.spacing, out / f"labels{tag}" / name)
        lists[split].append(
            {
                "image": f"./images{tag}/{name}",
                "label": f"./labels{tag}/{name}",
                "patient": f"site{site:03d}-patient{case:04d}",
            }
        )
    dataset = {
        "name": f"fedhealth-synthetic-site{site:03d}",
        "description": "Synthetic MRI lesion phantoms (fedhealth.data.synth); one volume per patient.",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": n_train,
        "numTest": n_test,
        "scanner_profile": asdict(profile),
        "seed": seed,
        **lists,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(dataset, indent=2))
    return path


def site_dir(root: Path | str, site: int) -> Path:
    return Path(root) / f"site-{site}"


def write_cohort(
    root: Path | str,
    sites: int,
    seed: int,
    n_train: int,
    n_test: int,
    fov: int = 32,
    heterogeneity: float = 1.0,
) -> list[Path]:
    """Write ``sites`` sites under ``root/site-<i>/``; returns their ``dataset.json`` paths."""
    return [
        write_site(site_dir(root, s), s, seed, n_train, n_test, fov, heterogeneity)
        for s in range(sites)
    ]
