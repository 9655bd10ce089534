"""Secure aggregation end to end on the simulation engine: same model as plaintext FedAvg within
quantization error, dropouts, the threshold, and a canary that must never leave its site."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fedhealth.clientapp.egress import EgressLog
from fedhealth.config import compose
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.runs.rundir import read_metrics
from fedhealth.simulation import simulate

pytestmark = pytest.mark.slow

BASE = [
    "sites=3",
    "data.train_per_site=6",
    "data.test_per_site=3",
    "train.local_epochs=1",
    "rounds=1",
    "privacy=off",
    "strategy.min_sites=2",
]


def _run(root, tmp_path, name, *extra, mods=None):
    cfg = compose(
        [
            *BASE,
            f"data.root={root}",
            f"run_root={tmp_path / 'runs'}",
            f"run_name={name}",
            f"privacy.ledger_root={tmp_path / 'ledgers'}",
            *extra,
        ]
    )
    return simulate(cfg, client_mods=mods)


def test_secure_aggregate_equals_plaintext_fedavg(cohort, tmp_path):
    plain = _run(cohort, tmp_path, "plain", "federation.secure_aggregation=false")
    secure = _run(cohort, tmp_path, "secure", "federation.secure_aggregation=true")
    a, b = plain.checkpoints.load(1), secure.checkpoints.load(1)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < worst < 1e-5, worst  # masked, quantized, but the same mean
    assert read_metrics(secure.path)[1]["train"]["sites"].keys() == {"site-0", "site-1", "site-2"}


def _corrupt(root, site):
    listing = json.loads((root / site / "dataset.json").read_text())
    victim = root / site / listing["training"][0]["image"]
    victim.write_bytes(victim.read_bytes()[:100])


def test_below_the_threshold_the_round_fails_cleanly(cohort, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cohort, root)
    _corrupt(root, "site-1")
    _corrupt(root, "site-2")
    run = _run(root, tmp_path, "below")
    assert "fewer than the 2 required" in run.manifest["stopped"]["reason"]
    assert CheckpointStore(run.path / "checkpoints").rounds() == [0], "global model unchanged"


def test_a_canary_in_a_sites_images_never_leaves_it(cohort, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cohort, root)
    canary_text = "CANARY-7f3a9c"
    canary = np.frombuffer(b"\xde\xad\xbe\xef\x13\x37\xc0\xde", dtype=np.float32)  # 2 voxels
    listing = json.loads((root / "site-0" / "dataset.json").read_text())
    for entry in listing["training"] + listing["test"]:
        path = root / "site-0" / entry["image"]
        image = nib.load(path)
        voxels = np.asarray(image.dataobj, dtype=np.float32).copy()
        voxels.flat[:2] = canary
        nib.save(nib.Nifti1Image(voxels, image.affine), str(path))
        entry["patient"] = f"{canary_text}-{entry['patient']}"
    (root / "site-0" / "dataset.json").write_text(json.dumps(listing))

    log = tmp_path / "egress" / "site.jsonl"
    _run(root, tmp_path, "canary", "privacy=dp", "rounds=2", mods=[EgressLog(log, raw=True)])
    sent = log.with_suffix(".bin").read_bytes()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert {x["type"] for x in lines} >= {"train.secagg_mask", "train.secagg_unmask", "evaluate"}
    assert len(sent) > 100_000, "the capture saw the model updates"
    assert canary.tobytes() not in sent
    assert canary_text.encode() not in sent and b"site000_case" not in sent
    # the control: the canary really is in the images the site trained on
    trained_on = nib.load(root / "site-0" / listing["training"][0]["image"])
    assert np.asarray(trained_on.dataobj, dtype=np.float32).flat[:2].tobytes() == canary.tobytes()
