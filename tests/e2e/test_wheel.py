"""The built wheel, installed (not editable) into a fresh venv outside the source tree, runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LEFT_OUT = (
    ".git",
    ".venv",
    "build",
    "dist",
    ".pytest_cache",
    "runs",
    "data",
    "ledgers",
    "outputs",
    ".flwr-home",
    "certs",
)  # top-level folders that are not sources


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources: setuptools reuses a build/ folder, and one left in the
    # tree by an earlier build could carry modules that no longer exist.
    source = out / "source"

    def left_out(folder: str, names: list[str]) -> set[str]:
        anywhere = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return anywhere | (set(names) & set(LEFT_OUT) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, source, ignore=left_out)
    # No build isolation: the setuptools of this environment builds it (no download needed).
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        cwd=out,
        timeout=300,
    )
    (path,) = out.glob("fedhealth-*.whl")
    return path


def test_fedhealth_is_the_only_top_level_name_and_the_configs_ship(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "fedhealth",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "fedhealth/configs/config.yaml" in names
    assert "fedhealth/configs/strategy/fedadam.yaml" in names
    assert not any(n.startswith(("server/", "clients/", "tests/")) for n in names)


def test_installed_wheel_runs_a_simulation_outside_the_source_tree(
    wheel: Path, tmp_path: Path
) -> None:
    # A fresh venv whose only fedhealth is the wheel. Its dependencies (torch, Flower, MONAI,
    # ...: 1.5 GB) come from this environment's site-packages as a plain path entry, so the
    # editable install of the source tree there stays inactive (its .pth is not processed).
    # Flower's Ray simulation leaves PYTHONPATH (this environment's site-packages) in os.environ
    # when a simulation ran earlier in this process: every command here runs without it.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FEDHEALTH_CONFIG_DIR")
    }
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    python = fresh / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        cwd=tmp_path,
        timeout=60,
        env=env,
    ).strip()
    # The wheel first: with this environment on its path, pip would take the editable
    # fedhealth there for an installed one and skip the wheel.
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
        cwd=tmp_path,
        timeout=300,
        env=env,
    )
    Path(purelib, "fedhealth-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(
        [
            str(python),
            "-c",
            "import fedhealth, fedhealth.configs as c; "
            "print(fedhealth.__file__); print(c.__file__)",
        ],
        cwd=work,
        timeout=60,
        env=env,
    )
    assert all(line.startswith(purelib) for line in where.split()), where
    probe = subprocess.run(
        [str(python), "-c", "import server"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode != 0 and "No module named 'server'" in probe.stderr

    _run(
        [
            str(fresh / "bin" / "fedhealth"),
            "simulate",
            "sites=2",
            "rounds=1",
            "run_name=wheel",
            "data.train_per_site=4",
            "data.test_per_site=2",
            "train.batch_size=2",
        ],
        cwd=work,
        timeout=600,
        env=env,
    )
    manifest = json.loads((work / "runs" / "wheel" / "manifest.json").read_text())
    assert manifest["rounds_completed"] == 1 and manifest["finished"]
    assert (work / "runs" / "wheel" / "privacy-report.html").is_file()
    assert not (ROOT / "runs" / "wheel").exists()
