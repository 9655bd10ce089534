"""The data pipeline on real anatomy: the MNI152 brain, its grey and white matter as labels.

Sites are written by :mod:`fedhealth.testing.anatomy` as hospitals store scans: different
spacings, an oblique grid, RAS, LPS and axis-permuted voxel order, int16, float64 and uint8
images, ``.nii`` and ``.nii.gz``. The pipeline must put all of them into one frame with the
labels on the anatomy, and ``predict`` must write segmentations back onto each scan's own grid.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedhealth.config import compose
from fedhealth.data.datalist import read_datalist
from fedhealth.data.loading import make_loader
from fedhealth.data.transforms import preprocess
from fedhealth.errors import DataError
from fedhealth.testing import anatomy

pytest.importorskip("nilearn", reason="nilearn ships the MNI152 template these tests use")

SPACING = 4.0  # mm: the common grid of these tests


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return anatomy.write_sites(tmp_path_factory.mktemp("anatomy"), n_train=4, n_test=2, seed=0)


def _nibabel_t1() -> Path:
    """nibabel's own test T1 (a real head, 2 mm, stored LAS): no label."""
    spec = importlib.util.find_spec("nibabel")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "tests" / "data" / "anatomical.nii"


def _raw(path: str) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


# ---- (a) one scan, three storage orders, one tensor ----


def test_ras_lps_and_permuted_storage_give_identical_tensors(tmp_path):
    scan = anatomy.sample_case(np.random.default_rng(7), anatomy.SiteSpec("x", (3.0, 3.0, 3.0)))
    items = anatomy.write_orientations(tmp_path, scan)
    # control: on disk the three are different arrays (and headers) of the same anatomy
    raw = {name: _raw(item["image"]) for name, item in items.items()}
    codes = {name: nib.aff2axcodes(nib.load(item["image"]).affine) for name, item in items.items()}
    assert codes == {
        "ras": ("R", "A", "S"),
        "lps": ("L", "P", "S"),
        "permuted": ("S", "R", "A"),
    }
    assert raw["ras"].shape == raw["lps"].shape != raw["permuted"].shape
    assert not np.array_equal(raw["ras"], raw["lps"])
    assert not np.array_equal(raw["ras"], np.moveaxis(raw["permuted"], 0, -1)[::-1, ::-1])
    # ... which are the same voxels: the reordering is exactly invertible
    np.testing.assert_array_equal(raw["ras"], raw["lps"][::-1, ::-1])
    np.testing.assert_array_equal(raw["ras"], np.transpose(raw["permuted"], (1, 2, 0)))

    pre = preprocess(SPACING)
    out = {name: pre(dict(item)) for name, item in items.items()}
    ref = out["ras"]
    assert ref["image"].shape == ref["label"].shape and ref["image"].shape[0] == 1
    assert set(ref["label"].unique().tolist()) == {0.0, 1.0, 2.0}
    for name in ("lps", "permuted"):
        torch.testing.assert_close(out[name]["image"].as_tensor(), ref["image"].as_tensor())
        assert torch.equal(out[name]["label"].as_tensor(), ref["label"].as_tensor()), name
        np.testing.assert_allclose(out[name]["image"].affine, ref["image"].affine, atol=1e-4)


def test_a_real_t1_stored_three_ways_gives_one_tensor(tmp_path):
    """nibabel's test T1 (a real subject's head, stored LAS) as stored, flipped to RAS, permuted."""
    img = nib.load(_nibabel_t1())
    data, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine.astype(np.float64)
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    paths = {}
    for name, flips, perm in (
        ("las", (False, False, False), (0, 1, 2)),
        ("ras", (True, False, False), (0, 1, 2)),
        ("permuted", (False, True, False), (2, 1, 0)),
    ):
        stored, aff = anatomy.reorder(data, affine, flips, perm)
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(stored, aff), paths[name])
    assert nib.aff2axcodes(nib.load(paths["ras"]).affine) == ("R", "A", "S")
    assert not np.array_equal(_raw(paths["las"]), _raw(paths["ras"]))  # control
    pre = preprocess(2.0, keys=("image",))
    out = {name: pre({"image": path})["image"] for name, path in paths.items()}
    for name in ("ras", "permuted"):
        torch.testing.assert_close(out[name].as_tensor(), out["las"].as_tensor())


# ---- (b) the three hospitals' sites ----


