"""Publisher signatures of app bundles (FABs), in Flower's signing format.

A publisher signs ``create_message_to_sign(sha256(fab), signed_at)`` (8-byte big-endian
``signed_at`` + the FAB's sha256 digest) with an Ed25519 key, as Flower's ``flwr app review``
does; sites list trusted publisher keys as Flower's ``--trusted-entities`` YAML does
(``key_id: "ssh-ed25519 AAAA..."``). ``fedhealth app keygen`` makes a key pair, ``fedhealth app
sign`` writes ``<fab>.sig``; the launcher sends its text form with the run (run-config key
:data:`fedhealth.security.apps.SIGNATURE_KEY`), and each site verifies it against the FAB bytes
it received (:meth:`fedhealth.security.apps.AppPolicy.decide`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    decode_base64url,
    sign_message,
)

from fedhealth.errors import AppRefused, ConfigError

__all__ = [
    "Signature",
    "check_sha256",
    "create_publisher_key",
    "load_private_key",
    "load_trusted_publishers",
    "read_signature",
    "sign_fab",
    "write_signature",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_sha256(value: str, where: str) -> str:
    """Check that ``value`` is a sha256 hex digest; return it in lowercase.

    Parameters
    ----------
    value : str
        The digest as configured.
    where : str
        Where it was configured (``site config: approved_apps``), for the error.

    Returns
    -------
    str
        The digest, lowercase.

    Raises
    ------
    ConfigError
        It is not 64 hex digits.
    """
    digest = str(value).strip().lower()
    if not _HEX64.fullmatch(digest):
        raise ConfigError(f"{where}: {value!r} is not a sha256 (64 hex digits)")
    return digest


@dataclass(frozen=True)
class Signature:
    """A publisher's signature of one FAB, in Flower's format.

    Parameters
    ----------
    key_id : str
        The publisher key's id, as the sites' trusted-publishers file names it.
    signed_at : int
        Unix time of signing (part of the signed message).
    signature : bytes
        The Ed25519 signature of ``create_message_to_sign(sha256(fab), signed_at)``.
    """

    key_id: str
    signed_at: int
    signature: bytes

    def to_text(self) -> str:
        """Return ``key_id:signed_at:signature`` (base64url, no padding), the run-config form."""
        sig = base64.urlsafe_b64encode(self.signature).rstrip(b"=").decode("ascii")
        return f"{self.key_id}:{self.signed_at}:{sig}"

    @classmethod
    def parse(cls, text: str) -> Signature:
        """Read :meth:`to_text`'s form.

        Parameters
        ----------
        text : str
            ``key_id:signed_at:signature``.

        Returns
        -------
        Signature
            The parsed signature (not yet verified).

        Raises
        ------
        AppRefused
            The text is not of that form.
        """
        parts = str(text).strip().rsplit(":", 2)
        if len(parts) != 3 or not _KEY_ID.fullmatch(parts[0]) or not parts[1].isdigit():
            raise AppRefused("app signature: expected key_id:signed_at:signature")
        try:
            raw = decode_base64url(parts[2])
        except ValueError as exc:
            raise AppRefused(f"app signature: not base64url ({exc})") from exc
        return cls(parts[0], int(parts[1]), raw)


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, key_id: str) -> Signature:
    """Sign a FAB as Flower's ``flwr app review`` does (``_sign_fab``).

    Parameters
    ----------
    fab : bytes
        The FAB's bytes.
    key : Ed25519PrivateKey
        The publisher's private key.
    key_id : str
        Its id, 1-64 of ``A-Z a-z 0-9 _ . @ -``.

    Returns
    -------
    Signature
        Signed now.

    Raises
    ------
    ConfigError
        ``key_id`` is not a valid id.
    """
    if not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"publisher key id {key_id!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    signed_at = int(time.time())
    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    return Signature(key_id, signed_at, sign_message(key, message))


def write_signature(fab_path: Path, sig: Signature, digest: str) -> Path:
    """Write a signature next to its FAB, as ``<fab>.sig`` (JSON).

    Parameters
    ----------
    fab_path : Path
        The signed FAB.
    sig : Signature
        Its signature.
    digest : str
        The FAB's sha256, recorded so a launcher can tell which build it belongs to.

    Returns
    -------
    Path
        ``<fab>.sig``: ``{"fab_sha256", "key_id", "signed_at", "signature"}`` where
        ``signature`` is :meth:`Signature.to_text`.
    """
    import json

    from fedhealth.io import atomic_write_text

    path = fab_path.with_name(fab_path.name + ".sig")
    body = {
        "fab_sha256": digest,
        "key_id": sig.key_id,
        "signed_at": sig.signed_at,
        "signature": sig.to_text(),
    }
    atomic_write_text(path, json.dumps(body, indent=2) + "\n")
    path.chmod(0o644)
    return path


def read_signature(path: Path) -> tuple[str, Signature]:
    """Read a ``.sig`` file written by :func:`write_signature`.

    Parameters
    ----------
    path : Path
        The signature file.

    Returns
    -------
    tuple of (str, Signature)
        The sha256 of the FAB it signs, and the signature.

    Raises
    ------
    ConfigError
        Unreadable or malformed; names the file.
    """
    import json

    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        digest = check_sha256(body["fab_sha256"], f"{path}: fab_sha256")
        return digest, Signature.parse(body["signature"])
    except (OSError, ValueError, KeyError, TypeError, AppRefused) as exc:
        raise ConfigError(f"{path}: not a fedhealth app signature ({exc})") from exc


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load an Ed25519 private key, OpenSSH or PEM (PKCS#8), unencrypted.

    Parameters
    ----------
    path : Path
        The key file.

    Returns
    -------
    Ed25519PrivateKey
        The key.

    Raises
    ------
    ConfigError
        Unreadable, encrypted, or not Ed25519; names the file.
    """
    try:
        data = path.read_bytes()
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable unencrypted private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key (publishers sign with Ed25519)")
    return key


