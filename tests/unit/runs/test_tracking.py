"""MLflow tracking of a run directory: params, per-round metrics, resume, a store that fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fedhealth.config import compose
from fedhealth.runs.rundir import RunDir
from fedhealth.runs.tracking import Tracker, attach, metrics_of_line


def _line(server_round: int) -> dict:
    return {
        "round": server_round,
        "train": {
            "sites": {"site-a": {"epsilon": 0.5 * server_round}, "site-b": {"epsilon": 0.4}},
            "weighted": {"loss": 1.0 / server_round},
        },
        "evaluate": {
            "sites": {
                "site-a": {
                    "dice": 0.1 * server_round,
                    "dice-1": 0.2,
                    "loss": 0.9,
                    "num-examples": 4,
                },
                "site-b": {"dice": 0.3, "dice-1": 0.3, "loss": 0.8, "num-examples": 2},
            },
            "weighted": {"dice": 0.2 * server_round, "loss": 0.85},
        },
    }


def test_a_line_becomes_weighted_per_site_and_epsilon_metrics_only():
    metrics = metrics_of_line(_line(2))
    assert metrics == {
        "dice": 0.4,
        "loss": 0.85,
        "train_loss": 0.5,
        "dice/site-a": pytest.approx(0.2),
        "dice-1/site-a": 0.2,
        "loss/site-a": 0.9,
        "dice/site-b": 0.3,
        "dice-1/site-b": 0.3,
        "loss/site-b": 0.8,
        "epsilon/site-a": 1.0,
        "epsilon/site-b": 0.4,
    }


def test_every_round_reads_back_and_a_resumed_run_logs_into_the_same_mlflow_run(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "run_name=tracked", "rounds=3"])
    run_dir = RunDir(tmp_path / "tracked", cfg)
    tracker = Tracker(run_dir, cfg)
    tracker.log_lines([_line(1), _line(2)])
    run_dir.end_round(1, {"w": np.zeros(2, np.float32)})
    manifest = json.loads((run_dir.path / "manifest.json").read_text())
    assert manifest["mlflow"]["run_id"] == tracker.run_id

    again = Tracker(RunDir(tmp_path / "tracked", cfg), cfg)  # the coordinator restarted
    assert again.run_id == tracker.run_id
    again.log_lines([_line(3)])
    again.end()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(tracker.run_id, "dice")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 0.2), (2, 0.4), (3, 0.6)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "3" and run.data.params["data.patch_size"] == "32"
    assert client.get_experiment(run.info.experiment_id).name == "fedhealth"


def test_reports_written_after_the_run_are_attached(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "run_name=r"])
    run_dir = RunDir(tmp_path / "r", cfg)
    tracker = Tracker(run_dir, cfg)
    report = tmp_path / "r" / "privacy-report.md"
    report.write_text("# report\n")
    hint = attach(run_dir.path, [report, tmp_path / "missing.html"])
    assert hint is not None and hint.startswith("mlflow ui --backend-store-uri sqlite:///")
    client = MlflowClient(tracking_uri=tracker.uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "reports")] == [
        "reports/privacy-report.md"
    ]
    assert attach(tmp_path / "nowhere", [report]) is None


def test_a_store_that_fails_mid_run_is_logged_and_training_goes_on(tmp_path, caplog):
    cfg = compose([f"run_root={tmp_path}", "run_name=r"])
    tracker = Tracker(RunDir(tmp_path / "r", cfg), cfg)
    tracker.run_id = "no-such-run"
    tracker.log_lines([_line(1)])  # does not raise
    assert "could not log metrics" in caplog.text
