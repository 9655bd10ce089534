"""A warm child installs each FAB once: Flower's ClientApp unpacks the whole FAB and checks every
file's hash for every message; the warm child does that the first time a FAB's exact bytes are
seen, then serves the installed folder. Any other bytes (a tampered FAB, a new one) or a removed
folder go through Flower's install and its checks again."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile

import click
import pytest

from fedhealth.errors import PatchMismatch
from fedhealth.security.apps import build_fab, project_dir
from fedhealth.supernode import clientapp_task as task


@pytest.fixture(scope="module")
def fab() -> bytes:
    return build_fab(project_dir())


@pytest.fixture
def installs(tmp_path, monkeypatch):
    """FLWR_HOME in tmp_path; counts the calls of Flower's own install."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    calls: list[bytes] = []
    real = task.install_from_fab

    def counting(fab_file, *args, **kwargs):
        calls.append(fab_file)
        return real(fab_file, *args, **kwargs)

    monkeypatch.setattr(task, "install_from_fab", counting)
    return calls


def _tampered(fab: bytes) -> bytes:
    """The FAB with one file's bytes changed and its hash list (.info/CONTENT) left as it was."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "fedhealth/__init__.py":
                data += b"\nimport os  # injected\n"
            dst.writestr(item, data)
    return out.getvalue()


def test_a_fab_is_unpacked_once_then_its_installed_folder_is_served(fab, installs, tmp_path):
    first = task.install_once(fab, skip_prompt=True)
    assert (first / "pyproject.toml").is_file()
    assert task.install_once(fab, skip_prompt=True) == first
    assert len(installs) == 1
    record = tmp_path / "home" / task.INSTALLED / hashlib.sha256(fab).hexdigest()
    assert record.read_text(encoding="utf-8") == str(first)
    shutil.rmtree(first)  # the folder gone: installed (and checked) again
    assert task.install_once(fab, skip_prompt=True) == first
    assert len(installs) == 2 and (first / "pyproject.toml").is_file()


def test_a_tampered_fab_is_checked_again_and_refused(fab, installs):
    task.install_once(fab, skip_prompt=True)
    with pytest.raises(click.ClickException, match="hashes"):
        task.install_once(_tampered(fab), skip_prompt=True)
    assert len(installs) == 2


def test_an_install_with_prompts_or_elsewhere_is_never_remembered(fab, installs, tmp_path):
    task.install_once(fab, tmp_path / "elsewhere", skip_prompt=True)
    task.install_once(fab, tmp_path / "elsewhere", skip_prompt=True)
    assert len(installs) == 2
    assert not (tmp_path / "home" / task.INSTALLED).exists()


def test_the_patch_is_idempotent_and_checks_its_target(monkeypatch):
    module = task.run_clientapp_module
    monkeypatch.setattr(module, "install_from_fab", task.install_from_fab)  # restored after
    task.install_fab_once()
    task.install_fab_once()
    assert module.install_from_fab is task.install_once
    monkeypatch.setattr(module, "install_from_fab", lambda *args, **kwargs: None)
    with pytest.raises(PatchMismatch, match="install_from_fab"):
        task.install_fab_once()
