"""``fedhealth predict``: a run's global model segments scans, written in each scan's own grid.

The run directory is made the way a run makes it (:class:`fedhealth.runs.rundir.RunDir`, an
untrained :func:`fedhealth.models.build_model` network checkpointed by ``end_round``); the scans
are stored LPS with anisotropic voxels, as a scanner exports them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import fedhealth.training.predict as predict_module
from fedhealth.cli import EXIT_USER_ERROR, main
from fedhealth.config import compose
from fedhealth.models import build_model
from fedhealth.runs.rundir import RunDir

TINY_MODEL = [
    "model.channels=[4,8]",
    "model.strides=[2]",
    "model.num_res_units=0",
    "data.patch_size=16",
    "data.target_spacing=1.0",
]

# LPS+ (x towards the patient's left... stored as the scanner's -x, -y), anisotropic voxels
LPS = np.array(
    [
        [-0.8, 0.0, 0.0, 30.0],
        [0.0, -1.2, 0.0, 40.0],
        [0.0, 0.0, 2.0, -10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPES = {"scan-a": (28, 20, 10), "scan-b": (24, 18, 12)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _lesion(shape: tuple[int, int, int]) -> np.ndarray:
    """A bright box off the centre, so a flip or a transposition would miss it."""
    x, y, z = shape
    mask = np.zeros(shape, np.uint8)
    mask[x // 5 : x // 2, y // 4 : (2 * y) // 3, 1 : z // 2] = 1
    return mask


def _scan(path: Path, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    mask = _lesion(shape)
    rng = np.random.default_rng(seed)
    image = (300.0 + 400.0 * mask + rng.normal(0, 10, shape)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, LPS), str(path))
    return mask


def _write_run(path: Path, rounds: int = 1) -> Path:
    """A run directory as a run leaves it: config, one checkpoint per round, manifest."""
    cfg = compose([*TINY_MODEL, f"run_root={path.parent}", f"run_name={path.name}"])
    run = RunDir(path, cfg)
    torch.manual_seed(0)
    for r in range(1, rounds + 1):
        model = build_model(cfg.model)  # a different initialisation each round
        run.end_round(r, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    run.finish()
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A hospital's site: a labelled training scan, and an image-only test list of LPS scans."""
    root = tmp_path / "hospital"
    train_mask = _scan(root / "imagesTr" / "train0.nii.gz", (20, 20, 10), 9)
    (root / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(train_mask, LPS), str(root / "labelsTr" / "train0.nii.gz"))
    for i, (name, shape) in enumerate(SHAPES.items()):
        _scan(root / "imagesTs" / f"{name}.nii.gz", shape, i)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "hospital",
                "modality": {"0": "T1"},
                "labels": {"0": "background", "1": "lesion"},
                "training": [
                    {"image": "./imagesTr/train0.nii.gz", "label": "./labelsTr/train0.nii.gz"}
                ],
                "test": [f"./imagesTs/{name}.nii.gz" for name in SHAPES],
            }
        )
    )
    return root


def _check_outputs(out: Path, scans: dict[str, Path]) -> dict[str, np.ndarray]:
    found = {}
    for name, scan in scans.items():
        seg_path = out / f"{name}_seg.nii.gz"
        assert seg_path.is_file(), sorted(p.name for p in out.iterdir())
        seg, src = nib.load(str(seg_path)), nib.load(str(scan))
        assert seg.shape == src.shape, (name, seg.shape, src.shape)
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
        assert seg.get_data_dtype() == np.uint8
        values = np.asarray(seg.dataobj)
        assert set(np.unique(values).tolist()) <= {0, 1}
        found[name] = values
    return found


