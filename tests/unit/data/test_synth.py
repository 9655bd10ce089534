import json

import nibabel as nib
import numpy as np

from fedhealth.data.synth import site_profile, write_site


def test_same_seed_same_voxels(tmp_path):
    a = write_site(tmp_path / "a", site=1, seed=3, n_train=2, n_test=1, fov=32, heterogeneity=1.0)
    b = write_site(tmp_path / "b", site=1, seed=3, n_train=2, n_test=1, fov=32, heterogeneity=1.0)
    for item in json.loads(a.read_text())["training"]:
        va = nib.load(a.parent / item["image"]).get_fdata()
        vb = nib.load(b.parent / item["image"]).get_fdata()
        np.testing.assert_array_equal(va, vb)


def test_sites_have_different_scanners_and_are_non_iid():
    profiles = [site_profile(s, seed=0) for s in range(4)]
    assert len({p.spacing for p in profiles}) == 4
    assert len({p.scale for p in profiles}) == 4
    assert site_profile(0, seed=0, heterogeneity=0.0) == site_profile(3, seed=0, heterogeneity=0.0)


def test_decathlon_datalist_one_volume_per_patient(tmp_path):
    path = write_site(tmp_path, site=0, seed=0, n_train=3, n_test=2, fov=32, heterogeneity=1.0)
    ds = json.loads(path.read_text())
    assert ds["numTraining"] == 3 and ds["numTest"] == 2
    assert ds["labels"] == {"0": "background", "1": "lesion"}
    entries = ds["training"] + ds["test"]
    assert len({e["patient"] for e in entries}) == len(entries) == 5
    for entry in entries:
        image = nib.load(tmp_path / entry["image"])
        label = nib.load(tmp_path / entry["label"])
        assert image.shape == label.shape
        assert np.allclose(np.diag(image.affine)[:3], ds["scanner_profile"]["spacing"])
        assert set(np.unique(label.get_fdata())) <= {0.0, 1.0}
        assert label.get_fdata().sum() > 0, "every patient has at least one lesion"
