"""Decathlon sites of real brain anatomy, for tests: MNI152 T1 and its grey/white-matter labels.

The anatomy is the ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al. 2011,
https://doi.org/10.1016/j.neuroimage.2010.07.033) as nilearn ships it: a skull-stripped T1 and
grey- and white-matter probability maps (uint8, 0-255), 1 mm, RAS. It is block-averaged to
2 mm once per process.

Label rule: with ``p_gm`` and ``p_wm`` the tissue probabilities and
``p_bg = max(0, 1 - p_gm - p_wm)`` (CSF and everything outside the brain), a voxel's class is
``argmax(p_bg, p_gm, p_wm)``: 0 background, 1 grey matter, 2 white matter (the maximum a
posteriori tissue). The probabilities are interpolated to a scan's voxel centres before the
argmax, so a coarse voxel takes the class that fills most of it, and the label stays integral.

A patient (:func:`sample_case`) is the template under a small random affine (pose and size),
seen on a site's scanner grid: image and probabilities are sampled at the same world points,
so image and label share their geometry exactly. The image then gets a gamma curve, a smooth
bias field and Rician noise. Sites (:data:`SITES`) differ as hospitals do: spacing, oblique
tilt, voxel order on disk (RAS, LPS, axis-permuted), file dtypes, ``.nii`` or ``.nii.gz``.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "LABELS",
    "MODALITY",
    "ORIENTATIONS",
    "SITES",
    "Scan",
    "SiteSpec",
    "reorder",
    "sample_case",
    "write_orientations",
    "write_scan",
    "write_sites",
]

LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
"""The datalists' ``labels``: voxel value -> class."""
MODALITY = {"0": "T1w"}
"""The datalists' ``modality``: one T1-weighted channel."""
_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"  # under nilearn/datasets/data
MARGIN_MM = 8.0  # around the template's brain box, in every field of view: covers the motion

Array = NDArray[np.float32]


