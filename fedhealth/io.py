"""Crash-safe file writes: temp file in the same directory -> fsync -> rename -> fsync dir."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; return its sha256 hex digest.

    The bytes go to a temporary file in the same directory, which is fsynced and renamed over
    ``path``; the directory is then fsynced. A crash leaves either the old file or the new
    one, never a mix. Missing parent directories are created.

    Parameters
    ----------
    path : Path or str
        The file to write or replace.
    data : bytes
        Its new content.

    Returns
    -------
    str
        Hex sha256 of ``data``.

    Raises
    ------
    OSError
        If writing, fsync or the rename fails; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: Path | str, text: str) -> str:
    """Write ``text`` as UTF-8 to ``path`` atomically, as :func:`atomic_write_bytes`.

    Parameters
    ----------
    path : Path or str
        The file to write or replace.
    text : str
        Its new content.

    Returns
    -------
    str
        Hex sha256 of the UTF-8 bytes.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: Path | str, line: str) -> None:
    """Append one line and fsync (JSON-lines logs: a crash loses at most the line being written).

    Parameters
    ----------
    path : Path or str
        The log file; created if missing.
    line : str
        The line; trailing newlines are replaced by exactly one.
    """
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path: Path | str) -> str:
    """Hash a file in 1 MiB chunks.

    Parameters
    ----------
    path : Path or str
        The file.

    Returns
    -------
    str
        Hex sha256 of its bytes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
