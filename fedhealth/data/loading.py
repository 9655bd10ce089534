"""Load a site's data only through its Decathlon ``dataset.json``, with MONAI transforms.

The loader checks every file before training (readable NIfTI, finite voxels, image and label
on the same grid, binary label) so a bad scan fails with an error that names the file, instead
of a tensor-shape error deep inside a batch.

The datalist format is the Medical Segmentation Decathlon's (Antonelli et al. 2022,
https://doi.org/10.1038/s41467-022-30695-9), read by MONAI's ``load_decathlon_datalist``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from monai.data.dataloader import DataLoader
from monai.data.dataset import CacheDataset, Dataset
from monai.data.decathlon_datalist import load_decathlon_datalist
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import ResizeWithPadOrCropd
from monai.transforms.intensity.dictionary import NormalizeIntensityd
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import RandFlipd, Spacingd
from monai.transforms.utility.dictionary import EnsureChannelFirstd, EnsureTyped
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset as TorchDataset

from fedhealth.data.checks import check_pair, require_patient_ids
from fedhealth.errors import DataError

__all__ = ["check_pair", "load_site", "make_loader", "read_datalist", "require_patient_ids"]

log = logging.getLogger("fedhealth.site")

SPLITS = {"train": "training", "test": "test"}
"""Our split name -> the Decathlon datalist key that holds it."""

Sample = dict[str, torch.Tensor]
"""One transformed volume: ``"image"`` and ``"label"``, each of shape (1, roi, roi, roi)."""

FileSignature = tuple[tuple[str, int, int], ...]
"""(path, size in bytes, mtime in ns) per file; size and mtime are -1 for a missing file."""


class DatalistItem(TypedDict):
    """One volume of a site's datalist, its paths absolute.

    Attributes
    ----------
    image : str
        Path of the image NIfTI file.
    label : str
        Path of the binary label NIfTI file, on the image's voxel grid.
    patient : str
        The patient the volume belongs to; ``"<list key>-<index>"`` when the datalist names
        none (then each scan is its own record: :attr:`SiteData.unidentified`).
    """

    image: str
    label: str
    patient: str


@dataclass
class SiteData:
    """A site's datalists, resolved to absolute paths and checked.

    Parameters
    ----------
    dataset_json : Path
        The site's ``dataset.json``.
    train : list of DatalistItem
        The ``training`` list: never empty.
    test : list of DatalistItem
        The ``test`` list; may be empty.
    unidentified : tuple of int, default ()
        Indices of ``training`` entries without a ``patient`` id.
    shared : tuple of str, default ()
        Patient ids (as the datalist names them) found in both lists, sorted: their test
        scores are not scores on unseen patients.
    """

    dataset_json: Path
    train: list[DatalistItem]
    test: list[DatalistItem]
    unidentified: tuple[int, ...] = ()
    shared: tuple[str, ...] = ()

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hex sha256 over the bytes of every file the datalist names (stays on site).

        Files are hashed in datalist order (training, then test), image before label;
        computed once per object.
        """
        digest = hashlib.sha256()
        for item in self.train + self.test:
            for path in (item["image"], item["label"]):
                digest.update(Path(path).read_bytes())
        return digest.hexdigest()


_VERIFIED: dict[str, tuple[FileSignature, SiteData]] = {}
_VOLUMES: dict[tuple[FileSignature, int, float, bool], CacheDataset] = {}