@functools.cache
def _template() -> tuple[Array, NDArray[np.float64], NDArray[np.float64]]:
    """MNI152 (T1 in [0, 1], p_gm, p_wm) at 2 mm, its affine, and its brain's world box."""
    spec = importlib.util.find_spec("nilearn")  # its files, without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: it ships the MNI152 template files")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    stack, affine = [], np.eye(4)
    for key in ("t1", "gm", "wm"):
        img: Any = nib.load(str(folder / _FILE.format(key)))  # FileNotFoundError if missing
        data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        x, y, z = (n // 2 * 2 for n in data.shape)
        stack.append(data[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean((1, 3, 5)))
        # voxel i of the 2 mm grid averages 1 mm voxels 2i and 2i + 1: its centre is 2i + 0.5
        affine = np.asarray(img.affine, np.float64) @ np.array(
            [[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]], np.float64
        )
    volumes = np.stack(stack).astype(np.float32)
    inside = np.argwhere(volumes[1] + volumes[2] > 0.1)
    ends = np.stack([inside.min(axis=0), inside.max(axis=0)]).astype(np.float64)
    box = np.sort((affine[:3, :3] @ ends.T).T + affine[:3, 3], axis=0)
    return volumes, affine, box


def _trilinear(volumes: Array, index: NDArray[np.float64]) -> Array:
    """Sample (K, X, Y, Z) volumes at fractional voxel indices (3, N); zero outside."""
    lo = np.floor(index).astype(np.intp)
    frac = (index - lo).astype(np.float32)
    shape = np.array(volumes.shape[1:])[:, None]
    out = np.zeros((volumes.shape[0], index.shape[1]), np.float32)
    for corner in itertools.product((0, 1), repeat=3):
        step = np.array(corner)[:, None]
        at = lo + step
        weight = np.prod(np.where(step == 1, frac, 1 - frac), axis=0)
        ok = np.all((at >= 0) & (at < shape), axis=0)
        out[:, ok] += weight[ok] * volumes[:, at[0, ok], at[1, ok], at[2, ok]]
    return out


def _rotation(angles_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotation matrix about x, then y, then z (angles in degrees)."""
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles_deg)):
        i, j = (a for a in range(3) if a != axis)
        cos, sin, turn = np.cos(angle), np.sin(angle), np.eye(3)
        turn[[i, j, i, j], [i, j, j, i]] = cos, cos, -sin, sin
        out = turn @ out
    return out


@dataclass(frozen=True)
class Scan:
    """One scan in world (RAS mm) geometry, before storage.

    Parameters
    ----------
    image : numpy.ndarray of float32, shape (X, Y, Z)
        Intensities, about [0, 1.3].
    label : numpy.ndarray of uint8, shape (X, Y, Z)
        Classes 0, 1, 2 (see :data:`LABELS`).
    affine : numpy.ndarray of float64, shape (4, 4)
        Voxel -> world, shared by image and label.
    """

    image: Array
    label: NDArray[np.uint8]
    affine: NDArray[np.float64]


@dataclass(frozen=True)
class SiteSpec:
    """One hospital: its scanner grid and how it stores its files.

    Parameters
    ----------
    name : str
        The site's folder name.
    spacing : tuple of 3 float, default (3.0, 3.0, 3.0)
        Voxel edges, in mm.
    tilt_deg : float, default 0.0
        Oblique grid angle about the left-right axis.
    flips, perm : see :func:`reorder`
        Voxel order on disk (default: as drawn, RAS).
    image_dtype, label_dtype : str, default "float32", "uint8"
        NumPy dtypes of the files; integer images are rounded and clipped to the type.
    units : float, default 1.0
        Image intensities are multiplied by this before the cast (the scanner's units).
    suffix : str, default ".nii.gz"
        ``.nii.gz`` or ``.nii``.
    rot_deg, shift_mm, scale : float, default 4.0, 3.0, 0.05
        A patient's pose and size: rotation angles uniform in ``[-rot_deg, rot_deg]``, shifts
        in ``[-shift_mm, shift_mm]``, scaling of each axis in ``[1 - scale, 1 + scale]``.
    bias, noise : float, default 0.15, 0.03
        Log-amplitude of the bias field (a 2nd-order polynomial; with a gamma curve in
        ``[0.85, 1.15]`` when ``bias > 0``), and the Rician noise's standard deviation.
    """

    name: str
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    tilt_deg: float = 0.0
    flips: tuple[bool, bool, bool] = (False, False, False)
    perm: tuple[int, int, int] = (0, 1, 2)
    image_dtype: str = "float32"
    label_dtype: str = "uint8"
    units: float = 1.0
    suffix: str = ".nii.gz"
    rot_deg: float = 4.0
    shift_mm: float = 3.0
    scale: float = 0.05
    bias: float = 0.15
    noise: float = 0.03


def sample_case(rng: np.random.Generator, spec: SiteSpec) -> Scan:
    """Draw one patient: the template moved and rescaled, imaged on a site's scanner grid.

    Parameters
    ----------
    rng : numpy.random.Generator
        The source of every random choice.
    spec : SiteSpec
        The grid (``spacing``, ``tilt_deg``), the spread of pose and size (``rot_deg``,
        ``shift_mm``, ``scale``) and the image's ``bias`` and ``noise``.

    Returns
    -------
    Scan
        Image and label on a grid covering the brain plus :data:`MARGIN_MM`.
    """
    volumes, tpl_affine, box = _template()
    centre = box.mean(axis=0)
    pose = _rotation(rng.uniform(-spec.rot_deg, spec.rot_deg, 3)) @ np.diag(
        rng.uniform(1 - spec.scale, 1 + spec.scale, 3)
    )
    shift = rng.uniform(-spec.shift_mm, spec.shift_mm, 3)
    grid = _rotation(np.array([spec.tilt_deg, 0.0, 0.0]))
    # the grid covers the template's (margined) brain box, in the grid's own axes
    corners = np.array(list(itertools.product(*box.T))) - centre
    corners = corners + np.sign(corners) * MARGIN_MM
    local = corners @ grid  # rows: grid-frame coordinates (grid.T @ c)
    lo, hi = local.min(axis=0), local.max(axis=0)
    step = np.asarray(spec.spacing, dtype=np.float64)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / step).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] = grid @ np.diag(step)
    affine[:3, 3] = np.round((centre + grid @ lo) * 2) / 2  # binary-exact: 0.5 mm steps
    voxels = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ voxels + affine[:3, 3:4]
    # the patient is the template under x -> centre + pose (x - centre) + shift: invert it
    source = np.linalg.solve(pose, world - (centre + shift)[:, None]) + centre[:, None]
    inv = np.linalg.inv(tpl_affine)
    t1, gm, wm = _trilinear(volumes, inv[:3, :3] @ source + inv[:3, 3:4])
    label = np.argmax(np.stack([np.clip(1 - gm - wm, 0, None), gm, wm]), axis=0)
    unit = (world - centre[:, None]) / 90.0  # about [-1, 1] over the head
    terms = np.concatenate([unit, unit**2 - 1 / 3])
    field_ = np.exp(rng.normal(0.0, spec.bias, terms.shape[0]) @ terms)
    gamma = rng.uniform(0.85, 1.15) if spec.bias > 0 else 1.0
    clean = np.clip(t1, 0, None) ** gamma * field_
    n1, n2 = rng.normal(0.0, spec.noise, (2, clean.size))
    image = np.sqrt((clean + n1) ** 2 + n2**2)
    return Scan(
        image.reshape(shape).astype(np.float32), label.reshape(shape).astype(np.uint8), affine
    )


def reorder(
    data: NDArray[Any],
    affine: NDArray[np.float64],
    flips: tuple[bool, bool, bool] = (False, False, False),
    perm: tuple[int, int, int] = (0, 1, 2),
) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """Store the same voxels in another order; the affine follows, so the world is unchanged.

    Parameters
    ----------
    data : numpy.ndarray, shape (X, Y, Z)
        The voxels.
    affine : numpy.ndarray of float64, shape (4, 4)
        Voxel -> world.
    flips : tuple of 3 bool, default no flip
        Reverse these axes (of ``data``) first; (True, True, False) turns RAS storage into LPS.
    perm : tuple of 3 int, default (0, 1, 2)
        Then transpose: new axis ``j`` is axis ``perm[j]``.

    Returns
    -------
    tuple of (numpy.ndarray, numpy.ndarray)
        The reordered voxels and their affine: every voxel keeps its world position.
    """
    out, aff = data, affine.copy()
    for axis in (a for a in range(3) if flips[a]):
        out, undo = np.flip(out, axis), np.eye(4)
        undo[axis, axis], undo[axis, 3] = -1.0, data.shape[axis] - 1.0  # v = n - 1 - v'
        aff = aff @ undo
    # stored index v' is old index v = P v', with P[perm[j], j] = 1: the identity's columns permuted
    return np.ascontiguousarray(np.transpose(out, perm)), aff @ np.eye(4)[:, [*perm, 3]]


SITES = (
    SiteSpec("site-a", image_dtype="int16", units=1000.0),
    SiteSpec(
        "site-b",
        (3.0, 3.0, 4.0),
        flips=(True, True, False),
        image_dtype="float64",
        label_dtype="int16",
        suffix=".nii",
        bias=0.25,
        noise=0.04,
    ),
    SiteSpec(
        "site-c",
        (3.5, 3.5, 3.5),
        tilt_deg=15.0,
        perm=(2, 0, 1),
        image_dtype="uint8",
        label_dtype="float32",
        units=180.0,
        noise=0.02,
    ),
)
"""A: 3 mm RAS, int16 ``.nii.gz``. B: 3x3x4 mm LPS, float64 ``.nii``, more bias and noise.
C: 3.5 mm, tilted 15 degrees, stored S-R-A, uint8 image and float32 labels."""

ORIENTATIONS = {
    "ras": SiteSpec("ras"),
    "lps": SiteSpec("lps", flips=(True, True, False)),
    "permuted": SiteSpec("permuted", perm=(2, 0, 1)),
}
"""One scan's voxels stored three ways: as drawn (RAS), x and y reversed (LPS), axes S-R-A."""


def write_scan(scan: Scan, image_path: Path, label_path: Path | None, spec: SiteSpec) -> None:
    """Write a scan's image (and label) as NIfTI as a site stores them (qform = sform, code 1).

    Parameters
    ----------
    scan : Scan
        The scan.
    image_path, label_path : Path, and Path or None
        The files to write (no label file for None).
    spec : SiteSpec
        Voxel order, dtypes and intensity units (its other fields are not used).
    """
    for data, path, dtype, factor in (
        (scan.image, image_path, spec.image_dtype, spec.units),
        (scan.label, label_path, spec.label_dtype, 1.0),
    ):
        if path is not None:
            stored, affine = reorder(data * factor, scan.affine, spec.flips, spec.perm)
            if np.dtype(dtype).kind in "iu":  # rounded and clipped to the integer type
                stored = np.clip(np.round(stored), np.iinfo(dtype).min, np.iinfo(dtype).max)
            img = nib.Nifti1Image(stored.astype(dtype), affine)  # type: ignore[no-untyped-call]
            img.set_qform(affine, code=1)  # type: ignore[no-untyped-call]
            img.set_sform(affine, code=1)  # type: ignore[no-untyped-call]
            nib.save(img, str(path))


def write_orientations(folder: Path, scan: Scan) -> dict[str, dict[str, str]]:
    """Write one scan (image and label) once per storage order of :data:`ORIENTATIONS`.

    Parameters
    ----------
    folder : Path
        Created if missing; gets ``<name>_image.nii.gz`` and ``<name>_label.nii.gz``.
    scan : Scan
        The scan (float32 image, uint8 label on disk).

    Returns
    -------
    dict of str to dict of str to str
        Orientation name -> ``{"image": path, "label": path}`` (a preprocessing input).
    """
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in ORIENTATIONS.items():
        paths = {key: folder / f"{name}_{key}.nii.gz" for key in ("image", "label")}
        write_scan(scan, paths["image"], paths["label"], spec)
        out[name] = {key: str(path) for key, path in paths.items()}
    return out


def write_sites(
    root: Path,
    n_train: int = 4,
    n_test: int = 2,
    seed: int = 0,
    sites: tuple[SiteSpec, ...] = SITES,
) -> list[Path]:
    """Write Decathlon sites: ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/``, datalist.

    Site ``s``'s case ``c`` is drawn from ``numpy.random.default_rng([seed, s, c])``, one patient
    a case: the first ``n_train`` form the training list, the rest the labelled test list. Each
    ``dataset.json`` has :data:`LABELS`, :data:`MODALITY`, a ``patient`` per entry, relative paths.

    Parameters
    ----------
    root : Path
        Parent folder; gets one folder per site, named after it.
    n_train, n_test, seed : int, default 4, 2, 0
        Cases per list and site, and the seed.
    sites : tuple of SiteSpec, default SITES
        The sites.

    Returns
    -------
    list of Path
        The site folders, in ``sites`` order.

    Raises
    ------
    FileExistsError
        A site folder already holds a ``dataset.json`` (nothing is written over it).
    """
    folders = [root / spec.name for spec in sites]
    for s, (spec, folder) in enumerate(zip(sites, folders, strict=True)):
        if (folder / "dataset.json").exists():
            raise FileExistsError(f"{folder}: already holds a dataset.json")
        lists: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        for c in range(n_train + n_test):
            key, tag = ("training", "Tr") if c < n_train else ("test", "Ts")
            rng = np.random.default_rng([seed, s, c])
            case = sample_case(rng, spec)
            name = f"{spec.name}_{c:03d}{spec.suffix}"
            entry = {"image": f"images{tag}/{name}", "label": f"labels{tag}/{name}"}
            for rel in entry.values():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            write_scan(case, folder / entry["image"], folder / entry["label"], spec)
            lists[key].append({**entry, "patient": f"{spec.name}-patient{c:03d}"})
        dataset = {
            "name": "mni152-gm-wm",
            "tensorImageSize": "3D",
            "modality": MODALITY,
            "labels": LABELS,
            "numTraining": n_train,
            "numTest": n_test,
            **lists,
        }
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folders
