import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fedhealth.data.loading import make_loader, read_datalist
from fedhealth.errors import DataError


@pytest.fixture
def site(cohort, tmp_path):
    dst = tmp_path / "site"
    shutil.copytree(cohort / "site-1", dst)
    return dst


def test_loads_through_dataset_json_to_common_grid(site):
    data = read_datalist(site / "dataset.json")
    assert len(data.train) == 6 and len(data.test) == 3
    batch = next(iter(make_loader(data.train, 32, 1.0, 2, train=True, seed=0)))
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    assert abs(float(batch["image"].mean())) < 1.0, "intensities are z-scored"


def test_corrupt_nifti_names_the_file(site):
    victim = site / json.loads((site / "dataset.json").read_text())["training"][2]["image"]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 3])  # truncated download
    with pytest.raises(DataError, match=victim.name):
        read_datalist(site / "dataset.json")


def test_garbage_bytes_name_the_file(site):
    victim = site / json.loads((site / "dataset.json").read_text())["test"][0]["label"]
    victim.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match=victim.name):
        read_datalist(site / "dataset.json")


def test_mismatched_label_names_the_file(site):
    entry = json.loads((site / "dataset.json").read_text())["training"][0]
    label = site / entry["label"]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(label))
    with pytest.raises(DataError, match=f"{label.name}.*shape"):
        read_datalist(site / "dataset.json")


def test_missing_file_and_missing_list(site):
    entry = json.loads((site / "dataset.json").read_text())["training"][1]
    (site / entry["image"]).unlink()
    with pytest.raises(DataError, match="file not found"):
        read_datalist(site / "dataset.json")
    (site / "dataset.json").write_text(json.dumps({"test": []}))
    with pytest.raises(DataError, match="training"):
        read_datalist(site / "dataset.json")


def test_a_patient_in_train_and_test_is_flagged_at_load(site, caplog):
    path = site / "dataset.json"
    raw = json.loads(path.read_text())
    leaked = raw["training"][1]["patient"]
    raw["test"][0]["patient"] = leaked  # one patient's scans on both sides of the split
    path.write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="fedhealth.site"):
        data = read_datalist(path)
    assert data.shared == (leaked,)
    assert any(leaked in r.getMessage() and "both" in r.getMessage() for r in caplog.records)


def test_disjoint_splits_and_declared_ids_are_not_flagged(site, caplog):
    with caplog.at_level("WARNING", logger="fedhealth.site"):
        data = read_datalist(site / "dataset.json")
    assert data.shared == () and data.unidentified == ()
    assert not caplog.records


def test_entries_without_patient_ids_are_named_and_refused_for_the_patient_unit(site):
    from fedhealth.data.loading import require_patient_ids
    from fedhealth.errors import PrivacyUnitMissing

    path = site / "dataset.json"
    raw = json.loads(path.read_text())
    for i in (0, 3):
        del raw["training"][i]["patient"]
    for entry in raw["test"]:  # default ids of both lists never count as one shared patient
        del entry["patient"]
    path.write_text(json.dumps(raw))
    data = read_datalist(path)
    assert data.unidentified == (0, 3) and data.shared == ()
    with pytest.raises(PrivacyUnitMissing, match=r"site-x: .*dataset\.json: 2 of 6.*entries 0, 3"):
        require_patient_ids(data, "patient", "site-x")
    require_patient_ids(data, "scan", "site-x")  # declared: each scan is a record
