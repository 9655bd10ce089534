"""A hospital's data is never touched: the synthetic cohort is written only into its own folder.

``write_cohort`` writes into a folder that is missing, empty, or marked as a cohort it made
with the same parameters; ``resolve_site_dirs`` only reads ``data.site_dirs``. Every test hashes
the files it must not change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedhealth.cli import EXIT_USER_ERROR, main
from fedhealth.config import compose
from fedhealth.data.sites import resolve_site_dirs
from fedhealth.data.synth import MARKER, write_cohort, write_site
from fedhealth.errors import DataError

TINY = {"seed": 0, "n_train": 1, "n_test": 1, "fov": 40}


def _hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _hospital_site(folder: Path, cases: int = 2, seed: int = 0) -> Path:
    """A hospital's own site: real NIfTI files and a Decathlon dataset.json, no marker."""
    rng = np.random.default_rng(seed)
    entries = []
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        label = np.zeros((18, 18, 18), np.uint8)
        label[5:11, 6:12, 4:10] = 1
        image = (200.0 + 80.0 * label + rng.normal(0, 10, label.shape)).astype(np.float32)
        affine = np.diag([1.1, 1.1, 1.1, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / f"pt{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"pt{i}.nii.gz"))
        entries.append(
            {
                "image": f"./imagesTr/pt{i}.nii.gz",
                "label": f"./labelsTr/pt{i}.nii.gz",
                "patient": f"{folder.name}-pt{i}",
            }
        )
    (folder / "dataset.json").write_text(
        json.dumps({"name": folder.name, "training": entries[1:], "test": entries[:1]})
    )
    return folder


def test_write_cohort_refuses_a_folder_without_its_marker_and_writes_nothing(tmp_path):
    root = tmp_path / "hospital"
    _hospital_site(root / "site-0")
    (root / "notes.txt").write_text("the PACS export of 2021")
    before = _hashes(root)
    with pytest.raises(DataError) as err:
        write_cohort(root, sites=2, **TINY)
    assert str(root) in str(err.value) and MARKER in str(err.value)
    assert _hashes(root) == before
    assert not (root / MARKER).exists() and not (root / "site-1").exists()
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "site-0"]


def test_write_cohort_refuses_a_lone_file_in_the_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "keep.nii.gz").write_bytes(b"someone's scan")
    with pytest.raises(DataError, match="not a folder fedhealth created"):
        write_cohort(root, sites=1, **TINY)
    assert [p.name for p in root.iterdir()] == ["keep.nii.gz"]


def test_write_cohort_refuses_a_file_deep_inside_otherwise_empty_folders(tmp_path):
    root = tmp_path / "root"
    deep = root / "site-0" / "imagesTr" / "pt0.nii.gz"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"someone's scan")
    before = _hashes(root)
    with pytest.raises(DataError, match="not a folder fedhealth created"):
        write_cohort(root, sites=1, **TINY)
    assert _hashes(root) == before and not (root / MARKER).exists()


