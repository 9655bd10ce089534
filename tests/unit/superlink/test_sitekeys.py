"""Enrolment key handling: only public ECDSA keys, one key per name and one name per key,
owner-only files, revoked keys archived out of the way of the next start."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedhealth.errors import EnrolmentError, ErrorCode
from fedhealth.security.certs import create_site_keys
from fedhealth.superlink import enrolment
from fedhealth.superlink.settings import CoordinatorSettings
from fedhealth.superlink.sitekeys import archive, bind, enrolled_sites, load_public_key


@pytest.fixture
def sent(tmp_path: Path) -> Path:
    """Keys the hospitals made themselves (`fedhealth certs site`), outside the enrolment dir."""
    for name in ("hospital-a", "hospital-b"):
        create_site_keys(tmp_path / "hospitals", name)
    return tmp_path / "hospitals" / "sites"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrol_copies_the_public_key_owner_only_and_is_idempotent(sent, tmp_path):
    enrolled = tmp_path / "enrolled"
    site, new = bind(enrolled, "hospital-a", sent / "hospital-a" / "auth.pub")
    assert new and site.path == enrolled / "sites" / "hospital-a" / "auth.pub"
    assert site.path.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    assert mode(site.path) == 0o600 and mode(site.path.parent) == 0o700 and mode(enrolled) == 0o700
    again, new = bind(enrolled, "hospital-a", sent / "hospital-a" / "auth.pub")
    assert not new and again.fingerprint == site.fingerprint
    assert [s.name for s in enrolled_sites(enrolled)] == ["hospital-a"]


def test_a_private_key_is_refused_and_never_copied(sent, tmp_path):
    enrolled = tmp_path / "enrolled"
    with pytest.raises(EnrolmentError, match="PRIVATE key") as err:
        bind(enrolled, "hospital-a", sent / "hospital-a" / "auth.key")
    assert err.value.code == ErrorCode.ENROLMENT_INVALID
    assert not list(enrolled.rglob("auth.*"))
    pem = tmp_path / "private.pem"  # a PEM (PKCS#8) private key too
    pem.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(EnrolmentError, match="PRIVATE key"):
        load_public_key(pem)


def test_keys_flower_cannot_authenticate_are_refused(tmp_path):
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(EnrolmentError, match="ECDSA"):
        load_public_key(rsa_pub)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(EnrolmentError, match="garbage.pub"):
        load_public_key(garbage)
    with pytest.raises(EnrolmentError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub")


def test_a_pem_public_key_is_enrolled_in_openssh_form(tmp_path):
    pem = tmp_path / "site.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert load_public_key(pem).startswith(b"ecdsa-sha2-nistp256 ")


def test_rebinding_a_name_or_a_key_is_refused(sent, tmp_path):
    enrolled = tmp_path / "enrolled"
    bind(enrolled, "hospital-a", sent / "hospital-a" / "auth.pub")
    with pytest.raises(EnrolmentError, match="already enrolled with another key"):
        bind(enrolled, "hospital-a", sent / "hospital-b" / "auth.pub")  # name taken
    with pytest.raises(EnrolmentError, match="already enrolled as site hospital-a"):
        bind(enrolled, "impostor", sent / "hospital-a" / "auth.pub")  # key taken
    with pytest.raises(EnrolmentError, match="site name"):
        bind(enrolled, "../etc", sent / "hospital-b" / "auth.pub")
    assert [s.name for s in enrolled_sites(enrolled)] == ["hospital-a"]


def test_a_revoked_key_is_archived_and_its_name_can_take_a_new_key(sent, tmp_path):
    enrolled = tmp_path / "enrolled"
    bind(enrolled, "hospital-a", sent / "hospital-a" / "auth.pub")
    target = archive(enrolled, "hospital-a")
    assert (target / "auth.pub").is_file() and target.parent.name == "revoked"
    assert enrolled_sites(enrolled) == []  # the next start does not register it
    assert bind(enrolled, "hospital-a", sent / "hospital-b" / "auth.pub")[1]
    with pytest.raises(EnrolmentError, match="not enrolled"):
        archive(enrolled, "hospital-c")


def test_the_node_registry_is_owner_only(tmp_path):
    s = CoordinatorSettings(state_dir=str(tmp_path / "state"), enrolled=str(tmp_path / "e"))
    with enrolment.registry(s) as reg:
        reg["nodes"]["hospital-a"] = {"node_id": 7, "fingerprint": "SHA256:x"}
    with enrolment.registry(s) as reg:
        assert reg["nodes"]["hospital-a"]["node_id"] == 7
    assert mode(tmp_path / "state" / "sites.json") == 0o600
