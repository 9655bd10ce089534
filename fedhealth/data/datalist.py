"""Read a site's Decathlon ``dataset.json``: its lists, labels and sequences, paths resolved.

The datalist format is the Medical Segmentation Decathlon's (Antonelli et al. 2022,
https://doi.org/10.1038/s41467-022-30695-9), read by MONAI's ``load_decathlon_datalist``:
``training`` entries ``{"image", "label"[, "patient"]}``, a ``test`` list of image paths or of
entries (with a ``label``, a test case is scored; without, it is only predicted), ``labels``
(voxel value -> class name) and ``modality`` (channel index -> sequence name). An ``image`` is
one file (3-D, or 4-D with the sequences last, as the Decathlon's brain-tumour task stores
T1, T1c, T2, FLAIR) or a list of files, one per sequence in ``modality`` order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from monai.data.decathlon_datalist import load_decathlon_datalist

from fedhealth.errors import DataError

__all__ = ["DatalistItem", "SiteData", "files_of", "read_datalist"]

log = logging.getLogger("fedhealth.site")

SPLITS = {"train": "training", "test": "test"}
"""Our split name -> the Decathlon datalist key that holds it."""

DEFAULT_LABELS = {0: "background", 1: "foreground"}
"""The classes of a datalist that declares no ``labels``."""
DEFAULT_MODALITY = {0: "image"}
"""The channels of a datalist that declares no ``modality``."""


class DatalistItem(TypedDict):
    """One volume of a site's datalist, its paths absolute.

    Attributes
    ----------
    image : str or list of str
        The image file (3-D, or 4-D with the channels last), or one 3-D file per channel.
    label : str, optional
        The label file, on the image's voxel grid; absent for an image-only test case.
    patient : str
        The patient the volume belongs to; ``"<list key>-<index>"`` when the datalist names
        none (then each scan is its own record: :attr:`SiteData.unidentified`).
    """

    image: str | list[str]
    label: NotRequired[str]
    patient: str


def files_of(item: DatalistItem) -> list[str]:
    """Return every file an item names: its image file(s), then its label if any.

    Parameters
    ----------
    item : DatalistItem
        One volume.

    Returns
    -------
    list of str
        Absolute paths.
    """
    image = item["image"]
    out = [image] if isinstance(image, str) else list(image)
    return out + ([item["label"]] if "label" in item else [])


@dataclass
class SiteData:
    """A site's datalists, resolved to absolute paths and checked.

    Parameters
    ----------
    dataset_json : Path
        The site's ``dataset.json``.
    train : list of DatalistItem
        The ``training`` list, every entry labelled: never empty.
    test : list of DatalistItem
        The labelled ``test`` entries (scored at evaluation); may be empty.
    unlabelled : list of DatalistItem, default []
        The image-only ``test`` entries (predicted, never scored).
    labels : dict of int to str, default {0: "background", 1: "foreground"}
        Voxel value -> class name, as the datalist declares them (0 is the background).
    modality : dict of int to str, default {0: "image"}
        Channel index -> sequence name, as the datalist declares them.
    name : str, default ""
        The datalist's ``name`` (may be shared by sites of one task).
    unidentified : tuple of int, default ()
        Indices of ``training`` entries without a ``patient`` id.
    shared : tuple of str, default ()
        Patient ids (as the datalist names them) found in both lists, sorted: their test
        scores are not scores on unseen patients.
    """

    dataset_json: Path
    train: list[DatalistItem]
    test: list[DatalistItem]
    unlabelled: list[DatalistItem] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    modality: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_MODALITY))
    name: str = ""
    unidentified: tuple[int, ...] = ()
    shared: tuple[str, ...] = ()

    @property
    def items(self) -> list[DatalistItem]:
        """Every entry: training, labelled test, image-only test."""
        return self.train + self.test + self.unlabelled

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hex sha256 over the bytes of every file the datalist names (stays on site).

        Files are hashed in :attr:`items` order, image(s) before label; computed once per
        object.
        """
        digest = hashlib.sha256()
        for item in self.items:
            for path in files_of(item):
                digest.update(Path(path).read_bytes())
        return digest.hexdigest()


