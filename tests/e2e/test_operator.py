"""The operator follows and stops a deployed run by name: ``fedhealth server status`` and
``fedhealth server stop`` against a real coordinator service (TLS, enrolled site daemons) and a
real ``fedhealth server launch`` on loopback."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from fedhealth.superlink.runview import round_figures
from fedhealth.testing.loopback import BIN

from .consortium import Consortium

pytestmark = pytest.mark.slow

RUN = ["train.local_epochs=1", "federation.round_timeout=90", "strategy.min_sites=3"]


def _operator(c: Consortium, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `fedhealth server <args>` as the operator on the coordinator host does."""
    settings = [
        f"ca={c.certs / 'ca.crt'}",
        f"enrolled={c.certs}",
        f"state_dir={c.root / 'coordinator'}",
        "host=127.0.0.1",
        f"control_port={c.control}",
        f"port={c.port}",
    ]
    return subprocess.run(
        [str(BIN / "fedhealth"), "server", *args, *settings],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _status(c: Consortium) -> dict[str, Any]:
    done = _operator(c, "status", "--json", "--run-root", str(c.root / "runs"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_deployed_run_is_followed_with_status_and_stopped_by_name(cohort, tmp_path):
    c = Consortium(tmp_path, cohort, sites=3)
    run_dir = tmp_path / "runs" / "watched"
    try:
        c.start_coordinator()
        for name in c.names:
            c.start_site(name)
        c.wait_connected(c.names)
        launch = c.procs.start(
            "launch",
            [
                "fedhealth",
                "server",
                "launch",
                "--ca",
                str(c.certs / "ca.crt"),
                "--state-dir",  # the coordinator's own state dir, as `--config coordinator.yaml`
                str(tmp_path / "coordinator"),
                "--address",
                f"127.0.0.1:{c.control}",
                *RUN,
                "rounds=30",
                f"run_root={run_dir.parent}",
                "run_name=watched",
            ],
        )
        # round 1's metrics line is written when its folded evaluation arrives with round 2
        c.wait(lambda: round_figures(run_dir), 400, "round 1's labelled line of the launched run")
        status = _status(c)
        assert status["coordinator"] == "running"
        online = sorted(s["name"] for s in status["sites"] if s["status"] == "online")
        assert online == c.names, status["sites"]
        run = next(r for r in status["runs"] if r["run"] == "watched")
        assert run["state"] == "running" and run["rounds"] >= 1 and run["planned"] == 30, run
        assert run["flower_status"] == "running" and isinstance(run["flower_run_id"], int), run
        text = _operator(c, "status", "--run-root", str(c.root / "runs")).stdout
        assert "sites online: site-0, site-1, site-2" in text and "watched" in text, text

        stop = _operator(c, "stop", "watched")
        assert stop.returncode == 0, stop.stderr
        assert f"stop sent to Flower run {run['flower_run_id']}" in stop.stdout
        assert c.wait_exit(launch, 240) == 1, c.log("launch")  # stopped: not every round
        log = c.log("launch")
        assert "run stopped by the operator" in log and "resubmitting" not in log, log
        assert "Traceback" not in log, log
        assert "round 1/30: Dice" in log, log  # the launcher's labelled line per round
        assert (run_dir / "training-report.html").is_file(), log  # reports of the rounds done
        after = next(r for r in _status(c)["runs"] if r["run"] == "watched")
        assert after["state"] == "stopped by the operator", after
        assert after["flower_status"] == "finished:stopped" and after["rounds"] < 30, after
        # the stopped run was not submitted again: one Flower run for it
        record = json.loads(
            (tmp_path / "coordinator" / "launcher" / "runs" / "watched.json").read_text()
        )
        assert record["flower_run_ids"] == [run["flower_run_id"]] and record["stop_requested"]
    finally:
        c.stop()
