"""A wrong CA is named: subjects and fingerprints of both sides, from a real TLS handshake."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from fedhealth.cli import main
from fedhealth.security.certs import create_ca, create_server_cert, unique_ca_name
from fedhealth.security.tlsprobe import describe, fingerprint, probe


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server on loopback with a certificate from the consortium's CA."""
    ca = create_ca(tmp_path / "ours", "brain consortium CA 1", organization="brain consortium")
    create_server_cert(ca, tmp_path / "ours", ["localhost", "127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "ours" / "server.crt", tmp_path / "ours" / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], tmp_path / "ours"
    stop.set()
    thread.join()
    listener.close()


def test_the_right_ca_verifies(coordinator: tuple[int, Path]) -> None:
    port, ours = coordinator
    seen = probe("127.0.0.1", port, ours / "ca.crt")
    assert seen.ok and "certificate verified" in seen.message


def test_a_foreign_ca_is_named_with_both_fingerprints(
    coordinator: tuple[int, Path], tmp_path: Path
) -> None:
    port, ours = coordinator
    foreign = create_ca(tmp_path / "foreign", "other consortium CA 9", organization="other")
    seen = probe("127.0.0.1", port, tmp_path / "foreign" / "ca.crt")
    assert not seen.ok
    ours_ca = x509.load_pem_x509_certificate((ours / "ca.crt").read_bytes())
    assert "CN=brain consortium CA 1,O=brain consortium" in seen.message  # the issuer
    assert describe(foreign.cert) in seen.message  # what this side trusts, with fingerprint
    assert fingerprint(foreign.cert) in seen.message
    assert fingerprint(ours_ca) not in seen.message  # the leaf's issuer: named, not guessed
    assert "certificate verify failed" in seen.message


def test_site_check_names_the_ca_when_the_coordinator_is_an_impostor(
    coordinator: tuple[int, Path], tmp_path: Path
) -> None:
    from fedhealth.supernode.preflight import _check_coordinator
    from fedhealth.supernode.settings import SiteSettings

    port, _ = coordinator
    create_ca(tmp_path / "site-ca", "brain consortium CA 2", organization="brain consortium")
    settings = SiteSettings(coordinator=f"127.0.0.1:{port}", ca=str(tmp_path / "site-ca/ca.crt"))
    item = _check_coordinator(settings, timeout=5)
    assert not item.ok
    assert "presents" in item.detail and "CN=brain consortium CA 1" in item.detail
    assert "trusts only CN=brain consortium CA 2" in item.detail and "sha256" in item.detail


def test_every_ca_from_certs_init_has_its_own_name(tmp_path: Path, capsys) -> None:
    names = {unique_ca_name("brain consortium") for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("brain consortium CA 20") for n in names)
    for d in ("a", "b"):
        assert main(["certs", "init", "--dir", str(tmp_path / d), "--consortium", "brain"]) == 0
    a, b = (
        x509.load_pem_x509_certificate((tmp_path / d / "ca.crt").read_bytes()) for d in ("a", "b")
    )
    assert a.subject != b.subject and "O=brain" in a.subject.rfc4514_string()
    out = capsys.readouterr().out
    assert fingerprint(a) in out and fingerprint(b) in out
    assert main(["certs", "check", "--dir", str(tmp_path / "a")]) == 0
    assert describe(a) in capsys.readouterr().out


def test_the_site_daemon_explains_a_verify_failure_once(
    coordinator: tuple[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedhealth.supernode.daemon import CertificateExplainer
    from fedhealth.supernode.settings import SiteSettings

    port, ours = coordinator
    create_ca(tmp_path / "rotated", "brain consortium CA 3", organization="brain consortium")
    settings = SiteSettings(
        name="site-a", coordinator=f"127.0.0.1:{port}", ca=str(tmp_path / "rotated/ca.crt")
    )
    explain = CertificateExplainer(settings)
    grpc_line = "Ssl handshake failed: error:1000007d:SSL routines:CERTIFICATE_VERIFY_FAILED"
    assert explain("INFO : Connection attempt failed, retrying") is None  # not a TLS line
    with caplog.at_level("WARNING", logger="fedhealth.site"):
        text = explain(grpc_line)
        assert explain(grpc_line) is None  # once per daemon run, not once per retry
    assert text is not None and "CN=brain consortium CA 1" in text
    assert "trusts only CN=brain consortium CA 3" in text
    records = [r for r in caplog.records if getattr(r, "fields", {}).get("event")]
    assert [r.fields["event"] for r in records] == [CertificateExplainer.EVENT]
    # the consortium's own CA verifies now: nothing to explain
    right = SiteSettings(name="site-a", coordinator=f"127.0.0.1:{port}", ca=str(ours / "ca.crt"))
    assert CertificateExplainer(right)(grpc_line) is None
