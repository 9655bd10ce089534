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
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d
from monai.transforms.intensity.array import RandBiasField, RandRicianNoise
from numpy.typing import NDArray

from fedhealth.errors import DataError

LABELS = {"0": "background", "1": "lesion"}
"""The datalist's label names: voxel value -> meaning."""


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and population shape its images.

    Parameters
    ----------
    spacing : float
        Voxel edge in mm (the field of view is kept, so coarser spacing means fewer voxels).
    gamma : float
        Contrast curve applied to the [0, 1] phantom (``image ** gamma``).
    bias_coeff : float
        Coefficient of the smooth multiplicative bias field (MONAI ``RandBiasField``, degree 3,
        coefficients drawn from ``[bias_coeff, bias_coeff]``).
    noise_std : float
        Rician noise standard deviation, in units of the [0, 1] phantom intensity.
    scale : float
        The scanner's arbitrary intensity scale (multiplies the noisy phantom).
    offset : float
        The scanner's arbitrary intensity offset (added after ``scale``).
    lesion_count : int
        Maximum lesions per patient (2 or more are drawn; some may fall outside the head).
    lesion_rad_min : int
        Smallest lesion radius, in mm.
    lesion_rad_max : int
        Largest lesion radius, in mm.
    lesion_contrast : float
        Lesion brightness above tissue, in phantom intensity (lower is harder).
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
    """Draw site ``site``'s scanner profile.

    Each field is its centre value plus ``heterogeneity`` times a uniform draw in
    [-spread, spread], from ``numpy.random.default_rng([seed, site, 7919])``.

    Parameters
    ----------
    site : int
        Index of the site.
    seed : int
        The cohort's seed.
    heterogeneity : float, default 1.0
        How much sites differ, clipped to [0, 2]; 0 gives every site the same scanner.

    Returns
    -------
    ScannerProfile
        The site's profile (spacing in mm, lesion radii in mm).
    """
    rng = np.random.default_rng([seed, site, 7919])
    h = float(np.clip(heterogeneity, 0.0, 2.0))

    def around(center: float, spread: float) -> float:
        return float(center + h * spread * rng.uniform(-1.0, 1.0))

    rad_min = int(round(around(6.0, 1.5)))
    return ScannerProfile(
        spacing=round(around(1.25, 0.25), 3),
        gamma=round(around(1.0, 0.5), 3),
        bias_coeff=round(abs(around(0.15, 0.15)), 3),
        noise_std=round(abs(around(0.08, 0.05)), 3),
        scale=round(float(np.exp(around(np.log(500.0), 1.5))), 2),
        offset=round(around(0.0, 100.0), 2),
        lesion_count=max(2, int(round(around(4.0, 1.5)))),
        lesion_rad_min=max(2, rad_min),
        lesion_rad_max=max(rad_min + 3, int(round(around(12.0, 3.0)))),
        lesion_contrast=round(around(0.45, 0.15), 3),
    )


