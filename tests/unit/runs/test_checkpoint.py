import json

import numpy as np
import pytest

from fedhealth.config import compose
from fedhealth.errors import CheckpointError
from fedhealth.io import sha256_file
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.runs.rundir import RunDir, read_metrics


def test_checkpoint_round_trip_and_tamper_detection(tmp_path):
    store = CheckpointStore(tmp_path)
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32)}
    path, digest = store.save(2, arrays)
    assert sha256_file(path) == digest and store.rounds() == [2]
    loaded = store.load(2)
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="round-0002"):
        store.load(2)
    with pytest.raises(CheckpointError, match="round 5"):
        store.load(5)


def test_checkpoints_are_not_pickles(tmp_path):
    path, _ = CheckpointStore(tmp_path).save(0, {"w": np.zeros(2, np.float32)})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])  # safetensors: JSON header
    assert header["w"]["dtype"] == "F32"


def test_run_dir_records_config_metrics_and_manifest(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "run_name=r1", "rounds=1"])
    run = RunDir.create(cfg)
    run.end_round(0, {"w": np.zeros(2, np.float32)})
    entry = run.log(1)
    entry.train = {
        "site-0": {"loss": 1.0, "num-examples": 2},
        "site-1": {"loss": 0.0, "num-examples": 6},
    }
    entry.evaluate = {
        "site-0": {"dice": 0.2, "loss": 1.0, "num-examples": 1},
        "site-1": {"dice": 0.8, "loss": 0.5, "num-examples": 3},
    }
    run.end_round(1, {"w": np.ones(2, np.float32)})
    run.finish()
    lines = read_metrics(run.path)
    assert [line["round"] for line in lines] == [0, 1]
    assert lines[1]["evaluate"]["weighted"]["dice"] == pytest.approx((0.2 + 3 * 0.8) / 4)
    assert lines[1]["train"]["weighted"]["loss"] == pytest.approx(6 * 0.0 / 8 + 2 * 1.0 / 8)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["rounds_completed"] == 1 and manifest["finished"]
    assert manifest["checkpoints"]["round-0001.safetensors"] == sha256_file(
        run.path / "checkpoints" / "round-0001.safetensors"
    )
    assert "flwr" in manifest["versions"] and (run.path / "config.yaml").is_file()
