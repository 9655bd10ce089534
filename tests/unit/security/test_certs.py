import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedhealth.security.certs import (
    CA,
    CertError,
    create_ca,
    create_server_cert,
    create_site_keys,
    expiry_warnings,
)


@pytest.fixture
def ca_dir(tmp_path):
    create_ca(tmp_path)
    return tmp_path


def test_server_cert_is_signed_by_the_ca_with_the_right_names(ca_dir):
    ca = CA.load(ca_dir)
    path = create_server_cert(ca, ca_dir, ["coordinator.example.org", "127.0.0.1", "::1"])
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_0600_and_never_overwritten_silently(ca_dir):
    for name in ("ca.key",):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600
    key, pub = create_site_keys(ca_dir, "hospital-a")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_site_keys(ca_dir, "hospital-a")
    assert key.read_bytes() == before
    create_site_keys(ca_dir, "hospital-a", rotate=True)
    assert key.read_bytes() != before
    assert len(list(key.parent.glob("auth.key.*.bak"))) == 1


def test_site_keys_are_openssh_ecdsa_as_flower_expects(ca_dir):
    key, pub = create_site_keys(ca_dir, "hospital-b")
    private = load_ssh_private_key(key.read_bytes(), password=None)
    public = load_ssh_public_key(pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_expiry_is_warned_about(tmp_path):
    create_ca(tmp_path / "soon", days=10)
    create_ca(tmp_path / "later", days=400)
    warnings = expiry_warnings(tmp_path)
    assert len(warnings) == 1 and "soon" in warnings[0] and "expires in" in warnings[0]
