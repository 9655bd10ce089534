"""Load a site's data only through its Decathlon ``dataset.json``, with MONAI transforms.

The loader checks every file before training (readable NIfTI, finite voxels, image and label
on the same grid, binary label) so a bad scan fails with an error that names the file, instead
of a tensor-shape error deep inside a batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import CacheDataset, DataLoader, Dataset, load_decathlon_datalist
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    ResizeWithPadOrCropd,
    Spacingd,
)
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset as TorchDataset

from fedhealth.errors import DataError

SPLITS = {"train": "training", "test": "test"}


@dataclass
class SiteData:
    """A site's datalists, resolved to absolute paths and checked."""

    dataset_json: Path
    train: list[dict[str, str]]
    test: list[dict[str, str]]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over the bytes of every file the datalist names (stays on site)."""
        digest = hashlib.sha256()
        for item in self.train + self.test:
            for key in ("image", "label"):
                digest.update(Path(item[key]).read_bytes())
        return digest.hexdigest()


_VERIFIED: dict[str, tuple[tuple, SiteData]] = {}
_VOLUMES: dict[tuple, CacheDataset] = {}


def _signature(paths: list[str]) -> tuple:
    """(path, size, mtime) of every file: a changed or replaced file invalidates caches."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


def load_site(dataset_json: Path | str) -> SiteData:
    """:func:`read_datalist` with its file checks done once per process while no file changes
    (in simulation one ClientApp process answers many rounds for several sites).
    """
    path = Path(dataset_json)
    cached = _VERIFIED.get(str(path))
    if cached is not None and cached[0] == _site_signature(path, cached[1]):
        return cached[1]
    site = read_datalist(path)
    _VERIFIED[str(path)] = (_site_signature(path, site), site)
    return site


def _site_signature(path: Path, site: SiteData) -> tuple:
    return _signature(
        [str(path), *(i[k] for i in site.train + site.test for k in ("image", "label"))]
    )


def read_datalist(dataset_json: Path | str, check_files: bool = True) -> SiteData:
    """Read and check a site's ``dataset.json``; errors name the datalist or the file."""
    path = Path(dataset_json)
    if not path.is_file():
        raise DataError(f"{path}: dataset.json not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    lists = {}
    for split, key in SPLITS.items():
        try:
            items = (
                load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
                if not isinstance(raw, dict) or raw.get(key) != []
                else []
            )
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise DataError(f"{path}: missing or malformed '{key}' list ({exc})") from exc
        for i, item in enumerate(items):
            if not {"image", "label"} <= item.keys():
                raise DataError(f"{path}: entry {i} of '{key}' needs 'image' and 'label'")
        lists[split] = [
            {
                "image": str(it["image"]),
                "label": str(it["label"]),
                "patient": str(it.get("patient", f"{key}-{i}")),
            }
            for i, it in enumerate(items)
        ]
    if not lists["train"]:
        raise DataError(f"{path}: the 'training' list is empty")
    site = SiteData(path, lists["train"], lists["test"])
    if check_files:
        for item in site.train + site.test:
            check_pair(Path(item["image"]), Path(item["label"]))
    return site


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # forces a full read: truncated gzip fails here
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    return img


def check_pair(image_path: Path, label_path: Path) -> None:
    """Image and label must be readable, finite, on the same grid; the label binary."""
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


def transforms(roi: int, target_spacing: float, train: bool) -> Compose:
    """MONAI preprocessing: resample to a common spacing, z-score, pad/crop to ``roi``^3."""
    keys = ["image", "label"]
    steps = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Spacingd(keys=keys, pixdim=(target_spacing,) * 3, mode=("bilinear", "nearest")),
        NormalizeIntensityd(keys="image"),
        ResizeWithPadOrCropd(keys=keys, spatial_size=(roi,) * 3),
    ]
    if train:
        steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    steps.append(EnsureTyped(keys=keys, track_meta=False))
    return Compose(steps)


class PatientDataset(TorchDataset):
    """One record per patient, the privacy unit: item ``i`` is one of patient ``i``'s volumes.

    Each draw picks one of the patient's volumes at random, so however many scans a patient
    has, they enter a batch at most once and DP-SGD's per-record clipping bounds that
    patient's whole contribution. ``len`` is the number of patients.
    """

    def __init__(self, volumes: TorchDataset, patients: list[str], seed: int) -> None:
        self.volumes = volumes
        groups: dict[str, list[int]] = {}
        for index, patient in enumerate(patients):
            groups.setdefault(patient, []).append(index)
        self.groups = list(groups.values())
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        group = self.groups[index]
        choice = group[0] if len(group) == 1 else group[int(self.rng.integers(len(group)))]
        return self.volumes[choice]


def make_loader(
    items: list[dict[str, str]],
    roi: int,
    target_spacing: float,
    batch_size: int,
    train: bool,
    seed: int,
    cache: bool = True,
) -> TorchDataLoader:
    """A seeded DataLoader over ``items``; in training one record per patient and random flips."""
    import torch

    xform = transforms(roi, target_spacing, train)
    volumes = [{"image": it["image"], "label": it["label"]} for it in items]
    if cache:
        key = (
            _signature([v[k] for v in volumes for k in ("image", "label")]),
            roi,
            target_spacing,
            train,
        )
        if key not in _VOLUMES:
            if len(_VOLUMES) >= 64:
                _VOLUMES.clear()
            _VOLUMES[key] = CacheDataset(volumes, xform, progress=False, num_workers=0)
        dataset = _VOLUMES[key]
        xform = dataset.transform
    else:
        dataset = Dataset(volumes, xform)
    if train:
        xform.set_random_state(seed)
        dataset = PatientDataset(
            dataset, [it.get("patient", str(i)) for i, it in enumerate(items)], seed
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=0, generator=generator
    )