def test_predict_writes_each_scan_in_its_own_grid_with_a_model_card(run_dir, site, tmp_path):
    before = _hashes(site)
    out = tmp_path / "predictions"
    code = main(["predict", "--model", str(run_dir), "--data", str(site), "--out", str(out)])
    assert code == 0
    _check_outputs(out, {n: site / "imagesTs" / f"{n}.nii.gz" for n in SHAPES})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{n}_seg.nii.gz" for n in SHAPES), "model_card.json"]
    )
    card = json.loads((out / "model_card.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = manifest["checkpoints"]["round-0001.safetensors"]
    assert card["checkpoint"]["sha256"] == recorded
    assert recorded == _sha(run_dir / "checkpoints" / "round-0001.safetensors")
    assert card["config_sha256"] == manifest["config_sha256"]
    assert _hashes(site) == before, "the hospital's folder is only read"


class _Threshold(torch.nn.Module):
    """Logits for 'lesion' where the z-scored image is bright: segments what it sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1) * 10.0


def test_segmentations_land_on_the_scans_own_voxels(run_dir, site, tmp_path, monkeypatch):
    """With a model that segments the bright box, the output overlaps the box voxel for voxel:
    the LPS, anisotropic scan went to RAS at 1 mm and back without a flip or a shift."""
    real = predict_module.load_global_model

    def threshold_model(path):
        loaded = real(path)
        loaded.model = _Threshold()
        return loaded

    monkeypatch.setattr(predict_module, "load_global_model", threshold_model)
    out = tmp_path / "predictions"
    assert main(["predict", "--model", str(run_dir), "--data", str(site), "--out", str(out)]) == 0
    segs = _check_outputs(out, {n: site / "imagesTs" / f"{n}.nii.gz" for n in SHAPES})
    for name, shape in SHAPES.items():
        truth = _lesion(shape).astype(bool)
        pred = segs[name].astype(bool)
        dice = 2 * (truth & pred).sum() / (truth.sum() + pred.sum())
        assert dice > 0.85, (name, dice)
        flipped = truth[::-1]
        assert 2 * (flipped & pred).sum() / (flipped.sum() + pred.sum()) < dice - 0.2


def test_out_inside_the_data_folder_is_refused_and_nothing_is_written(
    run_dir, site, tmp_path, capsys
):
    before = _hashes(site)
    for out in (site / "predictions", site, site / "imagesTs" / "seg"):
        code = main(["predict", "--model", str(run_dir), "--data", str(site), "--out", str(out)])
        assert code == EXIT_USER_ERROR, out
        assert "inside the data folder" in capsys.readouterr().err
    # the scans' own folder counts too when the datalist is given as a file
    out = site / "imagesTs" / "seg"
    data = site / "dataset.json"
    assert main(["predict", "--model", str(run_dir), "--data", str(data), "--out", str(out)]) == 2
    assert _hashes(site) == before
    assert sorted(p.name for p in site.iterdir()) == [
        "dataset.json",
        "imagesTr",
        "imagesTs",
        "labelsTr",
    ]
    assert sorted(p.name for p in (site / "imagesTs").iterdir()) == [f"{n}.nii.gz" for n in SHAPES]


def test_an_existing_output_is_not_overwritten(run_dir, site, tmp_path, capsys):
    out = tmp_path / "predictions"
    out.mkdir()
    kept = out / "scan-b_seg.nii.gz"
    kept.write_bytes(b"yesterday's segmentation")
    code = main(["predict", "--model", str(run_dir), "--data", str(site), "--out", str(out)])
    assert code == EXIT_USER_ERROR
    assert str(kept) in capsys.readouterr().err
    assert kept.read_bytes() == b"yesterday's segmentation"
    assert [p.name for p in out.iterdir()] == ["scan-b_seg.nii.gz"], "nothing else written"


def test_an_altered_checkpoint_is_refused(run_dir, site, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "checkpoints" / "round-0001.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[-5] ^= 0x01  # one bit of one weight
    ckpt.write_bytes(bytes(raw))
    out = tmp_path / "predictions"
    for model in (run, ckpt):
        code = main(["predict", "--model", str(model), "--data", str(site), "--out", str(out)])
        assert code == EXIT_USER_ERROR
        assert "sha256" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_scans_without_dataset_json(run_dir, tmp_path):
    folder = tmp_path / "export"
    for i, (name, shape) in enumerate(SHAPES.items()):
        _scan(folder / f"{name}.nii.gz", shape, i)
    (folder / "README.txt").write_text("not a scan")
    before = _hashes(folder)
    out = tmp_path / "predictions"
    code = main(["predict", "--model", str(run_dir), "--data", str(folder), "--out", str(out)])
    assert code == 0
    _check_outputs(out, {n: folder / f"{n}.nii.gz" for n in SHAPES})
    assert _hashes(folder) == before


def test_model_given_as_its_checkpoint_file(run_dir, site, tmp_path):
    ckpt = run_dir / "checkpoints" / "round-0001.safetensors"
    out = tmp_path / "predictions"
    assert main(["predict", "--model", str(ckpt), "--data", str(site), "--out", str(out)]) == 0
    _check_outputs(out, {n: site / "imagesTs" / f"{n}.nii.gz" for n in SHAPES})
    card = json.loads((out / "model_card.json").read_text())
    assert card["checkpoint"]["sha256"] == _sha(ckpt)


def test_a_file_outside_a_runs_checkpoints_is_refused(run_dir, site, tmp_path, capsys):
    stray = tmp_path / "model.safetensors"
    shutil.copy(run_dir / "checkpoints" / "round-0001.safetensors", stray)
    out = tmp_path / "predictions"
    code = main(["predict", "--model", str(stray), "--data", str(site), "--out", str(out)])
    assert code == EXIT_USER_ERROR
    assert "checkpoints/round-NNNN.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_the_model_card_names_the_checkpoint_that_segmented(tmp_path, site):
    run = _write_run(tmp_path / "runs" / "two", rounds=2)
    first = run / "checkpoints" / "round-0001.safetensors"
    out = tmp_path / "predictions"
    assert main(["predict", "--model", str(first), "--data", str(site), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["checkpoint"]["sha256"] == _sha(first)
    assert card["checkpoint"]["file"] == "checkpoints/round-0001.safetensors"
