"""Enrolled site keys on the coordinator host: validate, bind to a name, list, archive.

The enrolment directory holds ``sites/<name>/auth.pub``: one public key per site name and one
name per key, owner-only (directories 0700, files 0600). Revoked keys move to
``revoked/<name>.<UTC time>/`` so a restart does not register them again and the record stays.
Only public keys are accepted: a private key sent by mistake is refused and never copied.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhealth.errors import EnrolmentError
from fedhealth.io import atomic_write_bytes

NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
"""A site name: 1 to 64 of ``[A-Za-z0-9_.-]``, not starting with a dot (as replies carry it)."""
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
"""The curves Flower's SuperNode authentication accepts (``uses_nist_ec_curve``)."""
MAX_KEY_BYTES = 16 * 1024
KEY_FILE = "auth.pub"


@dataclass(frozen=True)
class EnrolledSite:
    """One enrolled site.

    Parameters
    ----------
    name : str
        The site name every metric and privacy record of its node is filed under.
    path : Path
        Its ``sites/<name>/auth.pub``.
    fingerprint : str
        ``SHA256:<base64>`` of the key, as ``ssh-keygen -l`` prints it.
    """

    name: str
    path: Path
    fingerprint: str


def check_name(name: str) -> str:
    """Return ``name`` if it can be a site name.

    Parameters
    ----------
    name : str
        The proposed site name.

    Returns
    -------
    str
        ``name`` unchanged.

    Raises
    ------
    EnrolmentError
        It is empty, longer than 64 characters, starts with a dot or has other characters
        than letters, digits, ``_``, ``.`` and ``-``.
    """
    if not NAME.fullmatch(name):
        raise EnrolmentError(
            f"site name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-' "
            "(not starting with '.')"
        )
    return name


def load_public_key(path: Path) -> bytes:
    """Read a site's public key and return it as one OpenSSH line, without comment.

    Parameters
    ----------
    path : Path
        An OpenSSH (``ecdsa-sha2-nistp384 AAAA...``) or PEM ``PUBLIC KEY`` file.

    Returns
    -------
    bytes
        ``b"ecdsa-sha2-<curve> <base64>"``: the form Flower's ``flwr supernode register``
        reads.

    Raises
    ------
    EnrolmentError
        The file is missing or too large, holds a private key (refused, never copied), is not
        a public key, or not an ECDSA key on a NIST curve; the message names the file.
    """
    try:
        data = path.read_bytes()[: MAX_KEY_BYTES + 1]
    except OSError as exc:
        raise EnrolmentError(f"{path}: cannot read the site key: {exc.strerror}") from exc
    if len(data) > MAX_KEY_BYTES:
        raise EnrolmentError(f"{path}: {MAX_KEY_BYTES} bytes at most for a public key")
    if b"PRIVATE KEY" in data:
        raise EnrolmentError(
            f"{path}: this is a PRIVATE key. Enrol the site's public key (auth.pub); the "
            "private key (auth.key) never leaves the site. It has been seen off-site now, so "
            "the site should make a new pair (`fedhealth certs site NAME --rotate`)."
        )
    try:
        key = (
            serialization.load_pem_public_key(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else serialization.load_ssh_public_key(data.strip())
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EnrolmentError(f"{path}: not an OpenSSH or PEM public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise EnrolmentError(
            f"{path}: {kind} key; Flower's SuperNode authentication needs ECDSA on "
            f"{', '.join(NIST_CURVES)} (`fedhealth certs site NAME` makes P-384)"
        )
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fingerprint(openssh: bytes) -> str:
    """Return ``SHA256:<base64 without padding>`` of an OpenSSH public key's blob.

    Parameters
    ----------
    openssh : bytes
        ``b"<type> <base64> [comment]"``.

    Returns
    -------
    str
        The fingerprint ``ssh-keygen -lf auth.pub`` prints for the same key.
    """
    blob = base64.b64decode(openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def enrolled_sites(enrolled: Path) -> list[EnrolledSite]:
    """List the sites enrolled under ``<enrolled>/sites/*/auth.pub``, sorted by name.

    Parameters
    ----------
    enrolled : Path
        The enrolment directory (may not exist yet).

    Returns
    -------
    list of EnrolledSite
        Empty without a directory.

    Raises
    ------
    EnrolmentError
        A key file there is not a valid site public key (it names the file).
    """
    return [
        EnrolledSite(pub.parent.name, pub, fingerprint(load_public_key(pub)))
        for pub in sorted(enrolled.glob(f"sites/*/{KEY_FILE}"))
    ]


def bind(enrolled: Path, name: str, key_file: Path) -> tuple[EnrolledSite, bool]:
    """Enrol ``key_file`` under ``name``: copy the public key to ``sites/<name>/auth.pub``.

    Parameters
    ----------
    enrolled : Path
        The enrolment directory (created owner-only if missing).
    name : str
        The site's name (:func:`check_name`).
    key_file : Path
        The public key the site sent.

    Returns
    -------
    tuple of (EnrolledSite, bool)
        The site, and True when it was enrolled now (False: the same key was already
        enrolled under this name, nothing changed).

    Raises
    ------
    EnrolmentError
        The name is invalid, the file is not a valid public key (a private key is refused),
        the name is bound to another key, or the key to another name.
    """
    check_name(name)
    key = load_public_key(key_file)
    fp = fingerprint(key)
    for site in enrolled_sites(enrolled):
        if site.name == name and site.fingerprint != fp:
            raise EnrolmentError(
                f"site {name} is already enrolled with another key ({site.fingerprint}, "
                f"{site.path}); revoke it first (`fedhealth server revoke {name}`)"
            )
        if site.name != name and site.fingerprint == fp:
            raise EnrolmentError(
                f"{key_file}: this key ({fp}) is already enrolled as site {site.name}; one key "
                "per site, each site makes its own pair"
            )
        if site.name == name:
            return site, False
    path = enrolled / "sites" / name / KEY_FILE
    for directory in (enrolled, enrolled / "sites", path.parent):
        directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    atomic_write_bytes(path, key + f" {name}\n".encode())  # mkstemp: mode 0600
    return EnrolledSite(name, path, fp), True


def archive(enrolled: Path, name: str) -> Path:
    """Move ``sites/<name>`` to ``revoked/<name>.<UTC time>`` so it is not registered again.

    Parameters
    ----------
    enrolled : Path
        The enrolment directory.
    name : str
        An enrolled site.

    Returns
    -------
    Path
        The archived directory (owner-only).

    Raises
    ------
    EnrolmentError
        No site of that name is enrolled.
    """
    source = enrolled / "sites" / check_name(name)
    if not (source / KEY_FILE).is_file():
        raise EnrolmentError(f"site {name}: not enrolled (no {source / KEY_FILE})")
    revoked = enrolled / "revoked"
    revoked.mkdir(mode=0o700, exist_ok=True)
    target = revoked / f"{name}.{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"
    source.rename(target)
    return target
