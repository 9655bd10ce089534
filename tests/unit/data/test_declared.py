"""Labels and sequences as a site's Decathlon ``dataset.json`` declares them.

Each test writes its own small NIfTI site with nibabel: multi-class labels, masks stored with a
header scale factor, 4-D multi-sequence images, one file per sequence, image-only test lists,
and a label off its image's grid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedhealth.config import compose
from fedhealth.data.datalist import read_datalist
from fedhealth.data.loading import PatientDataset, make_loader
from fedhealth.data.sites import check_declared
from fedhealth.errors import DataError
from fedhealth.training.loop import evaluate

N = 20  # voxels per edge of every test volume (1 mm isotropic)
P = 16  # training patch edge


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path.relative_to(path.parent.parent))


def _label(classes: int = 2, n: int = N) -> np.ndarray:
    """Class ``k`` fills one cube per foreground class, the rest is background."""
    out = np.zeros((n, n, n), np.uint8)
    for k in range(1, classes):
        lo = 2 + 6 * (k - 1)
        out[lo : lo + 5, 4:12, 4:12] = k
    return out


def _image(label: np.ndarray, channels: int = 0, seed: int = 0) -> np.ndarray:
    """A noisy image brighter where the label is; ``channels`` > 0 adds a last channel axis."""
    rng = np.random.default_rng(seed)
    base = 100.0 + 50.0 * label + rng.normal(0, 5, label.shape)
    if not channels:
        return base.astype(np.float32)
    return np.stack([base * (c + 1) for c in range(channels)], axis=-1).astype(np.float32)


def _datalist(
    site: Path,
    training: list[dict],
    *,
    test: list | None = None,
    labels: dict[str, str] | None = None,
    modality: dict[str, str] | None = None,
) -> Path:
    raw: dict = {"name": "declared", "training": training, "test": test or []}
    if labels is not None:
        raw["labels"] = labels
    if modality is not None:
        raw["modality"] = modality
    path = site / "dataset.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def _entry(
    site: Path, i: int, image: np.ndarray, label: np.ndarray, label_affine: np.ndarray | None = None
) -> dict:
    return {
        "image": _save(site / "imagesTr" / f"case{i}.nii.gz", image),
        "label": _save(site / "labelsTr" / f"case{i}.nii.gz", label, label_affine),
        "patient": f"p{i}",
    }


THREE = {"0": "background", "1": "edema", "2": "tumour"}


def test_a_three_class_label_is_accepted_when_labels_declares_three(tmp_path):
    lab = _label(3)
    path = _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab)], labels=THREE)
    data = read_datalist(path)
    assert data.labels == {0: "background", 1: "edema", 2: "tumour"}
    batch = next(iter(make_loader(data.train, P, 1.0, 1, train=False, seed=0, cache=False)))
    assert set(batch["label"].unique().tolist()) == {0.0, 1.0, 2.0}


def test_a_label_value_outside_the_declared_labels_is_refused_naming_file_and_labels(tmp_path):
    lab = _label(3)
    lab[0, 0, 0] = 3
    path = _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab)], labels=THREE)
    label_file = tmp_path / "labelsTr" / "case0.nii.gz"
    with pytest.raises(DataError) as err:
        read_datalist(path)
    msg = str(err.value)
    assert str(label_file) in msg
    assert "[3.0]" in msg and "[0, 1, 2]" in msg, msg


def test_a_two_class_datalist_refuses_a_value_two(tmp_path):
    lab = _label(3)  # 0/1/2 but the datalist declares no labels: background and foreground
    path = _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab)])
    with pytest.raises(DataError, match=r"case0\.nii\.gz.*\[2\.0\].*\[0, 1\]"):
        read_datalist(path)


def _scaled_mask(path: Path, raw_one: int, slope: float) -> np.ndarray:
    """A 0/1 mask stored as int16 0/``raw_one`` with header slope ``slope``."""
    mask = _label(2)
    img = nib.Nifti1Image((mask * raw_one).astype(np.int16), np.eye(4))
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    stored = nib.load(str(path))
    assert np.asarray(stored.dataobj.get_unscaled()).max() == raw_one, "raw values kept"
    assert stored.dataobj.slope == pytest.approx(slope), "the header's scale factor kept"
    return mask


@pytest.mark.parametrize(("raw_one", "slope"), [(100, 0.01), (101, 0.0099)])
def test_a_mask_stored_with_a_header_scale_factor_loads_as_exact_classes(tmp_path, raw_one, slope):
    label_file = tmp_path / "labelsTr" / "case0.nii.gz"
    mask = _scaled_mask(label_file, raw_one, slope)
    scaled = np.unique(nib.load(str(label_file)).get_fdata())
    assert scaled.max() == pytest.approx(1.0, abs=1e-3)
    image = _save(tmp_path / "imagesTr" / "case0.nii.gz", _image(mask))
    entry = {"image": image, "label": "labelsTr/case0.nii.gz", "patient": "p0"}
    data = read_datalist(_datalist(tmp_path, [entry]))
    whole = next(iter(make_loader(data.train, P, 1.0, 1, train=False, seed=0, cache=False)))
    assert set(whole["label"].unique().tolist()) == {0.0, 1.0}, "exact 0/1 classes"
    assert int((whole["label"] == 1).sum()) == int(mask.sum())
    patch = next(iter(make_loader(data.train, P, 1.0, 1, train=True, seed=0, cache=False)))
    assert set(patch["label"].unique().tolist()) <= {0.0, 1.0}


MRI3 = {"0": "T1", "1": "T2", "2": "FLAIR"}


def test_a_4d_image_with_three_sequences_gives_three_channels(tmp_path):
    entries = []
    for i in range(2):
        lab = _label(2)
        entries.append(_entry(tmp_path, i, _image(lab, channels=3, seed=i), lab))
    data = read_datalist(_datalist(tmp_path, entries, modality=MRI3))
    assert data.modality == {0: "T1", 1: "T2", 2: "FLAIR"}
    batch = next(iter(make_loader(data.train, P, 1.0, 2, train=True, seed=0, cache=False)))
    assert batch["image"].shape == (2, 3, P, P, P)
    assert batch["label"].shape == (2, 1, P, P, P)
    whole = next(iter(make_loader(data.train, P, 1.0, 1, train=False, seed=0, cache=False)))
    assert whole["image"].shape == (1, 3, N, N, N)


def test_a_4d_image_refused_when_modality_declares_one_sequence(tmp_path):
    lab = _label(2)
    entry = _entry(tmp_path, 0, _image(lab, channels=3), lab)
    path = _datalist(tmp_path, [entry], modality={"0": "T1"})
    with pytest.raises(DataError) as err:
        read_datalist(path)
    msg = str(err.value)
    assert str(tmp_path / "imagesTr" / "case0.nii.gz") in msg and "channel" in msg, msg
    assert "3" in msg and "1" in msg


def test_a_3d_image_refused_when_modality_declares_three(tmp_path):
    lab = _label(2)
    path = _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab)], modality=MRI3)
    with pytest.raises(DataError, match=r"case0\.nii\.gz: 1 channel.*declares 3"):
        read_datalist(path)


def test_one_file_per_sequence_loads_as_two_channels(tmp_path):
    entries = []
    for i in range(2):
        lab = _label(2)
        seqs = [
            _save(tmp_path / "imagesTr" / f"case{i}_{s}.nii.gz", _image(lab, seed=10 * i + k))
            for k, s in enumerate(("t1", "t2"))
        ]
        label = _save(tmp_path / "labelsTr" / f"case{i}.nii.gz", lab)
        entries.append({"image": seqs, "label": label, "patient": f"p{i}"})
    data = read_datalist(_datalist(tmp_path, entries, modality={"0": "T1", "1": "T2"}))
    assert isinstance(data.train[0]["image"], list) and len(data.train[0]["image"]) == 2
    batch = next(iter(make_loader(data.train, P, 1.0, 2, train=True, seed=0, cache=False)))
    assert batch["image"].shape == (2, 2, P, P, P)
    whole = next(iter(make_loader(data.train, P, 1.0, 1, train=False, seed=0, cache=False)))
    assert whole["image"].shape == (1, 2, N, N, N)
    # each channel is z-scored on its own
    for c in range(2):
        assert abs(float(whole["image"][0, c].mean())) < 1e-3
    # with one sequence declared, two files are two channels too many
    path = _datalist(tmp_path, entries, modality={"0": "T1"})
    with pytest.raises(DataError, match="2 channel"):
        read_datalist(path)


def test_a_4d_image_with_one_channel_is_one_channel(tmp_path):
    lab = _label(2)
    path = _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab, channels=1), lab)])
    data = read_datalist(path)
    whole = next(iter(make_loader(data.train, P, 1.0, 1, train=False, seed=0, cache=False)))
    assert whole["image"].shape == (1, 1, N, N, N)
    batch = next(iter(make_loader(data.train, P, 1.0, 1, train=True, seed=0, cache=False)))
    assert batch["image"].shape == (1, 1, P, P, P)


def test_a_label_shifted_two_mm_is_refused_with_the_distance(tmp_path):
    lab = _label(2)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    entry = _entry(tmp_path, 0, _image(lab), lab, label_affine=shifted)
    with pytest.raises(DataError) as err:
        read_datalist(_datalist(tmp_path, [entry]))
    msg = str(err.value)
    assert str(tmp_path / "labelsTr" / "case0.nii.gz") in msg and "2.000 mm" in msg, msg


def test_a_label_within_the_affine_tolerance_is_accepted(tmp_path):
    lab = _label(2)
    nudged = np.eye(4)
    nudged[0, 3] = 1e-4  # float noise of a header written by another tool
    read_datalist(_datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab, label_affine=nudged)]))


def test_an_image_only_test_list_of_paths_is_accepted(tmp_path):
    lab = _label(2)
    entry = _entry(tmp_path, 0, _image(lab), lab)
    tests = [_save(tmp_path / "imagesTs" / f"t{i}.nii.gz", _image(lab, seed=i)) for i in range(2)]
    data = read_datalist(_datalist(tmp_path, [entry], test=tests))
    assert data.test == []
    assert [it["image"] for it in data.unlabelled] == [
        str(tmp_path / "imagesTs" / f"t{i}.nii.gz") for i in range(2)
    ]
    assert all("label" not in it for it in data.unlabelled)
    assert len(data.items) == 3


def test_check_declared_refuses_other_counts_than_the_model(tmp_path):
    lab = _label(3)
    path = _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab)], labels=THREE)
    data = read_datalist(path, check_files=False)
    cfg = compose([])
    assert (cfg.model.in_channels, cfg.model.out_channels) == (1, 2)
    with pytest.raises(DataError) as err:
        check_declared(data, cfg, "site-x")
    msg = str(err.value)
    assert "site-x" in msg and str(path) in msg and "labels" in msg, msg
    assert "model.out_channels=2" in msg
    check_declared(data, compose(["model.out_channels=3"]), "site-x")

    data = read_datalist(
        _datalist(tmp_path, [_entry(tmp_path, 0, _image(lab), lab)], modality=MRI3),
        check_files=False,
    )
    with pytest.raises(
        DataError, match=re.escape(str(path)) + r".*'modality'.*model\.in_channels=1"
    ):
        check_declared(data, compose(["model.out_channels=2"]), "site-x")
    check_declared(data, compose(["model.in_channels=3", "model.out_channels=2"]), "site-x")


class _OneHotOracle(torch.nn.Module):
    """Logits that put class ``k`` where the shown volume holds ``k`` (``order`` permutes)."""

    def __init__(self, classes: int, order: list[int] | None = None) -> None:
        super().__init__()
        self.classes, self.order = classes, order or list(range(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x == k).float() for k in self.order], dim=1) * 10.0


def test_evaluate_on_three_classes_gives_two_per_class_dice(tmp_path):
    entries = []
    for i in range(2):
        lab = _label(3)
        entries.append(_entry(tmp_path, i, _image(lab, seed=i), lab))
    data = read_datalist(_datalist(tmp_path, entries, labels=THREE))
    volumes = list(make_loader(data.train, P, 1.0, 1, train=False, seed=0, cache=False))
    shown = [{"image": v["label"].float(), "label": v["label"]} for v in volumes]
    perfect = evaluate(_OneHotOracle(3), shown, P)
    assert len(perfect.dice_per_class) == 2
    assert perfect.dice_per_class == pytest.approx((1.0, 1.0), abs=1e-6)
    assert perfect.dice == pytest.approx(1.0, abs=1e-6) and perfect.num_examples == 2
    swapped = evaluate(_OneHotOracle(3, [0, 2, 1]), shown, P)  # classes 1 and 2 confused
    assert len(swapped.dice_per_class) == 2
    assert max(swapped.dice_per_class) < 0.01


# -- one patch per patient per draw: the patient stays DP's record ------------------------------


def _axis_of(patch: torch.Tensor) -> int:
    """The one axis along which a gradient image's patch varies."""
    img = patch[0]
    spread = [float(img.mean(dim=[d for d in range(3) if d != a]).std()) for a in range(3)]
    assert sorted(spread)[1] < 1e-4 < max(spread), spread
    return int(np.argmax(spread))