def _signature(paths: list[str]) -> FileSignature:
    """Return (path, size, mtime) of every file: a changed or replaced file invalidates caches."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


def load_site(dataset_json: Path | str) -> SiteData:
    """Read a site through :func:`read_datalist`, checking its files once per process.

    The checked :class:`SiteData` is kept for as long as neither ``dataset.json`` nor any file
    it names changes (size or mtime): in simulation one ClientApp process answers many rounds
    for several sites.

    Parameters
    ----------
    dataset_json : Path or str
        The site's ``dataset.json``.

    Returns
    -------
    SiteData
        The site's datalists, every file checked by :func:`check_pair`.

    Raises
    ------
    DataError
        As :func:`read_datalist`.
    """
    path = Path(dataset_json)
    cached = _VERIFIED.get(str(path))
    if cached is not None and cached[0] == _site_signature(path, cached[1]):
        return cached[1]
    site = read_datalist(path)
    _VERIFIED[str(path)] = (_site_signature(path, site), site)
    return site


def _site_signature(path: Path, site: SiteData) -> FileSignature:
    return _signature(
        [str(path), *(p for i in site.train + site.test for p in (i["image"], i["label"]))]
    )


def read_datalist(dataset_json: Path | str, *, check_files: bool = True) -> SiteData:
    """Read and check a site's ``dataset.json``; errors name the datalist or the file.

    Relative paths in the datalist are resolved against the directory of ``dataset.json``.

    Parameters
    ----------
    dataset_json : Path or str
        The site's Decathlon-style datalist, with a ``training`` and optionally a ``test``
        list of ``{"image", "label"[, "patient"]}`` entries.
    check_files : bool, default True
        Open every image and label with :func:`check_pair`.

    Returns
    -------
    SiteData
        Both lists with absolute paths; an entry without ``patient`` gets
        ``"<list key>-<index>"``. A patient in both lists is logged as a warning naming the
        ids (site log only) and listed in :attr:`SiteData.shared`.

    Raises
    ------
    DataError
        If the file is missing or not JSON, a list is malformed, an entry lacks ``image`` or
        ``label``, the training list is empty, or (with ``check_files``) a file fails
        :func:`check_pair`.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise DataError(f"{path}: dataset.json not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    lists: dict[str, list[DatalistItem]] = {}
    declared: dict[str, list[str | None]] = {}
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
        declared[split] = [None if "patient" not in it else str(it["patient"]) for it in items]
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
    unidentified = tuple(i for i, p in enumerate(declared["train"]) if p is None)
    shared = tuple(sorted({p for p in declared["train"] if p} & set(declared["test"]) - {None}))
    if shared:
        log.warning(
            "%s: %d patient(s) in both the training and the test list: %s (their test scores "
            "are not on unseen patients)",
            path,
            len(shared),
            ", ".join(shared),
        )
    site = SiteData(path, lists["train"], lists["test"], unidentified, shared)
    if check_files:
        for volume in site.train + site.test:
            check_pair(Path(volume["image"]), Path(volume["label"]))
    return site


def transforms(roi: int, target_spacing: float, *, train: bool) -> Compose:
    """Build the MONAI preprocessing for ``{"image", "label"}`` path dicts.

    Load, channel first, resample to isotropic ``target_spacing`` (bilinear image, nearest
    label), z-score the image, pad or crop to ``roi``^3; in training, then flip each spatial
    axis with probability 0.5. Output tensors carry no MONAI metadata.

    Parameters
    ----------
    roi : int
        Edge of the output cube, in voxels.
    target_spacing : float
        Voxel edge to resample to, in mm.
    train : bool
        Add the random flips (keyword-only).

    Returns
    -------
    Compose
        Maps a path dict to a :data:`Sample` of (1, roi, roi, roi) tensors.
    """
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


class PatientDataset(TorchDataset[Sample]):
    """One record per patient, the privacy unit: item ``i`` is one of patient ``i``'s volumes.

    Each draw picks one of the patient's volumes at random, so however many scans a patient
    has, they enter a batch at most once and DP-SGD's per-record clipping bounds that
    patient's whole contribution. ``len`` is the number of patients.

    Parameters
    ----------
    volumes : Dataset of Sample
        One item per volume, in the order of ``patients``.
    patients : list of str
        The patient of each volume; patients are numbered in order of first appearance.
    seed : int
        Seeds the generator that picks among a patient's volumes.
    """

    def __init__(self, volumes: TorchDataset[Sample], patients: list[str], seed: int) -> None:
        self.volumes = volumes
        groups: dict[str, list[int]] = {}
        for index, patient in enumerate(patients):
            groups.setdefault(patient, []).append(index)
        self.groups = list(groups.values())
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Sample:
        group = self.groups[index]
        choice = group[0] if len(group) == 1 else group[int(self.rng.integers(len(group)))]
        return self.volumes[choice]


def make_loader(
    items: Sequence[DatalistItem],
    roi: int,
    target_spacing: float,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    cache: bool = True,
) -> TorchDataLoader[Sample]:
    """Build a seeded DataLoader over ``items``; in training, one record per patient.

    With ``cache``, the deterministic part of :func:`transforms` is computed once per process
    for each set of files (by path, size and mtime), ``roi``, ``target_spacing`` and ``train``
    (a MONAI ``CacheDataset``; at most 64 are kept, then all are dropped).

    Parameters
    ----------
    items : sequence of DatalistItem
        Volumes to load, e.g. :attr:`SiteData.train`.
    roi : int
        Edge of the cubic patch, in voxels.
    target_spacing : float
        Voxel edge to resample to, in mm.
    batch_size : int
        Records per batch.
    train : bool
        Keyword-only. True: random flips, one record per patient (:class:`PatientDataset`),
        shuffled. False: every volume once, in order.
    seed : int
        Keyword-only. Seeds the flips, the choice among a patient's volumes and the shuffle.
    cache : bool, default True
        Keyword-only. Cache the deterministic transforms' output in memory.

    Returns
    -------
    torch.utils.data.DataLoader
        A MONAI DataLoader (no worker processes) whose batches hold ``"image"`` (float32) and
        ``"label"`` (0/1 values), each of shape (B, 1, roi, roi, roi).
    """
    xform = transforms(roi, target_spacing, train=train)
    volumes = [{"image": it["image"], "label": it["label"]} for it in items]
    dataset: TorchDataset[Sample]
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
        cached = _VOLUMES[key]
        xform = cached.transform
        dataset = cached
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
