"""Consortium keys and certificates, made with the ``cryptography`` package.

* a consortium CA (ECDSA P-384, self-signed, path length 0);
* the coordinator's TLS certificate, signed by the CA, with subject alternative names for every
  DNS name and IP address the sites use to reach it (serverAuth only);
* one authentication key pair per site in the OpenSSH ECDSA format that Flower's SuperNode
  authentication expects (``--auth-supernode-private-key``; the public key is registered with
  ``flwr supernode register``).

Private keys are written 0600 and never overwritten: provisioning an existing name is an error
unless ``rotate`` is asked for, which keeps the old file as ``<name>.<UTC time>.bak``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhealth.errors import CertError

CURVE = ec.SECP384R1
"""Every key is ECDSA on NIST P-384 (FIPS 186-4), signatures with SHA-384."""
WARN_DAYS = 30
"""Certificates expiring within this many days are reported by :func:`expiry_warnings`."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, private: bool, rotate: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if not rotate:
            raise CertError(
                f"{path} exists; refusing to overwrite it (use --rotate to replace "
                "it, keeping a backup)"
            )
        path.rename(path.with_name(f"{path.name}.{_now():%Y%m%dT%H%M%SZ}.bak"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def _name(common_name: str, organization: str = "fedhealth consortium") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class CA:
    """The consortium CA: its certificate and private key.

    Parameters
    ----------
    cert : cryptography.x509.Certificate
        The self-signed CA certificate.
    key : cryptography.hazmat.primitives.asymmetric.ec.EllipticCurvePrivateKey
        Its private key.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, directory: Path) -> CA:
        """Load ``ca.crt`` and ``ca.key`` (PEM, unencrypted) from ``directory``.

        Parameters
        ----------
        directory : Path
            The directory :func:`create_ca` wrote to.

        Returns
        -------
        CA
            The CA.

        Raises
        ------
        CertError
            If either file is missing or unreadable, or the key is not an EC private key.
        """
        try:
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise CertError(f"{directory}: cannot load ca.crt/ca.key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{directory / 'ca.key'}: not an EC private key")
        return cls(cert, key)


def unique_ca_name(consortium: str) -> str:
    """Name a new CA so that no two are alike: the consortium, ``CA``, the UTC date, a tag.

    Parameters
    ----------
    consortium : str
        The consortium's name, e.g. ``"brain tumour consortium"``.

    Returns
    -------
    str
        E.g. ``"brain tumour consortium CA 2026-11-30 3f9a"`` (4 random hex digits).
    """
    return f"{consortium} CA {_now():%Y-%m-%d} {secrets.token_hex(2)}"


def create_ca(
    directory: Path,
    name: str = "fedhealth consortium CA",
    days: int = 730,
    *,
    rotate: bool = False,
    organization: str = "fedhealth consortium",
) -> CA:
    """Create the consortium CA: a P-384 key and a self-signed certificate, path length 0.

    Writes ``ca.key`` (PKCS#8 PEM, mode 0600) and ``ca.crt`` (PEM, mode 0644). The
    certificate is valid from five minutes ago for ``days`` days.

    Parameters
    ----------
    directory : Path
        Where to write (created if missing).
    name : str, default "fedhealth consortium CA"
        The certificate's common name.
    days : int, default 730
        Validity, in days.
    rotate : bool, default False
        Keyword-only. Replace existing files, keeping each as ``<name>.<UTC time>.bak``.
    organization : str, default "fedhealth consortium"
        Keyword-only. The certificate's organisation: the consortium's name.

    Returns
    -------
    CA
        The new CA.

    Raises
    ------
    CertError
        If ``ca.key`` or ``ca.crt`` exists and ``rotate`` is False.
    """
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name, organization))
        .issuer_name(_name(name, organization))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(directory / "ca.key", _pem_key(key), private=True, rotate=rotate)
    _write(
        directory / "ca.crt",
        cert.public_bytes(serialization.Encoding.PEM),
        private=False,
        rotate=rotate,
    )
    return CA(cert, key)


def create_server_cert(
    ca: CA, directory: Path, names: list[str], days: int = 365, *, rotate: bool = False
) -> Path:
    """Create the coordinator's TLS key and certificate, signed by the CA.

    Writes ``server.key`` (PKCS#8 PEM, mode 0600) and ``server.crt`` (PEM, mode 0644): a
    P-384 key, extended key usage serverAuth only, a subject alternative name per entry of
    ``names``, valid from five minutes ago for ``days`` days.

    Parameters
    ----------
    ca : CA
        The consortium CA.
    directory : Path
        Where to write (created if missing).
    names : list of str
        DNS names or IP addresses the sites use to reach the coordinator; the first is the
        common name.
    days : int, default 365
        Validity, in days.
    rotate : bool, default False
        Keyword-only. Replace existing files, keeping each as ``<name>.<UTC time>.bak``.

    Returns
    -------
    Path
        ``server.crt``.

    Raises
    ------
    CertError
        If ``names`` is empty, or a file exists and ``rotate`` is False.
    """
    if not names:
        raise CertError("the coordinator certificate needs at least one DNS name or IP address")
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA384())
    )
    _write(directory / "server.key", _pem_key(key), private=True, rotate=rotate)
    return _write(
        directory / "server.crt",
        cert.public_bytes(serialization.Encoding.PEM),
        private=False,
        rotate=rotate,
    )


def create_site_keys(directory: Path, site: str, *, rotate: bool = False) -> tuple[Path, Path]:
    """Create a site's SuperNode authentication key pair, OpenSSH ECDSA (P-384) format.

    Writes ``sites/<site>/auth.key`` (mode 0600) and ``sites/<site>/auth.pub`` (mode 0644,
    the public key followed by the site's name) under ``directory``.

    Parameters
    ----------
    directory : Path
        The consortium's key directory.
    site : str
        The site's name.
    rotate : bool, default False
        Keyword-only. Replace existing files, keeping each as ``<name>.<UTC time>.bak``.

    Returns
    -------
    tuple of (Path, Path)
        The private and the public key file.

    Raises
    ------
    CertError
        If a file exists and ``rotate`` is False.
    """
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    site_dir = directory / "sites" / site
    return (
        _write(site_dir / "auth.key", private, private=True, rotate=rotate),
        _write(site_dir / "auth.pub", public + f" {site}\n".encode(), private=False, rotate=rotate),
    )


def expiry_warnings(directory: Path, warn_days: int = WARN_DAYS) -> list[str]:
    """List the certificates under ``directory`` that are expired or expire soon.

    Parameters
    ----------
    directory : Path
        Searched recursively for ``*.crt`` (PEM) files.
    warn_days : int, default 30
        Report certificates with fewer whole days left than this.

    Returns
    -------
    list of str
        One line per such certificate, in path order, naming the file and the expiry date.
    """
    lines = []
    for path in sorted(directory.rglob("*.crt")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        left = (cert.not_valid_after_utc - _now()).days
        if left < 0:
            lines.append(f"{path}: EXPIRED on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif left < warn_days:
            lines.append(f"{path}: expires in {left} days ({cert.not_valid_after_utc:%Y-%m-%d})")
    return lines
