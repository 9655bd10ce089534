"""The site's app gate inside Flower's SuperNode loop: fits the installed Flower, fails closed."""

from __future__ import annotations

import importlib
import inspect
import json
import stat
import sys
import types

import pytest
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from fedhealth.errors import ErrorCode, PatchMismatch
from fedhealth.security.apps import SIGNATURE_KEY, AppPolicy, fab_sha256
from fedhealth.security.signing import (
    create_publisher_key,
    load_private_key,
    load_trusted_publishers,
    sign_fab,
)
from fedhealth.supernode import approval, paced

FAB = b"PK\x03\x04 approved app" * 20


@pytest.fixture
def flower_loop(monkeypatch):
    """Flower's SuperNode loop module; whatever a test installs is undone afterwards."""
    module = importlib.import_module(approval.MODULE)
    for name in (approval.PULL, approval.VERIFY, approval.REPLY):
        monkeypatch.setattr(module, name, getattr(module, name))
    return module


def _run(run_id: int, fab: bytes, signature: str = "") -> Run:
    run = Run.create_empty(run_id)
    run.fab_hash = fab_sha256(fab)
    run.override_config = {SIGNATURE_KEY: signature} if signature else {}
    return run


def _fetch(gate: approval.Gate, run: Run, fab: bytes) -> bool:
    """What Flower's _pull_and_store_message does for an unknown run, through the gate."""
    seen: dict[str, object] = {}

    def original(state, get_run, get_fab, trusted_entities):
        info = get_run(run.run_id)
        got = get_fab(info.fab_hash, run.run_id)
        seen["license"] = got.verifications.get("valid_license")
        assert trusted_entities  # never empty, so Flower verifies
        return approval.VERIFY and gate.module._verify_fab(got, trusted_entities)

    gate.original = original
    return bool(
        gate.pull(
            None,
            get_run=lambda _rid: run,
            get_fab=lambda h, _rid: Fab(h, fab, {}),
            trusted_entities=None,
        )
    ) and bool(seen["license"])


def test_the_installed_flower_loop_is_the_one_the_gate_fits(flower_loop):
    approval.check_module(flower_loop)
    gate = approval.install(AppPolicy(), "site-a")
    assert flower_loop._pull_and_store_message == gate.pull
    assert flower_loop._verify_fab == gate.verify
    again = approval.install(AppPolicy(), "site-a")  # reinstalling starts from Flower's own
    assert again.original is gate.original


def _changed_copy(tmp_path, flower_loop, name: str, old: str, new: str) -> types.ModuleType:
    """A copy of Flower's loop module with one edit, imported from a file (real source)."""
    source = inspect.getsource(flower_loop)
    assert old in source
    (tmp_path / f"{name}.py").write_text(source.replace(old, new, 1))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        # the run stored before its FAB is verified
        (
            "            # Verify the received FAB\n",
            "            state.store_run(run_info)\n",
            "out of order",
        ),
        ("fab_verified = _verify_fab(fab, trusted_entities)", "fab_verified = True", "missing"),
        ("trusted_entities=trusted_entities,", "trusted_entities=None,", "no longer passes"),
        ("def _verify_fab(fab: Fab, trusted_entities", "def _verify_fab(fab: Fab, keys", "changed"),
    ],
)
def test_a_changed_flower_loop_fails_closed(tmp_path, flower_loop, old, new, match):
    approval.check_module(flower_loop)  # the installed one fits
    changed = _changed_copy(tmp_path, flower_loop, f"changed_loop_{abs(hash(old))}", old, new)
    with pytest.raises(PatchMismatch, match=match):
        approval.check_module(changed)


def test_the_paced_launcher_refuses_to_start_when_the_gate_does_not_fit(monkeypatch, capsys):
    def mismatch(*_a, **_k):
        raise PatchMismatch("flwr.supernode.start_client_internal: changed")

    monkeypatch.setattr(approval, "install", mismatch)
    monkeypatch.setattr(paced, "pace", lambda _i: False)
    started = []
    monkeypatch.setitem(
        sys.modules,
        "flwr.supernode.cli",
        types.SimpleNamespace(flower_supernode=lambda: started.append(1)),
    )
    with pytest.raises(SystemExit, match="refusing to start"):
        paced.main(["--enforce-approval", "--", "--insecure"])
    assert not started
    with pytest.raises(SystemExit):  # runtime dependency installation stays off
        paced.main(["--enforce-approval", "--", "--allow-runtime-dependency-installation"])
    assert not started


def test_an_approved_fab_passes_and_is_recorded(flower_loop, tmp_path):
    record = tmp_path / "apps.jsonl"
    gate = approval.install(AppPolicy(frozenset({fab_sha256(FAB)})), "site-a", record)
    assert _fetch(gate, _run(7, FAB), FAB)
    entry = json.loads(record.read_text())
    assert entry["decision"] == "approved" and entry["sha256"] == fab_sha256(FAB)
    assert entry["run_id"] == 7 and entry["site"] == "site-a"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600


def test_an_unapproved_fab_is_refused_with_a_catalogued_error_naming_the_site(
    flower_loop, tmp_path
):
    record = tmp_path / "apps.jsonl"
    gate = approval.install(AppPolicy(frozenset({fab_sha256(FAB)})), "site-a", record)
    other = FAB + b"changed"
    assert not _fetch(gate, _run(8, other), other)
    reply = flower_loop.FAB_VERIFICATION_ERROR
    assert reply.code == int(ErrorCode.SITE_APP_REFUSED)
    assert reply.reason.startswith("site site-a: app not approved at the site")
    assert fab_sha256(other)[:16] in reply.reason
    assert json.loads(record.read_text())["decision"] == "refused"


def test_the_run_cannot_state_another_hash_than_the_bytes(flower_loop):
    gate = approval.install(AppPolicy(frozenset({fab_sha256(FAB)})), "site-a")
    run = _run(9, FAB)
    run.fab_hash = "0" * 64
    assert not _fetch(gate, run, FAB)


def test_a_signed_fab_passes_and_a_forged_signature_does_not(flower_loop, tmp_path):
    private, public = create_publisher_key(tmp_path, "pub")
    policy = AppPolicy(publishers=load_trusted_publishers(public))
    gate = approval.install(policy, "site-a")
    sig = sign_fab(FAB, load_private_key(private), "pub").to_text()
    assert _fetch(gate, _run(10, FAB, sig), FAB)
    assert not _fetch(gate, _run(11, FAB + b"x", sig), FAB + b"x")
    assert not _fetch(gate, _run(12, FAB), FAB)  # unsigned
