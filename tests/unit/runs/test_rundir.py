"""A run directory left by a killed coordinator is resumed after its last completed round."""

from __future__ import annotations

import numpy as np
import pytest

from fedhealth.config import compose
from fedhealth.errors import CheckpointError, ConfigError
from fedhealth.io import append_line
from fedhealth.runs.rundir import RunDir, read_jsonl, read_metrics
from fedhealth.serverapp.app import run_federation


def _cfg(tmp_path, *extra):
    return compose([f"run_root={tmp_path}", "run_name=r", "rounds=5", *extra])


def test_resume_after_last_completed_round_drops_partial_lines(tmp_path):
    cfg = _cfg(tmp_path)
    first = RunDir.create(cfg)
    for r in range(3):
        first.end_round(r, {"w": np.full(3, r, np.float32)})
    append_line(first.metrics, '{"round": 3, "partial": true}')  # killed before the manifest
    append_line(first.privacy, '{"round": 3, "site": "a", "status": "trained"}')
    again = RunDir.create(cfg)
    assert again.resumed_from == 2 and again.key == first.key
    assert [ln["round"] for ln in read_metrics(again.path)] == [0, 1, 2]
    assert read_jsonl(again.privacy) == []
    assert again.manifest["resumed"][0]["after_round"] == 2
    np.testing.assert_array_equal(again.checkpoints.load(2)["w"], np.full(3, 2, np.float32))


def test_other_config_is_refused_and_a_finished_run_is_left_alone(tmp_path):
    run = RunDir.create(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="different configuration"):
        RunDir.create(_cfg(tmp_path, "train.lr=0.5"))
    run.finish()
    again = RunDir.create(_cfg(tmp_path))
    assert again.finished and again.resumed_from is None
    run_federation(None, _cfg(tmp_path), again)  # nothing to do: no grid needed
    assert read_metrics(again.path) == []


def test_a_corrupt_checkpoint_is_never_loaded_on_resume(tmp_path):
    cfg = _cfg(tmp_path, "model=unet")
    run = RunDir.create(cfg)
    run.end_round(0, {"w": np.zeros(3, np.float32)})
    path = run.checkpoints.path(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="round-0000.safetensors: sha256"):
        run_federation(None, cfg, RunDir.create(cfg))  # fails before any message is sent


def test_a_run_that_died_before_its_initial_checkpoint_starts_afresh(tmp_path):
    """Nothing to resume (no round-0 checkpoint recorded): a resubmitted run starts from the
    seeded initial model instead of failing on a checkpoint that was never written."""
    cfg = _cfg(tmp_path)
    RunDir.create(cfg)  # manifest written, then the ServerApp died before round 0's checkpoint
    again = RunDir.create(cfg)
    assert again.resumed_from is None and not again.finished
    again.end_round(0, {"w": np.zeros(3, np.float32)})
    assert RunDir.create(cfg).resumed_from == 0  # from here on, a resume


def test_a_last_line_cut_mid_write_is_left_out_and_any_other_bad_line_raises(tmp_path):
    import json as _json

    import pytest

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "tra')  # Ctrl-C mid-append
    assert read_jsonl(path) == [{"round": 0}, {"round": 1}]
    path.write_text('{"round": 0}\n{"round": 1, "tra\n{"round": 2}\n')  # not the crash's line
    with pytest.raises(_json.JSONDecodeError):
        read_jsonl(path)