def test_real_anatomy_sites_pass_the_datalist_checks_and_differ_as_stored(sites):
    stored = {}
    for folder in sites:
        data = read_datalist(folder / "dataset.json")  # every file opened and checked
        assert data.labels == {0: "background", 1: "grey matter", 2: "white matter"}
        assert data.modality == {0: "T1w"}
        assert (len(data.train), len(data.test), data.unlabelled) == (4, 2, [])
        assert data.unidentified == () and data.shared == ()
        assert len({it["patient"] for it in data.train + data.test}) == 6
        image, label = nib.load(data.train[0]["image"]), nib.load(data.train[0]["label"])
        stored[folder.name] = (
            str(image.get_data_dtype()),
            str(label.get_data_dtype()),
            tuple(float(z) for z in image.header.get_zooms()),
            "".join(nib.aff2axcodes(image.affine)),
            Path(data.train[0]["image"]).name.endswith(".nii.gz"),
        )
    assert stored == {
        "site-a": ("int16", "uint8", (3.0, 3.0, 3.0), "RAS", True),
        "site-b": ("float64", "int16", (3.0, 3.0, 4.0), "LPS", False),
        "site-c": ("uint8", "float32", (3.5, 3.5, 3.5), "SRA", True),
    }
    tilt = nib.load(read_datalist(sites[2] / "dataset.json").train[0]["image"]).affine[:3, :3]
    cosine = np.abs(tilt / np.linalg.norm(tilt, axis=0)).max(axis=0)
    assert np.allclose(np.degrees(np.arccos(cosine)), [15.0, 0.0, 15.0], atol=1e-3)


def test_every_site_lands_in_one_frame_with_labels_on_the_anatomy(sites):
    """After preprocessing, white matter is bright and at the same world place at every site."""
    pre = preprocess(SPACING)
    centres = {}
    for folder in sites:
        item = read_datalist(folder / "dataset.json").test[0]
        out = pre({"image": item["image"], "label": item["label"]})
        image, label = out["image"][0].numpy(), out["label"][0].numpy()
        assert set(np.unique(label).tolist()) == {0.0, 1.0, 2.0}
        means = [float(image[label == k].mean()) for k in range(3)]
        assert means[0] < means[1] < means[2], (folder.name, means)  # T1: CSF < GM < WM
        fractions = np.bincount(label.astype(int).ravel(), minlength=3)[1:] * SPACING**3
        # the template's GM and WM volumes are 1.09e6 and 0.64e6 mm^3 (+-15 % by the scaling)
        assert 8e5 < fractions[0] < 1.4e6 and 4.5e5 < fractions[1] < 8e5, fractions
        voxels = np.argwhere(label == 2).mean(axis=0)
        centres[folder.name] = (np.asarray(out["label"].affine) @ [*voxels, 1.0])[:3]
    spread = np.ptp(np.stack(list(centres.values())), axis=0)
    assert (spread < 8.0).all(), centres  # mm: the patients' pose differs by a few mm only


def test_training_patches_hold_all_three_classes(sites):
    items = [it for folder in sites for it in read_datalist(folder / "dataset.json").train]
    loader = make_loader(items, 32, SPACING, 4, train=True, seed=0, cache=False)
    seen: set[float] = set()
    batches = 0
    for batch in loader:
        batches += 1
        assert batch["image"].shape == (4, 1, 32, 32, 32)
        assert batch["label"].shape == (4, 1, 32, 32, 32)
        assert batch["image"].dtype == torch.float32
        values = set(batch["label"].unique().tolist())
        assert values <= {0.0, 1.0, 2.0}
        seen |= values
    assert batches == 3 and seen == {0.0, 1.0, 2.0}  # 12 patients, one patch each


# ---- (c) a briefly trained model's segmentations, written back on the scans' own grids ----


