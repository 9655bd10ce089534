"""Approved app code: build a FAB, hash it, sign it, and decide whether a site may run it.

A site (and the coordinator) runs only the Flower App Bundles (FABs) its own config approves:

* by **hash**: the sha256 of the FAB's bytes, as ``fedhealth app build`` prints it. ``flwr run``
  builds the FAB from the project directory deterministically (same tree, same bytes), so the
  hash of ``fedhealth app build`` is the hash of what ``fedhealth server launch`` submits;
* by **publisher**: an Ed25519 signature of the FAB by a key the site trusts, in Flower's own
  signing format (:func:`flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign`:
  8-byte big-endian ``signed_at`` + sha256 digest of the FAB; the trusted keys are a YAML mapping
  ``key_id: "ssh-ed25519 ..."`` as Flower's ``--trusted-entities`` reads it). Flower's SuperLink
  attaches signatures only to FABs fetched from Flower Hub, so a locally built FAB carries its
  signature as the run-config value :data:`SIGNATURE_KEY` (``key_id:signed_at:signature``,
  base64url). The coordinator states it, but cannot forge it: it is checked against the FAB
  bytes the site received.

The hash is always computed over the bytes received, never taken from what the sender states.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, verify_signature

from fedhealth.errors import AppRefused, ConfigError
from fedhealth.security.signing import Signature, check_sha256, load_trusted_publishers

__all__ = [
    "INSTALLED",
    "SIGNATURE_KEY",
    "AppPolicy",
    "Decision",
    "build_fab",
    "check_sha256",
    "fab_sha256",
    "installed_sha256",
    "project_dir",
    "record_decision",
    "write_fab",
]

INSTALLED = "installed"
"""An ``approved_apps`` entry meaning "the FAB of the fedhealth installed here" (its sha256 is
computed at start, from this host's own source tree: the release its operators installed)."""

SIGNATURE_KEY = "app-signature"
"""The run-config key carrying a FAB's publisher signature (declared empty in pyproject.toml)."""


def project_dir() -> Path:
    """Find the Flower app project (``pyproject.toml`` with ``[tool.flwr.app]``) of this package.

    Returns
    -------
    Path
        The source tree holding ``pyproject.toml``, ``server/`` and ``clients/``.

    Raises
    ------
    ConfigError
        fedhealth is not installed from its source tree (a wheel has no ``server/``).
    """
    import fedhealth

    root = Path(fedhealth.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "server" / "server_app.py").is_file():
        raise ConfigError(
            f"{root}: the fedhealth project (pyproject.toml, server/, clients/) is "
            "not there; install fedhealth from its source tree (pip install -e .)"
        )
    return root


def installed_sha256() -> str:
    """Return the sha256 of the FAB of the fedhealth installed here (:func:`project_dir`).

    Returns
    -------
    str
        64 lowercase hex digits: what ``fedhealth app build`` prints on this host.

    Raises
    ------
    ConfigError
        No source tree to build (see :func:`project_dir`).
    """
    return fab_sha256(build_fab(project_dir()))


def fab_sha256(fab: bytes) -> str:
    """Return the hex sha256 of a FAB's bytes (Flower's ``fab_hash``).

    Parameters
    ----------
    fab : bytes
        The FAB (a zip archive).

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    return hashlib.sha256(fab).hexdigest()


def build_fab(project: Path) -> bytes:
    """Build the FAB of a Flower App project, exactly as ``flwr run <project>`` does.

    Parameters
    ----------
    project : Path
        The directory holding ``pyproject.toml`` with ``[tool.flwr.app]``.

    Returns
    -------
    bytes
        The FAB; deterministic for a given tree.

    Raises
    ------
    ConfigError
        The project cannot be built (no ``pyproject.toml``, invalid config); names the dir.
    """
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(project)
    except Exception as exc:  # noqa: BLE001 - Flower raises click/typer/ValueError variants
        raise ConfigError(f"{project}: cannot build the app bundle: {exc}") from exc


def write_fab(project: Path, out_dir: Path) -> tuple[Path, str]:
    """Build the project's FAB and write it as Flower names it.

    Parameters
    ----------
    project : Path
        The Flower App project.
    out_dir : Path
        Where to write ``<publisher>.<name>.<version>.<hash8>.fab`` (created if missing).

    Returns
    -------
    tuple of (Path, str)
        The FAB's path and its sha256.
    """
    import tomllib

    from flwr.cli.build import get_fab_filename

    from fedhealth.io import atomic_write_bytes

    fab = build_fab(project)
    digest = fab_sha256(fab)
    config = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    path = out_dir / get_fab_filename(config, digest)
    atomic_write_bytes(path, fab)
    path.chmod(0o644)
    return path, digest


@dataclass(frozen=True)
class Decision:
    """Whether an app may run, and why.

    Parameters
    ----------
    approved : bool
        True: it may run.
    sha256 : str
        The sha256 of the FAB bytes that were checked.
    reason : str
        ``approved hash``, ``signed by <key_id>``, or why it was refused.
    """

    approved: bool
    sha256: str
    reason: str


@dataclass(frozen=True)
class AppPolicy:
    """What a site (or the coordinator) accepts: approved FAB hashes and trusted publishers.

    An empty policy refuses every app (fail closed).

    Parameters
    ----------
    approved : frozenset of str
        sha256 hex digests of approved FABs.
    publishers : dict[str, Ed25519PublicKey]
        Trusted publisher keys by id; a FAB signed by one of them is approved.
    """

    approved: frozenset[str] = frozenset()
    publishers: dict[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def load(cls, approved: list[str], publishers_file: str, where: str) -> AppPolicy:
        """Build a policy from settings.

        Parameters
        ----------
        approved : list of str
            sha256 digests (``approved_apps``); :data:`INSTALLED` stands for
            :func:`installed_sha256`.
        publishers_file : str
            Path of the trusted-publishers YAML, or ``""`` for none.
        where : str
            ``site config`` or ``coordinator config``, for errors.

        Returns
        -------
        AppPolicy
            The checked policy.

        Raises
        ------
        ConfigError
            A digest or the publishers file is invalid, or ``installed`` is given without a
            source tree to build.
        """
        digests = frozenset(
            installed_sha256() if h == INSTALLED else check_sha256(h, f"{where}: approved_apps")
            for h in approved
        )
        keys = load_trusted_publishers(Path(publishers_file)) if publishers_file else {}
        return cls(digests, keys)

    @property
    def empty(self) -> bool:
        """True when nothing can ever be approved."""
        return not self.approved and not self.publishers

    def describe(self) -> str:
        """Return a one-line summary (counts, hash prefixes, key ids)."""
        if self.empty:
            return "no approved apps and no trusted publishers: every app is refused"
        hashes = ", ".join(sorted(h[:12] for h in self.approved)) or "none"
        keys = ", ".join(sorted(self.publishers)) or "none"
        return f"approved FAB sha256 {hashes}; trusted publishers {keys}"

    def decide(self, fab: bytes, signature: str = "") -> Decision:
        """Decide whether ``fab`` may run.

        Parameters
        ----------
        fab : bytes
            The FAB bytes as received; the hash is computed here.
        signature : str, optional
            :meth:`Signature.to_text` form, as the run config carries it (default ``""``).

        Returns
        -------
        Decision
            Approved when the hash is listed or the signature verifies with a trusted key.
        """
        digest = fab_sha256(fab)
        if digest in self.approved:
            return Decision(True, digest, "approved hash")
        if not signature:
            return Decision(False, digest, "hash not approved and the app is not signed")
        try:
            sig = Signature.parse(signature)
        except AppRefused as exc:
            return Decision(False, digest, str(exc))
        key = self.publishers.get(sig.key_id)
        if key is None:
            return Decision(False, digest, f"signed by {sig.key_id}, not a trusted publisher")
        message = create_message_to_sign(bytes.fromhex(digest), sig.signed_at)
        if not verify_signature(key, message, sig.signature):
            return Decision(False, digest, f"signature by {sig.key_id} does not verify")
        return Decision(True, digest, f"signed by {sig.key_id}")


def record_decision(path: Path, entry: dict[str, object]) -> None:
    """Append one decision to ``apps.jsonl`` (owner-only, fsynced).

    Parameters
    ----------
    path : Path
        The record; created 0600 if missing.
    entry : dict
        JSON-serialisable fields.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