def test_write_cohort_into_an_empty_or_missing_folder_marks_it(tmp_path):
    for root in (tmp_path / "missing" / "deeper", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        paths = write_cohort(root, sites=1, **TINY)
        assert paths == [root / "site-0" / "dataset.json"]
        marker = json.loads((root / MARKER).read_text())
        assert marker == {
            "seed": 0,
            "train_per_site": 1,
            "test_per_site": 1,
            "fov": 40,
            "heterogeneity": 1.0,
        }


def test_a_cohort_made_with_other_parameters_is_refused_naming_them(tmp_path):
    root = tmp_path / "cohort"
    write_cohort(root, sites=1, **TINY)
    before = _hashes(root)
    with pytest.raises(DataError) as err:
        write_cohort(root, sites=2, **{**TINY, "seed": 3, "fov": 48})
    msg = str(err.value)
    assert str(root) in msg
    assert "seed (0 there, 3 asked)" in msg and "fov (40 there, 48 asked)" in msg, msg
    assert "train_per_site" not in msg and "heterogeneity" not in msg
    assert _hashes(root) == before


def test_adding_sites_to_a_marked_cohort_writes_only_the_missing_ones(tmp_path):
    root = tmp_path / "cohort"
    write_cohort(root, sites=1, **TINY)
    before = _hashes(root)
    paths = write_cohort(root, sites=3, **TINY)
    assert paths == [root / f"site-{s}" / "dataset.json" for s in range(3)]
    after = _hashes(root)
    assert {k: after[k] for k in before} == before, "site-0 and the marker unchanged"
    added = {k.split("/")[0] for k in set(after) - set(before)}
    assert added == {"site-1", "site-2"}
    assert not any(p.name.endswith(".partial") for p in root.iterdir())
    assert write_cohort(root, sites=3, **TINY) == paths
    assert _hashes(root) == after, "a complete cohort is left as it is"


def test_every_fov_the_config_accepts_writes_a_cohort(tmp_path):
    cfg = compose(["data.fov=16"])  # validates: data.fov >= 16
    paths = write_cohort(
        tmp_path / "cohort", sites=2, seed=0, n_train=1, n_test=1, fov=cfg.data.fov
    )
    assert [p.parent.name for p in paths] == ["site-0", "site-1"]


def test_write_site_refuses_a_folder_that_has_a_dataset_json(tmp_path):
    site = _hospital_site(tmp_path / "hospital-a")
    before = _hashes(site)
    with pytest.raises(DataError, match=str(site) + ".*dataset.json"):
        write_site(site, 0, 0, 1, 1, 40, 1.0)
    assert _hashes(site) == before
    assert sorted(p.name for p in site.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_resolve_site_dirs_reads_a_hospitals_folders(tmp_path):
    a, b = _hospital_site(tmp_path / "a"), _hospital_site(tmp_path / "b", seed=1)
    before = _hashes(tmp_path)
    cfg = compose([f"data.site_dirs=[{a},{b}]", f"data.root={tmp_path / 'unused'}"])
    assert resolve_site_dirs(cfg) == [a.resolve(), b.resolve()]
    assert _hashes(tmp_path) == before and not (tmp_path / "unused").exists()


def test_resolve_site_dirs_refuses_a_folder_without_dataset_json(tmp_path):
    good = _hospital_site(tmp_path / "good")
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = compose([f"data.site_dirs=[{good},{bare}]"])
    with pytest.raises(DataError, match=str(bare.resolve()) + ".*no dataset.json"):
        resolve_site_dirs(cfg)
    cfg = compose([f"data.site_dirs=[{tmp_path / 'nowhere'}]"])
    with pytest.raises(DataError, match="nowhere.*no dataset.json"):
        resolve_site_dirs(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "good"]


def test_two_site_dirs_with_the_same_name_are_refused(tmp_path):
    a = _hospital_site(tmp_path / "north" / "site")
    b = _hospital_site(tmp_path / "south" / "site", seed=1)
    with pytest.raises(DataError, match=r"\['site'\].*rename"):
        resolve_site_dirs(compose([f"data.site_dirs=[{a},{b}]"]))


def test_site_dirs_set_the_number_of_sites():
    assert compose(["data.site_dirs=[/a,/b]"]).sites == 2
    assert compose(["data.site_dirs=[/a,/b,/c]", "sites=7"]).sites == 3


def test_baseline_on_a_folder_of_real_sites_fails_and_touches_nothing(tmp_path, capsys):
    """The issue: three real sites ``site-0..2`` under data.root, ``sites=4``."""
    root = tmp_path / "hospital-data"
    for s in range(3):
        _hospital_site(root / f"site-{s}", seed=s)
    before = _hashes(root)
    code = main(
        [
            "baseline",
            "local",
            f"data.root={root}",
            "sites=4",
            "rounds=1",
            f"run_root={tmp_path / 'runs'}",
            f"privacy.ledger_root={tmp_path / 'ledgers'}",
        ]
    )
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert str(root) in err and "data.site_dirs" in err, err
    assert _hashes(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["site-0", "site-1", "site-2"]
