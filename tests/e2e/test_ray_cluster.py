"""A simulation across a Ray cluster of two nodes on this machine (head + worker, loopback).

``federation.ray_address`` makes ``fedhealth simulate`` join a running cluster instead of
starting its own Ray; the cluster is Ray's own multi-node harness (``ray.cluster_utils.Cluster``:
the head and the worker are separate raylets with their own CPUs, as ``ray start --head`` and
``ray start --address=...`` make them on two machines). The scenario runs in its own process, as
a researcher's driver would: connecting to a cluster configures Ray's logging in the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def scenario(cohort: Path, work: Path) -> dict[str, Any]:
    """Start a head and a worker node, simulate on them, and report where the sites ran."""
    from fedhealth.simulation import RAY_LOOPBACK_ENV

    os.environ[RAY_LOOPBACK_ENV] = "0"  # every Ray server on 127.0.0.1
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from fedhealth.config import compose
    from fedhealth.simulation import ray_loopback_args, simulate

    ray_loopback_args(1)  # and in Ray's constants
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
                f"run_root={work / 'runs'}",
                f"privacy.ledger_root={work / 'ledgers'}",
                "run_name=cluster",
                f"federation.ray_address={cluster.address}",
                "federation.cpus_per_site=1",
                "federation.round_timeout=180",
            ]
        )
        run = simulate(cfg)
        ray.init(address=cluster.address)
        actors = [  # from the GCS (dead ones too): where each of Flower's site actors ran
            a for a in state.actors().values() if "ClientAppActor" in str(a.get("ActorClassName"))
        ]
        return {
            "rounds": run.manifest["rounds_completed"],
            "stopped": "stopped" in run.manifest,
            "actor_nodes": sorted({a["Address"]["NodeID"] for a in actors}),
            "actors": len(actors),
            "cluster_nodes": len(ray.nodes()),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_simulation_runs_across_a_head_and_a_worker_node(cohort, tmp_path):
    done = subprocess.run(
        [sys.executable, __file__, str(cohort), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["rounds"] == 2 and not seen["stopped"], seen
    assert seen["cluster_nodes"] == 2, seen
    assert len(seen["actor_nodes"]) == 2, f"the sites ran on one node only: {seen}"


if __name__ == "__main__":
    print(json.dumps(scenario(Path(sys.argv[1]), Path(sys.argv[2]))))