def _gradient_site(tmp_path: Path) -> list[dict]:
    """Patient ``a`` has 3 scans (image = coordinate along axis 0, 1, 2), ``b`` and ``c`` one."""
    grid = np.mgrid[0:N, 0:N, 0:N].astype(np.float32)
    lab = _label(2)
    entries = []
    for i, (patient, axis) in enumerate([("a", 0), ("b", 0), ("a", 1), ("c", 2), ("a", 2)]):
        entry = _entry(tmp_path, i, grid[axis] * 10.0, lab)
        entries.append({**entry, "patient": patient})
    return entries


def test_one_patch_per_patient_per_draw_from_each_of_its_scans(tmp_path):
    data = read_datalist(_datalist(tmp_path, _gradient_site(tmp_path)))
    assert len(data.train) == 5
    loader = make_loader(data.train, P, 1.0, 2, train=True, seed=0, cache=True)
    assert isinstance(loader.dataset, PatientDataset)
    assert len(loader.dataset) == 3, "one record per patient"
    seen: set[int] = set()
    for _ in range(30):
        item = loader.dataset[0]  # patient "a", first in the datalist
        assert isinstance(item, dict), "one patch, not a list of patches"
        assert item["image"].shape == (1, P, P, P) and item["label"].shape == (1, P, P, P)
        seen.add(_axis_of(item["image"]))
    assert seen == {0, 1, 2}, "each of the patient's scans is drawn"
    for _ in range(10):
        assert _axis_of(loader.dataset[2]["image"]) == 2  # patient "c" has one scan
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 3, "an epoch sees each patient once"
    assert all(b["image"].shape[1:] == (1, P, P, P) for b in batches)


def test_a_volume_transform_yielding_two_patches_is_refused():
    sample = {"image": torch.zeros(1, 4, 4, 4), "label": torch.zeros(1, 4, 4, 4)}
    one = PatientDataset([[sample]], ["p"], seed=0)
    assert one[0] is sample
    two = PatientDataset([[sample, sample]], ["p"], seed=0)
    with pytest.raises(ValueError, match="2 patches"):
        two[0]
