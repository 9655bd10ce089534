"""``fedhealth predict``: a run's global model segments a hospital's scans, in their own grid.

Each scan goes through the run's preprocessing (:func:`fedhealth.data.transforms.preprocess`:
RAS, resampled, z-scored), is segmented by sliding-window inference
(:func:`fedhealth.training.inference.infer`), and the class map is mapped back to the scan's own
voxel grid and orientation by MONAI's ``Invertd`` (nearest neighbour) and written by
``SaveImaged`` as ``<scan>_seg.nii.gz`` (uint8 class values, the scan's affine). The model
comes from a run directory (its last checkpoint, sha256 verified against the manifest) or from
one checkpoint file inside a run's ``checkpoints/``; only safetensors are read.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data.meta_tensor import MetaTensor
from monai.transforms.io.dictionary import SaveImaged
from monai.transforms.post.dictionary import Invertd
from torch import nn

from fedhealth.config import Config, validate
from fedhealth.data.checks import check_item
from fedhealth.data.datalist import DatalistItem, files_of, read_datalist
from fedhealth.data.transforms import preprocess
from fedhealth.errors import CheckpointError, DataError
from fedhealth.models import build_model
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.training.device import resolve_device
from fedhealth.training.inference import infer

__all__ = ["GlobalModel", "load_global_model", "predict", "scans_of"]

log = logging.getLogger("fedhealth.predict")

_ROUND = re.compile(r"^round-(\d{4})\.safetensors$")


@dataclass
class GlobalModel:
    """A run's global model, ready to segment.

    Parameters
    ----------
    model : torch.nn.Module
        The network in eval mode, weights loaded.
    cfg : Config
        The run's configuration (model, patch size, spacing).
    run_dir : Path
        The run directory it came from.
    server_round : int
        The round whose global model this is.
    """

    model: nn.Module
    cfg: Config
    run_dir: Path
    server_round: int


def load_global_model(path: Path | str) -> GlobalModel:
    """Load a run's global model from its run directory or one of its checkpoint files.

    Parameters
    ----------
    path : Path or str
        A run directory (its last round's checkpoint is taken) or a
        ``<run dir>/checkpoints/round-NNNN.safetensors`` file.

    Returns
    -------
    GlobalModel
        The model with the run's config.

    Raises
    ------
    CheckpointError
        No run directory (``config.yaml``) around ``path``, no checkpoint, or a checkpoint
        whose sha256 does not match the one recorded.
    ConfigError
        The run's ``config.yaml`` does not validate.
    """
    path = Path(path).resolve()
    wanted: int | None = None
    if path.is_file():
        match = _ROUND.match(path.name)
        if not match or path.parent.name != "checkpoints":
            raise CheckpointError(
                f"{path}: give a run directory or its checkpoints/round-NNNN.safetensors"
            )
        wanted, path = int(match.group(1)), path.parent.parent
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path}: not a run directory (no config.yaml)")
    cfg = validate(yaml.safe_load((path / "config.yaml").read_text()))
    store = CheckpointStore(path / "checkpoints")
    server_round = wanted if wanted is not None else store.latest()
    if server_round is None:
        raise CheckpointError(f"{path}: the run has no checkpoint yet")
    arrays = store.load(server_round)  # verifies the sha256 recorded beside it
    model = build_model(cfg.model)
    state = {k: torch.from_numpy(np.array(arrays[k])) for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return GlobalModel(model, cfg, path, server_round)


def scans_of(data: Path | str) -> list[DatalistItem]:
    """List the scans to segment: a datalist's test list (else training), or a folder's NIfTI.

    A ``dataset.json``'s ``test`` entries, labelled or image-only (its ``training`` list when it
    has none), or every ``.nii``/``.nii.gz`` file of a folder without a ``dataset.json``.

    Parameters
    ----------
    data : Path or str
        A Decathlon ``dataset.json`` or a folder of single-channel NIfTI scans.

    Returns
    -------
    list of DatalistItem
        The scans, image paths absolute (labels, if any, are ignored).

    Raises
    ------
    DataError
        Nothing to segment, or the datalist does not read.
    """
    data = Path(data)
    if data.is_dir() and not (data / "dataset.json").is_file():
        files = sorted(p for p in data.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        items: list[DatalistItem] = [{"image": str(p.resolve()), "patient": p.name} for p in files]
    else:
        site = read_datalist(data / "dataset.json" if data.is_dir() else data, check_files=False)
        items = [
            {"image": it["image"], "patient": it["patient"]} for it in site.test + site.unlabelled
        ]
        items = items or [{"image": it["image"], "patient": it["patient"]} for it in site.train]
    if not items:
        raise DataError(f"{data}: no scan to segment")
    return items


def _stem(item: DatalistItem) -> str:
    first = Path(files_of(item)[0]).name
    return re.sub(r"\.nii(\.gz)?$", "", first)


def _relative_dir(item: DatalistItem, base: Path) -> Path:
    """Return the scan's folder relative to the datalist's (two patients' scans share names)."""
    folder = Path(files_of(item)[0]).resolve().parent
    return folder.relative_to(base.resolve()) if _inside(folder, base.resolve()) else Path()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def predict(
    model_path: Path | str,
    data: Path | str,
    out: Path | str,
    *,
    copy_card: bool = True,
    device: str = "auto",
) -> list[Path]:
    """Segment every scan of ``data`` with a run's global model; write NIfTI class maps.

    Parameters
    ----------
    model_path : Path or str
        As :func:`load_global_model`.
    data : Path or str
        As :func:`scans_of`.
    out : Path or str
        Folder to write ``<scan>_seg.nii.gz`` files into (created); when two scans share a file
        name, each goes into the sub-folder its scan has under the datalist's folder. ``out``
        must lie outside every folder holding the scans, and hold none of the files to write.
    copy_card : bool, default True
        Keyword-only. Also write the model card of the checkpoint used into ``out``
        (:func:`fedhealth.reports.model_card.model_card`); a card of another model there is an
        error.
    device : str, default "auto"
        Keyword-only. Where the network runs (:func:`~fedhealth.training.device.resolve_device`);
        volumes and outputs stay in host memory.

    Returns
    -------
    list of Path
        The segmentations written, one per scan, in the scan's own grid and orientation
        (shape and affine of the scan's first file), uint8 class values as the run's labels.

    Raises
    ------
    DataError
        ``out`` lies inside a scan's folder or would overwrite a file, or a scan fails its
        checks (naming the file).
    CheckpointError
        As :func:`load_global_model`.
    """
    from fedhealth.reports.model_card import MODEL_CARD, model_card

    loaded = load_global_model(model_path)
    cfg = loaded.cfg
    items = scans_of(data)
    out = Path(out).resolve()
    data_path = Path(data).resolve()
    folders = {data_path if data_path.is_dir() else data_path.parent}
    folders |= {Path(f).resolve().parent for item in items for f in files_of(item)}
    for folder in sorted(folders):
        if _inside(out, folder):
            raise DataError(
                f"--out {out}: inside the data folder {folder}; fedhealth never writes into a "
                "hospital's data folder"
            )
    base = data_path if data_path.is_dir() else data_path.parent
    stems = [_stem(it) for it in items]
    unique = len(set(stems)) == len(stems)  # else keep the scans' folders apart
    targets = [
        out / (Path() if unique else _relative_dir(it, base)) / f"{stem}_seg.nii.gz"
        for it, stem in zip(items, stems, strict=True)
    ]
    existing = [t for t in targets if t.exists()]
    if existing:
        raise DataError(f"{existing[0]}: exists; fedhealth does not write over a file")
    card = json.dumps(model_card(loaded.run_dir, loaded.server_round), indent=2) + "\n"
    if copy_card and (out / MODEL_CARD).is_file() and (out / MODEL_CARD).read_text() != card:
        raise DataError(
            f"{out / MODEL_CARD}: describes another model; write these segmentations elsewhere"
        )
    out.mkdir(parents=True, exist_ok=True)
    pre = preprocess(cfg.data.target_spacing, keys=("image",))
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)
    on = resolve_device(device, "predict --device")
    loaded.model.to(on)
    written = []
    for item, target in zip(items, targets, strict=True):
        check_item(item, {}, cfg.model.in_channels)
        sample: dict[str, Any] = pre({"image": item["image"]})
        image = sample["image"]
        with torch.no_grad():
            logits = infer(
                loaded.model,
                image.as_tensor()[None],
                cfg.data.patch_size,
                sw_batch_size=cfg.data.sw_batch_size,
                overlap=cfg.data.sw_overlap,
                device=on,
            )
        classes = logits.argmax(dim=1).to(torch.float32)
        sample["pred"] = MetaTensor(
            classes, meta=dict(image.meta), applied_operations=list(image.applied_operations)
        )
        sample["pred"].meta["filename_or_obj"] = str(target).replace("_seg.nii.gz", ".nii.gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        save = SaveImaged(
            keys="pred",
            output_dir=str(target.parent),
            output_postfix="seg",
            output_ext=".nii.gz",
            separate_folder=False,
            resample=False,
            output_dtype=np.uint8,
            print_log=False,
        )
        save(invert(dict(sample)))  # type: ignore[arg-type]  # str keys are Hashable
        written.append(target)
        log.info("%s -> %s", files_of(item)[0], target)
    if copy_card:
        (out / MODEL_CARD).write_text(card)
    return written
