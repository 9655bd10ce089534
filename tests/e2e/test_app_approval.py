"""Sites and the coordinator run only approved apps: a real SuperLink (ServerApps through
fedhealth's approving executor) and a site SuperNode through the paced launcher with its app gate.

The approved FAB (this project) trains. A FAB with one file changed (its ClientApp would leave a
marker file) is refused by the site before any of its code runs, and the ServerApp files the
catalogued refusal under the site's name. A FAB the coordinator never approved never starts its
ServerApp: the run ends failed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fedhealth.config import compose
from fedhealth.runs.rundir import read_metrics
from fedhealth.security.apps import build_fab, fab_sha256
from fedhealth.serverapp.runconfig import write_run_config
from fedhealth.testing.loopback import (
    BIN,
    Procs,
    flower_env,
    flwr,
    free_ports,
    node_policy,
    superlink_listen,
)

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]


def _variant(fab: bytes, root: Path, marker: Path) -> Path:
    """The project as packed in ``fab``, with its ClientApp changed to leave ``marker``."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        for name in archive.namelist():
            if not name.startswith(".info/"):
                archive.extract(name, root)
    client = root / "clients" / "client_app.py"
    client.write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n" + client.read_text()
    )
    return root


def _wait_finished(env: dict[str, str], run_id: int, cwd: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = flwr(env, ["ls", "e2e", "--run-id", str(run_id)], cwd=cwd, timeout=60)["runs"]
        if runs and runs[0]["status"].startswith("finished"):
            return str(runs[0]["status"])
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished within {timeout}s")


def _submit(env: dict[str, str], app: Path, run_config: Path, cwd: Path) -> int:
    return int(
        flwr(env, ["run", str(app), "e2e", "--run-config", str(run_config)], cwd, 300)["run-id"]
    )


def test_only_approved_apps_run_at_the_site_and_the_coordinator(cohort, tmp_path):
    approved_fab = build_fab(PROJECT)
    approved = fab_sha256(approved_fab)
    marker = tmp_path / "unapproved-clientapp-ran"
    tampered = _variant(approved_fab, tmp_path / "tampered", marker)
    tampered_hash = fab_sha256(build_fab(tampered))
    rogue = _variant(approved_fab, tmp_path / "rogue", tmp_path / "rogue-ran")
    (rogue / "server" / "server_app.py").write_text(
        "# never approved at the coordinator\n" + (rogue / "server" / "server_app.py").read_text()
    )
    assert len({approved, tampered_hash, fab_sha256(build_fab(rogue))}) == 3

    env = flower_env(tmp_path / "flwr-home")
    procs = Procs(tmp_path, env)
    link, control, appio = free_ports(3)
    site_apps = tmp_path / "site-state" / "apps.jsonl"
    coordinator_apps = tmp_path / "coordinator-apps.jsonl"
    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                *superlink_listen(link, control),
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
                "--isolation",
                "process",
            ],
        )
        procs.wait_port(link)
        procs.wait_port(control)
        procs.start(
            "appexec",
            [
                sys.executable,
                "-m",
                "fedhealth.superlink.appexec",
                "--runtime-api-address",
                f"127.0.0.1:{control}",
                "--insecure",
                "--apps-log",
                str(coordinator_apps),
                *("--approved-app", approved, "--approved-app", tampered_hash),
            ],
        )
        procs.start(
            "site",
            [
                sys.executable,
                "-m",
                "fedhealth.supernode.paced",
                "--enforce-approval",
                *("--site-name", "hospital-0", "--apps-log", str(site_apps)),
                *("--approved-app", approved),
                "--",
                "--insecure",
                *("--superlink", f"127.0.0.1:{link}", "--port", str(appio)),
                "--node-config",
                f"data-dir='{Path(cohort) / 'site-0'}' site-name='hospital-0' "
                f"ledger-dir='{tmp_path / 'ledger'}' epsilon-cap=8.0 delta=1e-5 "
                + node_policy(require_secure_aggregation=False),  # one site, plain rounds
            ],
        )
        home = tmp_path / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{control}"\n'
            "insecure = true\n"
        )

        def run_config(name: str) -> Path:
            cfg = compose(
                [
                    "sites=1",
                    "rounds=1",
                    "train.local_epochs=1",
                    f"run_root={tmp_path / 'runs'}",
                    f"run_name={name}",
                    "federation.round_timeout=120",
                    "federation.secure_aggregation=false",
                ]
            )
            return write_run_config(cfg, tmp_path / f"{name}.toml")

        # the coordinator never approved this one: its ServerApp does not start
        rogue_id = _submit(env, rogue, run_config("rogue"), tmp_path)
        assert _wait_finished(env, rogue_id, tmp_path, 120) == "finished:failed"
        assert not (tmp_path / "runs" / "rogue").exists()  # no ServerApp code ran

        # approved at the coordinator, not at the site: refused there before any code ran
        tampered_id = _submit(env, tampered, run_config("tampered"), tmp_path)
        _wait_finished(env, tampered_id, tmp_path, 300)
        server_log = subprocess.run(
            [str(BIN / "flwr"), "log", str(tampered_id), "e2e", "--show"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

        ok_id = _submit(env, PROJECT, run_config("approved"), tmp_path)
        status = _wait_finished(env, ok_id, tmp_path, 420)
        assert status == "finished:completed", procs.logs()
    finally:
        procs.stop()

    assert not marker.exists(), "the unapproved ClientApp ran at the site"
    assert "app not approved at site hospital-0 (E1006)" in server_log, server_log[-3000:]
    manifest = json.loads((tmp_path / "runs" / "tampered" / "manifest.json").read_text())
    assert manifest["rounds_completed"] == 0
    assert "rejected: ['hospital-0']" in manifest["stopped"]["reason"]
    assert set(read_metrics(tmp_path / "runs" / "approved")[-1]["train"]["sites"]) == {"hospital-0"}

    decisions = [json.loads(line) for line in site_apps.read_text().splitlines()]
    by_run = {d["run_id"]: d for d in decisions}
    assert by_run[tampered_id]["decision"] == "refused"
    assert by_run[tampered_id]["sha256"] == tampered_hash
    assert by_run[ok_id]["decision"] == "approved" and by_run[ok_id]["sha256"] == approved
    assert rogue_id not in by_run  # no message of that run ever reached the site
    assert f"APP REFUSED for run {tampered_id}" in (tmp_path / "site.log").read_text()

    coordinator = [json.loads(line) for line in coordinator_apps.read_text().splitlines()]
    assert [d["decision"] for d in coordinator] == ["refused", "approved", "approved"]
    assert coordinator[1]["sha256"] == tampered_hash and coordinator[2]["sha256"] == approved
