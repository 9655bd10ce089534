"""Load a site's data only through its Decathlon ``dataset.json``, with MONAI transforms.

:func:`load_site` reads and checks the datalist once per process (:mod:`fedhealth.data.datalist`,
:mod:`fedhealth.data.checks`); :func:`make_loader` yields training patches, one per patient
per draw, or whole volumes for evaluation (:mod:`fedhealth.data.transforms`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data.dataloader import DataLoader
from monai.data.dataset import CacheDataset, Dataset
from monai.transforms.compose import Compose
from monai.transforms.utility.dictionary import EnsureTyped
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset as TorchDataset

from fedhealth.data.checks import check_item, require_patient_ids
from fedhealth.data.datalist import DatalistItem, SiteData, files_of, read_datalist
from fedhealth.data.transforms import preprocess, train_augment

__all__ = [
    "DatalistItem",
    "SiteData",
    "check_item",
    "load_site",
    "make_loader",
    "read_datalist",
    "require_patient_ids",
]

log = logging.getLogger("fedhealth.site")

Sample = dict[str, torch.Tensor]
"""One transformed record: ``"image"`` of shape (C, X, Y, Z) and ``"label"`` of (1, X, Y, Z)."""

FileSignature = tuple[tuple[str, int, int], ...]
"""(path, size in bytes, mtime in ns) per file; size and mtime are -1 for a missing file."""


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
    return _signature([str(path), *(p for item in site.items for p in files_of(item))])


class PatientDataset(TorchDataset[Sample]):
    """One record per patient, the privacy unit: item ``i`` is one patch of patient ``i``.

    Each draw picks one of the patient's volumes at random and one random patch of it (the
    volumes' transform yields exactly one), so however many scans a patient has, they enter a
    batch at most once and DP-SGD's per-record clipping bounds that patient's whole
    contribution. ``len`` is the number of patients.

    Parameters
    ----------
    volumes : Dataset
        One item per volume, in the order of ``patients``: a :data:`Sample`, or a list
        holding exactly one (MONAI's patch samplers return lists).
    patients : list of str
        The patient of each volume; patients are numbered in order of first appearance.
    seed : int
        Seeds the generator that picks among a patient's volumes.

    Raises
    ------
    ValueError
        At a draw, if the volume's transform yielded other than one patch.
    """

    def __init__(self, volumes: TorchDataset[Any], patients: list[str], seed: int) -> None:
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
        drawn = self.volumes[choice]
        if isinstance(drawn, list):
            if len(drawn) != 1:
                raise ValueError(f"patient {index}: {len(drawn)} patches in one draw, not 1")
            drawn = drawn[0]
        return drawn  # type: ignore[no-any-return]


def _paths(item: DatalistItem, labelled: bool) -> dict[str, str | list[str]]:
    out: dict[str, str | list[str]] = {"image": item["image"]}
    if labelled:
        out["label"] = item["label"]
    return out


def make_loader(
    items: Sequence[DatalistItem],
    patch_size: int,
    target_spacing: float,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    cache: bool = True,
) -> TorchDataLoader[Sample]:
    """Build a seeded DataLoader: training patches, one per patient, or whole volumes.

    With ``cache``, the deterministic part (:func:`~fedhealth.data.transforms.preprocess`) is
    computed once per process for each set of files (by path, size and mtime), patch size,
    spacing and ``train`` (a MONAI ``CacheDataset``; at most 64 are kept, then all are
    dropped).

    Parameters
    ----------
    items : sequence of DatalistItem
        Labelled volumes, e.g. :attr:`SiteData.train` or :attr:`SiteData.test`.
    patch_size : int
        Edge of the cubic training patch, in voxels (training only).
    target_spacing : float
        Voxel edge to resample to, in mm.
    batch_size : int
        Records per batch in training; evaluation batches hold one whole volume.
    train : bool
        Keyword-only. True: one random patch per patient per draw
        (:func:`~fedhealth.data.transforms.train_augment`, :class:`PatientDataset`),
        shuffled. False: every whole volume once, in order.
    seed : int
        Keyword-only. Seeds the patch centres, flips, the choice among a patient's volumes and
        the shuffle.
    cache : bool, default True
        Keyword-only. Cache the deterministic transforms' output in memory.

    Returns
    -------
    torch.utils.data.DataLoader
        A MONAI DataLoader (no worker processes). Training batches hold ``"image"`` (float32)
        of shape (B, C, p, p, p) and ``"label"`` (class values) of shape (B, 1, p, p, p),
        ``p = patch_size``; evaluation batches one volume, (1, C, X, Y, Z) and (1, 1, X, Y, Z),
        in RAS at ``target_spacing``.
    """
    pre = preprocess(target_spacing, pad_to=patch_size if train else 0)
    rest = (
        train_augment(patch_size)
        if train
        else Compose([EnsureTyped(keys=["image", "label"], track_meta=False)])
    )
    xform = Compose([*pre.transforms, *rest.transforms])
    volumes = [_paths(it, labelled=True) for it in items]
    dataset: TorchDataset[Any]
    if cache:
        key = (
            _signature([p for it in items for p in files_of(it)]),
            patch_size,
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
    if not train:
        return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    xform.set_random_state(seed)
    dataset = PatientDataset(dataset, [it["patient"] for it in items], seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator
    )
