"""Say which CA is wrong when TLS fails: subjects and fingerprints instead of a bare error.

gRPC and Python's ``ssl`` report a foreign or rotated CA as ``CERTIFICATE_VERIFY_FAILED`` and
nothing else. :func:`probe` connects once with the trusted CA; when verification fails it reads
the certificate the peer presents (a second connection that verifies nothing and sends nothing
but the handshake) and names both sides: who issued the peer's certificate and which CA this
side trusts, with its SHA-256 fingerprint, so an operator can tell a foreign CA from a rotated
one, or an impostor.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = ["TlsProbe", "describe", "fingerprint", "probe"]


def fingerprint(cert: x509.Certificate) -> str:
    """Return a certificate's SHA-256 fingerprint as colon-separated hex (``openssl x509``'s)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(cert: x509.Certificate) -> str:
    """Name a certificate: its subject (RFC 4514) and SHA-256 fingerprint.

    Parameters
    ----------
    cert : cryptography.x509.Certificate
        The certificate.

    Returns
    -------
    str
        E.g. ``"CN=brain consortium CA 2026-11-30 3f9a,O=brain consortium (sha256 AB:...)"``.
    """
    return f"{cert.subject.rfc4514_string()} (sha256 {fingerprint(cert)})"


@dataclass(frozen=True)
class TlsProbe:
    """What one TLS handshake against a peer showed.

    Parameters
    ----------
    ok : bool
        The peer's certificate verified against the trusted CA.
    message : str
        For people: the TLS version when ``ok``; otherwise the failure with the peer
        certificate's issuer and the trusted CA's subject and fingerprint.
    """

    ok: bool
    message: str


def probe(host: str, port: int, cafile: Path | str, timeout: float = 10.0) -> TlsProbe:
    """Connect to ``host:port`` with TLS, trusting only ``cafile``; explain a failure.

    Parameters
    ----------
    host : str
        The peer's host name or address (also the name its certificate must carry).
    port : int
        The peer's TLS port (the coordinator's Fleet or Control API).
    cafile : Path or str
        The CA certificate this side trusts (PEM).
    timeout : float, default 10.0
        Seconds for each connection.

    Returns
    -------
    TlsProbe
        ``ok`` and a message; a failed verification names the peer certificate's subject and
        issuer and the trusted CA's subject and SHA-256 fingerprint.

    Raises
    ------
    OSError
        The peer is not reachable (connection refused, timeout, unknown host), or ``cafile``
        is unreadable.
    """
    trusted = x509.load_pem_x509_certificate(Path(cafile).read_bytes())
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            return TlsProbe(True, f"TLS {tls.version()}, certificate verified against {cafile}")
    except ssl.SSLCertVerificationError as exc:
        presented = _presented(host, port, timeout)
        said = exc.verify_message or exc.reason or str(exc)
        if presented is None:
            return TlsProbe(False, f"certificate verify failed ({said})")
        return TlsProbe(
            False,
            f"certificate verify failed ({said}): {host}:{port} presents "
            f"{describe(presented)}, issued by {presented.issuer.rfc4514_string()}; this side "
            f"trusts only {describe(trusted)} from {cafile}. A different issuer means another "
            "consortium's CA, a rotated CA whose new ca.crt has not reached this side, or an "
            "impostor: compare the fingerprints with the operator's `fedhealth certs check`",
        )


def _presented(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """Read the peer's certificate without verifying it (for the message only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None