def phantom(
    profile: ScannerProfile, fov: int, rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """Draw one patient's image and lesion label on the site's voxel grid.

    Parameters
    ----------
    profile : ScannerProfile
        The site's scanner.
    fov : int
        Field of view, in mm: the grid has ``n = max(16, round(fov / profile.spacing))``
        voxels per edge.
    rng : numpy.random.Generator
        Source of every random draw (lesions, head shape, texture, bias field, noise).

    Returns
    -------
    image : numpy.ndarray of float32, shape (n, n, n)
        In the scanner's intensity units.
    label : numpy.ndarray of uint8, shape (n, n, n)
        1 on lesion voxels inside the head, 0 elsewhere.
    """
    n = max(16, int(round(fov / profile.spacing)))
    to_vox = 1.0 / profile.spacing
    rs = np.random.RandomState(rng.integers(0, 2**31 - 1))
    # a small field of view caps the radii (MONAI needs the grid wider than a lesion's diameter)
    rad_max = max(2, min(int(round(profile.lesion_rad_max * to_vox)), (n - 1) // 3))
    rad_min = max(1, min(int(round(profile.lesion_rad_min * to_vox)), rad_max - 1))
    _, lesion = create_test_image_3d(
        n,
        n,
        n,
        num_objs=int(rng.integers(min(2, profile.lesion_count), profile.lesion_count + 1)),
        rad_max=rad_max,
        rad_min=rad_min,
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


def _save(array: NDArray[np.float32] | NDArray[np.uint8], spacing: float, path: Path) -> None:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))  # type: ignore[no-untyped-call]


def write_site(
    out: Path, site: int, seed: int, n_train: int, n_test: int, fov: int, heterogeneity: float
) -> Path:
    """Write one site: ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/``, ``dataset.json``.

    Case ``c`` is drawn from ``numpy.random.default_rng([seed, site, c])``; the first
    ``n_train`` cases are the training list, the rest the test list, one patient each.

    Parameters
    ----------
    out : Path
        The site's directory (created if missing); it must not hold a ``dataset.json`` yet.
    site : int
        Index of the site.
    seed : int
        The cohort's seed.
    n_train : int
        Training volumes.
    n_test : int
        Test volumes.
    fov : int
        Field of view, in mm (see :func:`phantom`).
    heterogeneity : float
        See :func:`site_profile`.

    Returns
    -------
    Path
        The site's ``dataset.json`` (relative paths, a ``patient`` per entry, the scanner
        profile and the seed).

    Raises
    ------
    DataError
        If ``out`` already holds a ``dataset.json`` or a file this would write: nothing is
        written over an existing file.
    """
    if (out / "dataset.json").exists():
        raise DataError(f"{out}: already holds a dataset.json; fedhealth never writes over one")
    profile = site_profile(site, seed, heterogeneity)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for case in range(n_train + n_test):
        split, tag = ("training", "Tr") if case < n_train else ("test", "Ts")
        rng = np.random.default_rng([seed, site, case])
        image, label = phantom(profile, fov, rng)
        name = f"site{site:03d}_case{case:04d}.nii.gz"
        for sub in (f"images{tag}", f"labels{tag}"):
            if (out / sub / name).exists():
                raise DataError(f"{out / sub / name}: exists; fedhealth never writes over a file")
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
        "description": (
            "Synthetic MRI lesion phantoms (fedhealth.data.synth); one volume per patient."
        ),
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
    """Return the directory of site ``site`` under a cohort ``root``: ``root/site-<site>``.

    Parameters
    ----------
    root : Path or str
        The cohort's root directory.
    site : int
        Index of the site.

    Returns
    -------
    Path
        ``root/site-<site>``.
    """
    return Path(root) / f"site-{site}"


MARKER = ".fedhealth-synthetic.json"
"""The file that marks a folder fedhealth created for a synthetic cohort, with its parameters."""


def write_cohort(
    root: Path | str,
    sites: int,
    seed: int,
    n_train: int,
    n_test: int,
    fov: int = 32,
    heterogeneity: float = 1.0,
) -> list[Path]:
    """Write the sites of a synthetic cohort that ``root`` lacks; return every site's datalist.

    ``root`` must be missing, hold no file (empty folders, such as mounted volumes, are fine),
    or be a cohort this function made with the same parameters (its :data:`MARKER` file says
    so): anything else is someone's data, and nothing is written. A site already there is kept
    as it is; a missing one is written into a temporary folder and renamed into place, so a
    crash never leaves half a site (an existing empty site folder is filled in place).

    Parameters
    ----------
    root : Path or str
        The cohort's folder.
    sites : int
        Number of sites.
    seed : int
        The cohort's seed.
    n_train : int
        Training volumes per site.
    n_test : int
        Test volumes per site.
    fov : int, default 32
        Field of view, in mm.
    heterogeneity : float, default 1.0
        See :func:`site_profile`.

    Returns
    -------
    list of Path
        The sites' ``dataset.json`` paths, in site order.

    Raises
    ------
    DataError
        ``root`` holds files but no :data:`MARKER`, or a cohort made with other parameters
        (the message names the folder and the differing parameters).
    """
    root = Path(root)
    params: dict[str, Any] = {
        "seed": seed,
        "train_per_site": n_train,
        "test_per_site": n_test,
        "fov": fov,
        "heterogeneity": heterogeneity,
    }
    marker = root / MARKER
    inside = next((p for p in [root, *root.parents] if (p / "dataset.json").is_file()), None)
    if inside is not None:
        raise DataError(
            f"{root}: inside the site folder {inside} (it holds a dataset.json); fedhealth "
            "never writes into a hospital's data folder. Train on a hospital's own sites with "
            "data.site_dirs=[<folder with dataset.json>, ...]"
        )
    if marker.is_file():
        found = json.loads(marker.read_text())
        differ = sorted(k for k in params if found.get(k) != params[k])
        if differ:
            raise DataError(
                f"{root}: holds a synthetic cohort made with other "
                + ", ".join(f"{k} ({found.get(k)} there, {params[k]} asked)" for k in differ)
                + "; choose another data.root or delete that folder"
            )
    elif root.exists() and any(p.is_file() for p in root.rglob("*")):
        raise DataError(
            f"{root}: not a folder fedhealth created for a synthetic cohort (no {MARKER}); "
            "fedhealth never writes into it. Train on a hospital's own sites with "
            "data.site_dirs=[<folder with dataset.json>, ...], or choose an empty data.root"
        )
    else:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(params, indent=2))
    out = []
    for s in range(sites):
        final = site_dir(root, s)
        if (final / "dataset.json").is_file():
            pass
        elif final.is_dir() and not any(final.iterdir()):  # e.g. a mounted volume: fill it
            write_site(final, s, seed, n_train, n_test, fov, heterogeneity)
        elif final.exists():
            raise DataError(f"{final}: a site folder without dataset.json; delete it")
        else:
            partial = root / f".{final.name}.partial"
            if partial.exists():
                shutil.rmtree(partial)  # our own interrupted write, inside our own folder
            write_site(partial, s, seed, n_train, n_test, fov, heterogeneity)
            partial.rename(final)
        out.append(final / "dataset.json")
    return out
