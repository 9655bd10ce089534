"""Every command a user runs on a hospital's site folders leaves every file there as it was.

Three small sites of real NIfTI files (no synthetic marker; the third's test list is image-only,
Decathlon style) are given as ``data.site_dirs``; each
file's sha256 and mtime, and the set of paths, are taken before and after ``fedhealth simulate``
(DP and secure aggregation on, as by default), ``baseline centralized``, ``baseline local``,
``predict`` and ``data synth`` / ``simulate`` pointed at the sites as ``data.root`` (refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedhealth.cli import EXIT_USER_ERROR, main
from fedhealth.runs.rundir import read_metrics

pytestmark = pytest.mark.slow

SITES = ("hospital-a", "hospital-b", "hospital-c")
TINY = [
    "rounds=1",
    "train.local_epochs=1",
    "train.batch_size=2",
    "model.channels=[4,8]",
    "model.strides=[2]",
    "model.num_res_units=0",
    "data.patch_size=16",
    "data.target_spacing=1.25",
]

Snapshot = dict[str, tuple[str, int] | str]


def _snapshot(root: Path) -> Snapshot:
    """Relative path -> (sha256, mtime ns) of each file, ``"dir"`` for each folder."""
    out: Snapshot = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _write_site(folder: Path, seed: int, *, labelled_test: bool = True) -> None:
    """A hospital's export: anisotropic LPS scans, labels, a Decathlon datalist with patients;
    without ``labelled_test`` its test list is image paths only (nothing to score there)."""
    rng = np.random.default_rng(seed)
    affine = np.array(
        [[-1.2, 0, 0, 20.0], [0, -1.2, 0, 30.0], [0, 0, 1.5, -5.0], [0, 0, 0, 1]], dtype=float
    )
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    entries = []
    for i in range(5):
        tag = "Tr" if i < 4 else "Ts"
        label = np.zeros((20, 20, 16), np.uint8)
        label[4 + i : 11 + i, 6:13, 4:10] = 1
        image = (250.0 + 120.0 * label + rng.normal(0, 12, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"images{tag}" / f"pt{i}.nii.gz"))
        if tag == "Tr" or labelled_test:
            nib.save(nib.Nifti1Image(label, affine), str(folder / f"labels{tag}" / f"pt{i}.nii.gz"))
        entries.append(
            {
                "image": f"./images{tag}/pt{i}.nii.gz",
                "label": f"./labels{tag}/pt{i}.nii.gz",
                "patient": f"{folder.name}-pt{i}",
            }
        )
    test: list = entries[4:] if labelled_test else [entries[4]["image"]]
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "name": folder.name,
                "modality": {"0": "T1"},
                "labels": {"0": "background", "1": "lesion"},
                "training": entries[:4],
                "test": test,
            },
            indent=2,
        )
    )
    (folder / "README.txt").write_text("exported from PACS; do not modify\n")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hospital")
    for seed, name in enumerate(SITES):  # the last site's test scans are not labelled
        _write_site(root / name, seed, labelled_test=name != SITES[-1])
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where outputs go: run_root, ledgers, predictions; the commands' working directory."""
    return tmp_path_factory.mktemp("work")


def _site_dirs(hospital: Path) -> str:
    return "data.site_dirs=[" + ",".join(str(hospital / s) for s in SITES) + "]"


def _outputs(work: Path) -> list[str]:
    return [f"run_root={work / 'runs'}", f"privacy.ledger_root={work / 'ledgers'}"]


@pytest.fixture(scope="module")
def simulated(hospital: Path, work: Path) -> tuple[Path, Snapshot, Snapshot, str]:
    """``fedhealth simulate`` in its own process (Ray), on the three site folders."""
    before = _snapshot(hospital)
    cmd = [
        sys.executable,
        "-m",
        "fedhealth.cli",
        "simulate",
        _site_dirs(hospital),
        *TINY,
        *_outputs(work),
        "run_name=untouched",
        f"federation.ray_num_cpus={min(4, os.cpu_count() or 1)}",
    ]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return work / "runs" / "untouched", before, _snapshot(hospital), proc.stdout


def test_simulate_with_privacy_and_secure_aggregation_leaves_the_sites_untouched(simulated):
    run, before, after, stdout = simulated
    assert after == before
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rounds_completed"] == 1 and manifest["finished"]
    lines = read_metrics(run)
    assert [line["round"] for line in lines] == [0, 1]
    evaluation = lines[1]["evaluate"]
    # the site without labelled test cases reports no Dice: neither scored nor rejected
    assert set(evaluation["sites"]) == set(SITES[:2]), evaluation
    assert evaluation["rejected"] == {} and evaluation["failed"] == 0
    assert lines[1]["train"]["secure_sum"]["sites"] == 3, "every site trained, securely summed"
    assert all(name in stdout for name in SITES[:2]), stdout[-2000:]
    assert "privacy budget report" in stdout, "DP was on"
    config = (run / "config.yaml").read_text()
    assert "secure_aggregation: true" in config and "enabled: true" in config


def test_the_ledgers_live_outside_the_site_folders(simulated, hospital, work):
    for name in SITES:
        assert (work / "ledgers" / name / "ledger.sqlite").is_file()
    assert not list(hospital.rglob("*.sqlite*"))


@pytest.mark.parametrize("kind", ["centralized", "local"])
def test_baselines_leave_the_sites_untouched(hospital, work, kind, capsys):
    before = _snapshot(hospital)
    assert main(["baseline", kind, _site_dirs(hospital), *TINY, *_outputs(work)]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table, "a Dice table was printed"
    assert _snapshot(hospital) == before


def test_predict_leaves_the_sites_untouched(simulated, hospital, work):
    run = simulated[0]
    before = _snapshot(hospital)
    for i, name in enumerate(SITES):
        out = work / "predictions" / name
        data = hospital / name if i % 2 else hospital / name / "dataset.json"
        assert main(["predict", "--model", str(run), "--data", str(data), "--out", str(out)]) == 0
        assert (out / "pt4_seg.nii.gz").is_file() and (out / "model_card.json").is_file()
    # a folder without dataset.json: every scan in it
    out = work / "predictions" / "folder"
    scans = hospital / SITES[0] / "imagesTr"
    assert main(["predict", "--model", str(run), "--data", str(scans), "--out", str(out)]) == 0
    assert len(list(out.glob("*_seg.nii.gz"))) == 4
    # and refused into a site folder
    inside = hospital / SITES[0] / "predictions"
    data = hospital / SITES[0]
    code = main(["predict", "--model", str(run), "--data", str(data), "--out", str(inside)])
    assert code == EXIT_USER_ERROR
    assert _snapshot(hospital) == before


@pytest.mark.parametrize("target", ["a site", "the sites' parent"])
def test_data_synth_and_simulate_refuse_a_site_folder_as_data_root(hospital, work, target, capsys):
    root = hospital / SITES[0] if target == "a site" else hospital
    before = _snapshot(hospital)
    for command in (["data", "synth"], ["simulate"]):
        code = main([*command, f"data.root={root}", "sites=2", *TINY, *_outputs(work)])
        assert code == EXIT_USER_ERROR, command
        err = capsys.readouterr().err
        assert str(root) in err and "data.site_dirs" in err, err
    assert _snapshot(hospital) == before
