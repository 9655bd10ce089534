"""Shared fixtures: a small real cohort of NIfTI sites written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhealth.config import Config, compose
from fedhealth.data.synth import write_cohort
from fedhealth.privacy.policy import SitePolicy

SMALL = ["sites=3", "data.train_per_site=6", "data.test_per_site=3", "train.local_epochs=1"]


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, sites=3, seed=0, n_train=6, n_test=3, fov=32)
    return root


@pytest.fixture
def small_cfg(cohort: Path, tmp_path: Path) -> Config:
    return compose([*SMALL, f"data.root={cohort}", f"run_root={tmp_path / 'runs'}"])


@pytest.fixture
def flower_identity():
    """Flower's Message constructor needs a task identity outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


PLAIN_TRAIN_POLICY = SitePolicy(require_secure_aggregation=False).to_json()
"""A node config ``site-policy`` that allows a plain ``train`` instruction (tests of one site)."""