def _index_map(
    raw: dict[str, Any], key: str, default: dict[int, str], path: Path
) -> dict[int, str]:
    value = raw.get(key)
    if value is None:
        return dict(default)
    try:
        out = {int(k): str(v) for k, v in dict(value).items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: '{key}' must map integers to names, got {value!r}") from exc
    if sorted(out) != list(range(len(out))) or not out:
        raise DataError(f"{path}: '{key}' must be numbered 0..N-1, got {sorted(out)}")
    if key == "labels" and len(out) < 2:
        raise DataError(f"{path}: 'labels' needs the background 0 and at least one class")
    return out


def _entries(path: Path, raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    if raw.get(key) in ([], None) and key == "test":
        return []
    try:
        items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise DataError(f"{path}: missing or malformed '{key}' list ({exc})") from exc
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"{path}: entry {i} of '{key}' needs an 'image'")
        if key == "training" and "label" not in item:
            raise DataError(f"{path}: entry {i} of '{key}' needs a 'label'")
    return list(items)


def _item(it: dict[str, Any], key: str, i: int) -> DatalistItem:
    image = it["image"]
    out: DatalistItem = {
        "image": [str(p) for p in image] if isinstance(image, list) else str(image),
        "patient": str(it.get("patient", f"{key}-{i}")),
    }
    if "label" in it:
        out["label"] = str(it["label"])
    return out


def read_datalist(dataset_json: Path | str, *, check_files: bool = True) -> SiteData:
    """Read and check a site's ``dataset.json``; errors name the datalist or the file.

    Relative paths in the datalist are resolved against the directory of ``dataset.json``.

    Parameters
    ----------
    dataset_json : Path or str
        The site's Decathlon datalist (see the module docstring).
    check_files : bool, default True
        Open every file with :func:`fedhealth.data.checks.check_item` against the declared
        ``labels`` and ``modality``.

    Returns
    -------
    SiteData
        The lists with absolute paths; an entry without ``patient`` gets
        ``"<list key>-<index>"``. A patient in both lists is logged as a warning naming the
        ids (site log only) and listed in :attr:`SiteData.shared`.

    Raises
    ------
    DataError
        If the file is missing or not JSON, a list is malformed, a training entry lacks
        ``image`` or ``label``, the training list is empty, ``labels`` or ``modality`` is not
        numbered 0..N-1, or (with ``check_files``) a file fails its check.
    """
    from fedhealth.data.checks import check_item

    path = Path(dataset_json)
    if not path.is_file():
        raise DataError(f"{path}: dataset.json not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a Decathlon dataset.json is a JSON object")
    entries = {split: _entries(path, raw, key) for split, key in SPLITS.items()}
    for split, found in entries.items():  # MONAI resolves any value naming a path under
        for it, declared_it in zip(found, raw.get(SPLITS[split]) or [], strict=False):
            if isinstance(declared_it, dict) and "patient" in declared_it:
                it["patient"] = declared_it["patient"]  # the folder: keep the id as written
    lists = {
        split: [_item(it, SPLITS[split], i) for i, it in enumerate(found)]
        for split, found in entries.items()
    }
    if not lists["train"]:
        raise DataError(f"{path}: the 'training' list is empty")
    declared = {
        split: [str(it["patient"]) if "patient" in it else None for it in found]
        for split, found in entries.items()
    }
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
    site = SiteData(
        path,
        lists["train"],
        [it for it in lists["test"] if "label" in it],
        [it for it in lists["test"] if "label" not in it],
        _index_map(raw, "labels", DEFAULT_LABELS, path),
        _index_map(raw, "modality", DEFAULT_MODALITY, path),
        str(raw.get("name", "")),
        unidentified,
        shared,
    )
    if check_files:
        for item in site.items:
            check_item(item, site.labels, len(site.modality))
    return site
