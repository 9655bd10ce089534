"""Approved app code: FAB hashes, publisher signatures in Flower's format, the policy's decision."""

from __future__ import annotations

import hashlib
import shutil
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

from fedhealth.errors import AppRefused, ConfigError
from fedhealth.security.apps import AppPolicy, fab_sha256, record_decision
from fedhealth.security.signing import (
    Signature,
    create_publisher_key,
    load_private_key,
    load_trusted_publishers,
    read_signature,
    sign_fab,
    write_signature,
)

FAB = b"PK\x03\x04 a pretend app bundle" * 50


@pytest.fixture
def publisher(tmp_path):
    private, public = create_publisher_key(tmp_path / "keys", "pub-1")
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(public.read_text())
    return load_private_key(private), load_trusted_publishers(trusted)


def test_an_approved_hash_runs_and_an_unknown_one_does_not():
    policy = AppPolicy(frozenset({fab_sha256(FAB)}))
    decision = policy.decide(FAB)
    assert decision.approved and decision.sha256 == hashlib.sha256(FAB).hexdigest()
    other = policy.decide(FAB + b"x")
    assert not other.approved and "not approved" in other.reason


def test_tampered_bytes_are_refused_whatever_hash_is_stated():
    policy = AppPolicy(frozenset({fab_sha256(FAB)}))
    tampered = bytearray(FAB)
    tampered[10] ^= 1
    assert not policy.decide(bytes(tampered)).approved  # the hash is computed, never taken


def test_an_empty_policy_refuses_everything_and_says_so():
    policy = AppPolicy()
    assert policy.empty and not policy.decide(FAB).approved
    assert "every app is refused" in policy.describe()


def test_a_signature_by_a_trusted_publisher_approves_the_fab(publisher):
    key, trusted = publisher
    sig = sign_fab(FAB, key, "pub-1")
    decision = AppPolicy(publishers=trusted).decide(FAB, sig.to_text())
    assert decision.approved and decision.reason == "signed by pub-1"
    # Flower's message format: 8-byte big-endian time + sha256 digest
    msg = create_message_to_sign(hashlib.sha256(FAB).digest(), sig.signed_at)
    trusted["pub-1"].verify(sig.signature, msg)


def test_the_signature_does_not_carry_over_to_other_bytes(publisher):
    key, trusted = publisher
    sig = sign_fab(FAB, key, "pub-1")
    assert not AppPolicy(publishers=trusted).decide(FAB + b"!", sig.to_text()).approved


def test_a_signature_by_an_untrusted_key_is_refused(publisher):
    _, trusted = publisher
    stranger = ed25519.Ed25519PrivateKey.generate()
    for key_id in ("pub-1", "stranger"):  # impersonating a trusted id, or its own id
        sig = sign_fab(FAB, stranger, key_id)
        decision = AppPolicy(publishers=trusted).decide(FAB, sig.to_text())
        assert not decision.approved, key_id
    assert (
        "not a trusted publisher"
        in AppPolicy(publishers=trusted)
        .decide(FAB, sign_fab(FAB, stranger, "stranger").to_text())
        .reason
    )


def test_forged_or_malformed_signatures_are_refused(publisher):
    key, trusted = publisher
    good = sign_fab(FAB, key, "pub-1")
    forged = [
        Signature("pub-1", good.signed_at + 1, good.signature).to_text(),  # other time
        Signature("pub-1", good.signed_at, bytes(64)).to_text(),
        Signature(
            "pub-1", good.signed_at, bytes([good.signature[0] ^ 1]) + good.signature[1:]
        ).to_text(),  # one bit flipped
        "pub-1:notanumber:abc",
        "garbage",
        "pub-1:1:!!!",
    ]
    policy = AppPolicy(publishers=trusted)
    for text in forged:
        assert not policy.decide(FAB, text).approved, text


def test_signature_files_round_trip_and_name_their_fab(tmp_path, publisher):
    key, _ = publisher
    fab = tmp_path / "app.fab"
    fab.write_bytes(FAB)
    sig = sign_fab(FAB, key, "pub-1")
    path = write_signature(fab, sig, fab_sha256(FAB))
    assert path.name == "app.fab.sig"
    assert read_signature(path) == (fab_sha256(FAB), sig)
    path.write_text("{}")
    with pytest.raises(ConfigError, match="app.fab.sig"):
        read_signature(path)
    with pytest.raises(AppRefused):
        Signature.parse("no colons")


def test_keys_are_owner_only_never_overwritten_and_must_be_ed25519(tmp_path):
    private, public = create_publisher_key(tmp_path, "p")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith('p: "ssh-ed25519 ')
    with pytest.raises(ConfigError, match="exists"):
        create_publisher_key(tmp_path, "p")
    bad = tmp_path / "bad.yaml"
    bad.write_text('x: "ssh-rsa AAAA"\n')
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_trusted_publishers(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_trusted_publishers(bad)
    with pytest.raises(ConfigError, match="sha256"):
        AppPolicy.load(["abc"], "", "site config")


def test_decisions_are_recorded_owner_only(tmp_path):
    path = tmp_path / "state" / "apps.jsonl"
    record_decision(path, {"sha256": "a", "decision": "refused"})
    record_decision(path, {"sha256": "b", "decision": "approved"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().splitlines()) == 2


def test_installed_stands_for_the_fab_of_this_source_tree(tmp_path):
    from fedhealth.security.apps import INSTALLED, build_fab, fab_sha256, project_dir

    built = fab_sha256(build_fab(project_dir()))
    policy = AppPolicy.load([INSTALLED], "", "site config")
    assert policy.approved == {built}
    assert policy.decide(build_fab(project_dir())).approved
    # any change to the app's code is another FAB, refused
    copy = tmp_path / "app"
    for part in ("pyproject.toml", "fedhealth", "server", "clients", "configs"):
        src = project_dir() / part
        if src.is_dir():
            shutil.copytree(src, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy(src, copy / part)
    assert fab_sha256(build_fab(copy)) == built  # the FAB holds only these (fab-include)
    (copy / "server" / "server_app.py").write_text("# changed\n", encoding="utf-8")
    assert not policy.decide(build_fab(copy)).approved
