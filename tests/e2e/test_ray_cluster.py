"""A simulation across a Ray cluster of two nodes on this machine (head + worker, loopback).

``federation.ray_address`` makes ``fedhealth simulate`` join a running cluster instead of
starting its own Ray; the cluster is Ray's own multi-node harness (``ray.cluster_utils.Cluster``:
the head and the worker are separate raylets with their own CPUs, as ``ray start --head`` and
``ray start --address=...`` make them on two machines).
"""

from __future__ import annotations

import os

import pytest

from fedhealth.config import compose
from fedhealth.simulation import RAY_LOOPBACK_ENV, ray_loopback_args, simulate

pytestmark = pytest.mark.slow


def test_a_simulation_runs_across_a_head_and_a_worker_node(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv(RAY_LOOPBACK_ENV, "0")  # every Ray server on 127.0.0.1
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    ray_loopback_args(1)  # and in Ray's constants, when ray was imported before
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        cfg = compose(
            [
                "sites=3",
                "rounds=2",
                "data.train_per_site=6",
                "data.test_per_site=3",
                "train.local_epochs=1",
                f"data.root={cohort}",
                f"run_root={tmp_path / 'runs'}",
                f"privacy.ledger_root={tmp_path / 'ledgers'}",
                "run_name=cluster",
                f"federation.ray_address={cluster.address}",
                "federation.cpus_per_site=1",
                "federation.round_timeout=180",
            ]
        )
        run = simulate(cfg)
        assert run.manifest["rounds_completed"] == 2 and "stopped" not in run.manifest
        ray.init(address=cluster.address)
        actors = [
            a for a in state.actors().values() if "ClientAppActor" in str(a.get("ActorClassName"))
        ]  # from the GCS (dead ones too): where each of Flower's site actors ran
        nodes = {a["Address"]["NodeID"] for a in actors}
        assert len(nodes) == 2, f"the sites ran on {len(nodes)} node(s): {actors}"
        assert len(ray.nodes()) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