@pytest.mark.slow
def test_predictions_overlay_the_anatomy_in_each_scans_own_grid(sites, tmp_path):
    from fedhealth.models import build_model
    from fedhealth.runs.rundir import RunDir
    from fedhealth.training.loop import seed_everything, train
    from fedhealth.training.predict import load_global_model, predict

    cfg = compose(
        [
            "model.out_channels=3",
            "data.patch_size=32",
            f"data.target_spacing={SPACING}",
            "privacy=off",
            f"run_root={tmp_path}",
            "run_name=central",
        ]
    )
    items = [it for folder in sites for it in read_datalist(folder / "dataset.json").train]
    seed_everything(0)
    model = build_model(cfg.model)
    train(model, make_loader(items, 32, SPACING, 4, train=True, seed=0), epochs=24, lr=0.01)
    run = RunDir(tmp_path / "central", cfg)
    run.end_round(1, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    run.finish()
    assert load_global_model(run.path).server_round == 1

    dice = {}
    for folder in sites[1:]:  # site-b: LPS, 3x3x4 mm; site-c: tilted 15 degrees, stored S-R-A
        written = predict(run.path, folder, tmp_path / f"seg-{folder.name}")
        for item, seg_path in zip(
            read_datalist(folder / "dataset.json").test, written, strict=True
        ):
            scan, label, seg = (nib.load(p) for p in (item["image"], item["label"], seg_path))
            assert seg.shape == scan.shape
            np.testing.assert_allclose(seg.affine, scan.affine, atol=1e-4)
            truth, pred = np.asarray(label.dataobj), np.asarray(seg.dataobj)
            assert set(np.unique(pred).tolist()) <= {0, 1, 2}
            name = f"{folder.name}/{Path(seg_path).name}"
            dice[name] = (_dice(pred == 1, truth == 1), _dice(pred == 2, truth == 2))
            if folder.name == "site-b":
                # control: the class map in RAS voxel order under this LPS header (the bug
                # Invertd exists to prevent) is x- and y-reversed: it misses the anatomy
                wrong = pred[::-1, ::-1]
                dice[name + " (RAS order, LPS header)"] = (
                    _dice(wrong == 1, truth == 1),
                    _dice(wrong == 2, truth == 2),
                )
    print("grey/white-matter Dice in each scan's own grid:", dice)
    for name, (gm, wm) in dice.items():
        if name.endswith("header)"):
            assert wm < dice[name.split(" ")[0]][1] - 0.1, (name, dice)
        else:
            assert wm > 0.5 and gm > 0.5, (name, gm, wm)


# ---- (d) a layout hospitals use: one folder per patient, the same file names in each ----


def _per_patient_site(root: Path) -> Path:
    """``<site>/<patient>/t1.nii.gz`` (and ``seg.nii.gz``), two patients on different grids."""
    site, entries = root / "site", []
    for i, (patient, spacing) in enumerate((("p1", (5.0, 5.0, 5.0)), ("p2", (5.0, 5.0, 6.0)))):
        spec = anatomy.SiteSpec(patient, spacing)
        (site / patient).mkdir(parents=True)
        scan = anatomy.sample_case(np.random.default_rng(i), spec)
        anatomy.write_scan(scan, site / patient / "t1.nii.gz", site / patient / "seg.nii.gz", spec)
        entries.append(
            {"image": f"{patient}/t1.nii.gz", "label": f"{patient}/seg.nii.gz", "patient": patient}
        )
    listing = {"labels": anatomy.LABELS, "modality": anatomy.MODALITY}
    (site / "dataset.json").write_text(
        json.dumps({**listing, "training": entries[:1], "test": entries[1:] + entries[:1]})
    )
    return site


def test_patient_ids_are_read_as_declared_when_folders_are_named_after_patients(tmp_path):
    data = read_datalist(_per_patient_site(tmp_path) / "dataset.json")
    assert [it["patient"] for it in data.train + data.test] == ["p1", "p2", "p1"]


def test_predict_keeps_same_named_scans_of_different_patients_apart(tmp_path):
    from fedhealth.models import build_model
    from fedhealth.runs.rundir import RunDir
    from fedhealth.training.predict import predict

    site = _per_patient_site(tmp_path)
    tiny = ["model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=0"]
    cfg = compose(
        [*tiny, "model.out_channels=3", "data.patch_size=16", "data.target_spacing=6.0"]
        + [f"run_root={tmp_path}", "run_name=untrained"]
    )
    run = RunDir(tmp_path / "untrained", cfg)
    torch.manual_seed(0)
    weights = build_model(cfg.model).state_dict()
    run.end_round(1, {k: v.detach().numpy().copy() for k, v in weights.items()})
    run.finish()
    try:
        written = predict(run.path, site, tmp_path / "out", copy_card=False)
    except DataError as exc:  # a fix may refuse the collision instead, naming the file
        assert "t1_seg.nii.gz" in str(exc)
        return
    assert len(set(written)) == 2, written  # p2's and p1's test scans, each its own file
    for item, seg in zip(read_datalist(site / "dataset.json").test, written, strict=True):
        assert nib.load(seg).shape == nib.load(item["image"]).shape, (item["image"], seg)
