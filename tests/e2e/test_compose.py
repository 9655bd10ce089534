"""docker/docker-compose.yml: validated by docker-compose (no engine needed) and its topology run
from the file itself as local processes on loopback (same commands, environment and volumes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedhealth.reports.privacy import from_ledgers
from fedhealth.runs.rundir import read_metrics
from fedhealth.testing import compose
from fedhealth.testing.loopback import free_ports

PROJECT = Path(__file__).resolve().parents[2]
COMPOSE = PROJECT / "docker" / "docker-compose.yml"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
ONE_SHOT = {"provision-keys", "synth-data", "launch"}


def _compose_cli() -> list[str]:
    """docker-compose, or skip only where it is absent and setup.sh could not have installed it."""
    cmd = compose.compose_command()
    if cmd is not None:
        return cmd
    installable = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if installable:
        pytest.fail(
            "docker-compose is not installed, but could be: run scripts/setup.sh "
            "(it installs Debian's docker-compose when run as root with apt-get)"
        )
    pytest.skip(
        "docker-compose is not installed and cannot be installed here (needs root and "
        "apt-get; scripts/setup.sh tries): the compose file was not validated"
    )


def test_validation_ignores_this_interpreters_python_path(monkeypatch):
    """Ray (Flower's simulation engine) leaves PYTHONPATH pointing into this venv; Debian's
    docker-compose, a program of the system's Python, must not import our packages."""
    _compose_cli()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # what Ray leaves behind
    assert "hospital-a" in compose.config_output(COMPOSE, {})


def test_docker_compose_config_validates_the_topology():
    cmd = _compose_cli()
    done = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

    project = compose.load(COMPOSE, use_compose=True)
    assert set(project.services) == {
        "provision-keys",
        "synth-data",
        "coordinator",
        *HOSPITALS,
        "launch",
    }
    assert {s.name for s in project.services.values() if s.one_shot} == ONE_SHOT
    roles = {n: s.role for n, s in project.services.items()}
    assert roles == {
        "provision-keys": "provision",
        "synth-data": "provision",
        "coordinator": "coordinator",
        "launch": "launcher",
        **{h: "hospital" for h in HOSPITALS},
    }
    assert compose.isolation_problems(project) == []

    for h in HOSPITALS:
        svc = project.services[h]
        mounts = {m.target: m for m in svc.mounts}
        assert set(mounts) == {
            "/fedhealth/data",
            "/fedhealth/keys",
            "/fedhealth/ledger",
            "/fedhealth/state",
        }
        assert {m.source for m in svc.mounts} == {
            f"{h}-data",
            f"{h}-keys",
            f"{h}-ledger",
            f"{h}-state",
        }
        assert mounts["/fedhealth/data"].read_only and mounts["/fedhealth/keys"].read_only
        assert svc.argv[:3] == ["fedhealth", "site", "run"]
        assert svc.depends_on == {
            "provision-keys": "service_completed_successfully",
            "synth-data": "service_completed_successfully",
            "coordinator": "service_healthy",
        }
        assert svc.networks == [f"{h}-net"]
    coordinator = project.services["coordinator"]
    assert coordinator.argv[:3] == ["fedhealth", "server", "run"]
    assert coordinator.healthcheck and not coordinator.one_shot
    assert not any(m.source.startswith("hospital-") for m in coordinator.mounts)
    # one door: only the gRPC Fleet API is published; the Control API stays on the coordinator's
    # loopback, reached by the launcher from inside the coordinator's network namespace
    assert [p.rsplit(":", 1)[-1] for p in coordinator.ports] == ["9092"]
    assert "control_port=9093" in coordinator.command
    launch = project.services["launch"]
    assert launch.network_mode == "service:coordinator" and not launch.networks
    assert "127.0.0.1:9093" in launch.command
    assert launch.argv[:3] == ["fedhealth", "server", "launch"]
    assert launch.depends_on == {
        "coordinator": "service_healthy",
        **{h: "service_healthy" for h in HOSPITALS},
    }
    assert {m.source for m in launch.mounts} & {"runs"} and {
        m.target for m in launch.mounts if m.source == "runs"
    } == {m.target for m in coordinator.mounts if m.source == "runs"}
    # the private keys: generated straight into each hospital's key volume, nowhere else
    keys = project.services["provision-keys"]
    for h in HOSPITALS:
        assert f"fedhealth certs site {h} --dir /provision/keys/{h}" in keys.command[0]
        assert {m.source for m in keys.mounts if m.target == f"/provision/keys/{h}"} == {
            f"{h}-keys"
        }
    assert "--server-name coordinator localhost 127.0.0.1" in keys.command[0]
    synth = project.services["synth-data"]
    assert {m.target: m.source for m in synth.mounts} == {
        f"/provision/data/site-{i}": f"{h}-data" for i, h in enumerate(HOSPITALS)
    }

    # every port is a variable with a default, and the variables change what docker-compose prints
    names = compose.port_variables(COMPOSE)
    assert set(names) == {
        "FEDHEALTH_PORT",
        "FEDHEALTH_CONTROL_PORT",
        "FEDHEALTH_APPIO_PORT_A",
        "FEDHEALTH_APPIO_PORT_B",
        "FEDHEALTH_APPIO_PORT_C",
    }
    moved = compose.load(
        COMPOSE, {"FEDHEALTH_PORT": "19092", "FEDHEALTH_CONTROL_PORT": "19093"}, use_compose=True
    )
    assert "coordinator=coordinator:19092" in moved.services["hospital-b"].command
    assert "port=19092" in moved.services["coordinator"].command
    assert "control_port=19093" in moved.services["coordinator"].command
    assert "127.0.0.1:19093" in moved.services["launch"].command

    # the local reader (no docker-compose) sees the same services
    local = compose.load(COMPOSE, use_compose=False)
    assert local.services == project.services


def test_isolation_check_catches_a_shared_volume():
    project = compose.load(COMPOSE, use_compose=False)
    assert compose.isolation_problems(project) == []
    b = project.services["hospital-b"]
    stolen = compose.Mount("hospital-a-data", "/fedhealth/other", "volume", True)
    project.services["hospital-b"] = replace(b, mounts=[*b.mounts, stolen])
    coord = project.services["coordinator"]
    project.services["coordinator"] = replace(
        coord, mounts=[*coord.mounts, compose.Mount("hospital-c-ledger", "/x", "volume")]
    )
    problems = compose.isolation_problems(project)
    assert any("hospital-a-data" in p and "hospital-b" in p for p in problems), problems
    assert any("hospital-c-ledger" in p and "coordinator" in p for p in problems), problems
    with pytest.raises(compose.ComposeError, match="isolation"):
        compose.assert_isolated(project)


def test_rewriter_maps_container_paths_and_service_hosts(tmp_path):
    project = compose.load(COMPOSE, use_compose=False)
    topo = compose.LocalTopology(project, tmp_path, time.monotonic() + 30)
    synth = project.services["synth-data"]
    rewrite, _, _ = topo.view.prepare(synth)
    script = rewrite(synth.command[0])
    assert f"data.root={tmp_path}/fs/synth-data/provision/data " in script
    assert (tmp_path / "fs/synth-data/provision/data/site-1").resolve() == (
        tmp_path / "volumes/hospital-b-data"
    ).resolve()
    site = project.services["hospital-c"]
    rewrite, _, _ = topo.view.prepare(site)
    argv = topo.view.argv(site.argv, rewrite)
    assert argv[0].endswith("/fedhealth") and Path(argv[0]).is_file()
    assert f"data_dir={tmp_path}/volumes/hospital-c-data" in argv
    assert f"auth_key={tmp_path}/volumes/hospital-c-keys/sites/hospital-c/auth.key" in argv
    assert "coordinator=127.0.0.1:9092" in argv and "name=hospital-c" in argv
    coordinator = project.services["coordinator"]
    topo.view.prepare(coordinator)
    config = (tmp_path / "fs/coordinator/etc/fedhealth/coordinator.yaml").read_text()
    assert f"ca: {tmp_path}/volumes/coordinator-pki/ca.crt" in config
    assert f"state_dir: {tmp_path}/volumes/coordinator-state" in config
    launch = project.services["launch"]
    rewrite, _, _ = topo.view.prepare(launch)
    argv = topo.view.argv(launch.argv, rewrite)
    assert "127.0.0.1:9093" in argv
    assert f"{tmp_path}/volumes/launcher-ca/ca.crt" in argv  # the CA certificate only


@pytest.mark.slow
def test_compose_topology_runs_as_local_processes(tmp_path):
    names = compose.port_variables(COMPOSE)
    variables = {name: str(port) for name, port in zip(names, free_ports(len(names)), strict=True)}
    variables.update(
        FEDHEALTH_BIND_HOST="127.0.0.1",
        FEDHEALTH_ROUNDS="2",
        FEDHEALTH_RUN_NAME="compose",
        FEDHEALTH_TRAIN_PER_SITE="6",
        FEDHEALTH_TEST_PER_SITE="3",
        FEDHEALTH_FOV="32",
        FEDHEALTH_ROUND_TIMEOUT="240",
    )
    # the operator's door: `fedhealth compose up` (no engine here: local processes)
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "fedhealth"),
            "compose",
            "up",
            "--local",
            "--file",
            str(COMPOSE),
            "--workdir",
            str(tmp_path),
            "--timeout",
            "600",
            *(f"{k}={v}" for k, v in variables.items()),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    logs = {p.stem: p.read_text(errors="replace")[-3000:] for p in (tmp_path / "logs").glob("*")}
    assert done.returncode == 0, (done.stdout, done.stderr, logs)
    assert "launch exit code 0" in done.stdout, done.stdout
    run_dir = tmp_path / "volumes" / "runs" / "compose"
    assert f"report: {run_dir / 'privacy-report.html'}" in done.stdout, done.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["finished"] and manifest["rounds_completed"] == 2, manifest
    assert "stopped" not in manifest
    for name in ("privacy-report.html", "privacy-report.json", "privacy-report.md"):
        assert (run_dir / name).is_file(), sorted(p.name for p in run_dir.iterdir())
    report = json.loads((run_dir / "privacy-report.json").read_text())
    assert sorted(s["site"] for s in report["sites"]) == list(HOSPITALS)
    # minimal outputs: the coordinator got each hospital's epsilon, not its DP history; each
    # hospital's own ledger report recomputes every epsilon with dp-accounting
    assert report["withheld"] == list(HOSPITALS) and not report["all_agree"]
    assert "kept its DP history at the site" in report["explanation"]
    lines = read_metrics(run_dir)
    for line in lines[1:]:
        for site, metrics in line["train"]["sites"].items():
            leaked = {"loss", "num-examples", "sample-rate", "noise-multiplier"} & set(metrics)
            assert not leaked, (site, leaked)
        assert line["train"]["secure_sum"]["sites"] == len(HOSPITALS)
    for hospital in HOSPITALS:
        own = from_ledgers([tmp_path / "volumes" / f"{hospital}-ledger" / "ledger.sqlite"])
        assert own.all_agree and not own.withheld, hospital

    # each hospital's ledger and private key only in its own volumes
    volumes = tmp_path / "volumes"
    ledgers = sorted(p.relative_to(volumes).parts[0] for p in volumes.rglob("ledger.sqlite"))
    assert ledgers == [f"{h}-ledger" for h in HOSPITALS]
    keys = sorted(p.relative_to(volumes).as_posix() for p in volumes.rglob("auth.key"))
    assert keys == [f"{h}-keys/sites/{h}/auth.key" for h in HOSPITALS]
    assert not any(volumes.glob("coordinator-*/**/auth.key"))
    datasets = sorted(p.relative_to(volumes).parts[0] for p in volumes.rglob("dataset.json"))
    assert datasets == [f"{h}-data" for h in HOSPITALS]
    print(done.stdout.splitlines()[1])  # "topology finished in N s; ..."