def create_publisher_key(directory: Path, key_id: str) -> tuple[Path, Path]:
    """Create a publisher's Ed25519 key pair: ``<key_id>.key`` (0600) and ``<key_id>.pub``.

    Parameters
    ----------
    directory : Path
        Where to write them (created if missing).
    key_id : str
        The key's id; the ``.pub`` file holds the line ``<key_id>: "ssh-ed25519 ..."`` that
        a site adds to its trusted-publishers YAML.

    Returns
    -------
    tuple of (Path, Path)
        The private key (OpenSSH format) and the trusted-publishers line.

    Raises
    ------
    ConfigError
        ``key_id`` is invalid or a file exists already.
    """
    import os

    if not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"publisher key id {key_id!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    directory.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    paths = (directory / f"{key_id}.key", directory / f"{key_id}.pub")
    for path, data, mode in (
        (paths[0], private, 0o600),
        (paths[1], f'{key_id}: "{public.decode()}"\n'.encode(), 0o644),
    ):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError as exc:
            raise ConfigError(f"{path} exists; refusing to overwrite a key") from exc
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return paths


def load_trusted_publishers(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Read a trusted-publishers YAML file (Flower's ``--trusted-entities`` format).

    Parameters
    ----------
    path : Path
        A mapping ``key_id: "ssh-ed25519 AAAA..."``.

    Returns
    -------
    dict[str, Ed25519PublicKey]
        Key id -> public key.

    Raises
    ------
    ConfigError
        The file is unreadable, not a mapping, or an entry is not an Ed25519 OpenSSH public
        key; names the file and the key id.
    """
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: trusted publishers unreadable ({exc})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: trusted publishers must map key ids to ssh-ed25519 keys")
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for key_id, text in loaded.items():
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise ConfigError(f"{path}: key id {key_id!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
        try:
            key = serialization.load_ssh_public_key(str(text).encode("utf-8"))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {key_id}: not an OpenSSH public key ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(f"{path}: {key_id}: not an Ed25519 key")
        keys[key_id] = key
    return keys
