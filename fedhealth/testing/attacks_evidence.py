"""Evidence for the attack suite: a canary in a site's images, and a scan for any image byte.

:func:`plant_canary` writes a high-entropy run of voxels into one training image of a site
(before its daemon starts) and a canary token into its patient ids. :class:`Fingerprints` then
indexes what only that site's data holds: the canary voxels (float32 and float64), the token,
and every image file, stored and decompressed. :func:`scan` looks for any 23-byte run of it in
every file the coordinator holds: its SuperLink database (freed pages included, since the raw
file is read), logs, run directory, and whatever an attack app received.
:func:`egress_summary` reads the site's own egress log (one line per reply).
"""

from __future__ import annotations

import gzip
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

CANARY_VOXELS = 64  # one row of a 32^3 volume is 32; two rows
KEY = 8  # bytes per indexed window: site data is indexed every KEY bytes
MIN_DISTINCT = 6  # an indexed window needs this many distinct byte values (no zero runs)


@dataclass
class Fingerprints:
    """What only a site's data holds: a canary token and every image file's bytes.

    Parameters
    ----------
    token : str
        The canary token written into the site's patient ids.
    voxels : bytes
        The canary voxels as float32 little-endian.
    blobs : dict of str to bytes
        Label -> bytes of the site's data: each image file as stored (gzip) and its
        decompressed voxels, and the canary voxels as float32 and float64.
    """

    token: str
    voxels: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)

    def index(self) -> dict[int, tuple[str, int]]:
        """Index the blobs: every ``KEY``-byte window at a multiple of ``KEY``.

        A copy of any 23 consecutive bytes of a blob contains one indexed window followed by
        ``KEY`` more bytes, which :func:`scan` compares. Low-entropy windows (zeros, padding,
        label maps) are left out: they are not specific to the site.

        Returns
        -------
        dict of int to (str, int)
            The window as a little-endian integer -> (blob label, offset).
        """
        out: dict[int, tuple[str, int]] = {}
        for label, blob in self.blobs.items():
            usable = len(blob) - 2 * KEY
            if usable <= 0:
                continue
            rows = np.frombuffer(blob[: usable - usable % KEY], np.uint8).reshape(-1, KEY)
            ordered = np.sort(rows, axis=1)
            distinct = (np.diff(ordered, axis=1) != 0).sum(axis=1) + 1
            keys = rows.copy().view("<u8").reshape(-1)
            for row in np.flatnonzero(distinct >= MIN_DISTINCT):
                out.setdefault(int(keys[row]), (label, int(row) * KEY))
        return out


def _windows(data: bytes) -> NDArray[np.uint64]:
    """Every ``KEY``-byte window of ``data``, at every offset, as little-endian integers."""
    raw = np.frombuffer(data, np.uint8)
    n = len(raw) - KEY + 1
    out = np.zeros(max(n, 0), np.uint64)
    for k in range(KEY if n > 0 else 0):
        out |= raw[k : k + n].astype(np.uint64) << np.uint64(8 * k)
    return out


def plant_canary(site: Path) -> Fingerprints:
    """Plant a canary in the site's first training image and patient ids; fingerprint its data.

    Parameters
    ----------
    site : Path
        A site directory from ``fedhealth data synth`` (``dataset.json``, ``imagesTr/``).

    Returns
    -------
    Fingerprints
        The canary and the bytes of every image file of the site (after planting).
    """
    import nibabel as nib

    dataset_path = site / "dataset.json"
    dataset = json.loads(dataset_path.read_text())
    token = f"fh-canary-{secrets.token_hex(12)}"
    for split in ("training", "test"):
        for i, entry in enumerate(dataset[split]):
            entry["patient"] = f"{token}-{split}-{i}"
    dataset_path.write_text(json.dumps(dataset, indent=2))
    first = site / dataset["training"][0]["image"]
    img: Any = nib.load(str(first))
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    lo, hi = float(np.percentile(data, 5)), float(np.percentile(data, 95))
    rng = np.random.default_rng(secrets.randbits(64))
    canary = rng.uniform(lo, hi, CANARY_VOXELS).astype(np.float32)
    flat = data.reshape(-1)  # a view: the first two rows of the first slice
    flat[:CANARY_VOXELS] = canary
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(first))  # type: ignore[no-untyped-call]
    f32 = canary.astype("<f4").tobytes()
    prints = Fingerprints(token=token, voxels=f32)
    prints.blobs["canary voxels (float32)"] = f32
    prints.blobs["canary voxels (float64)"] = canary.astype("<f8").tobytes()
    for path in sorted(site.rglob("*.nii*")):
        raw = path.read_bytes()
        rel = str(path.relative_to(site))
        prints.blobs[f"{rel} (file)"] = raw
        if path.suffix == ".gz":
            prints.blobs[f"{rel} (decompressed)"] = gzip.decompress(raw)
    return prints


def scan(roots: list[Path], prints: Fingerprints) -> tuple[int, int, list[str]]:
    """Look for every fingerprint in every file under ``roots``.

    Parameters
    ----------
    roots : list of Path
        Files or directories (searched recursively; missing ones are skipped).
    prints : Fingerprints
        The site's fingerprints.

    Returns
    -------
    tuple of (int, int, list of str)
        Files read, bytes read, and ``"<pattern> in <file>"`` for every hit.
    """
    index = prints.index()
    keys = np.fromiter(index, np.uint64, len(index))
    token = prints.token.encode()
    files = [p for r in roots if r.exists() for p in ([r] if r.is_file() else r.rglob("*"))]
    count = size = 0
    hits = []
    for path in files:
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        count, size = count + 1, size + len(data)
        if token in data:
            hits.append(f"canary token in {path}")
        windows = _windows(data)
        for at in np.flatnonzero(np.isin(windows, keys)):
            label, offset = index[int(windows[at])]
            blob, i = prints.blobs[label], int(at)
            if data[i + KEY : i + 2 * KEY] == blob[offset + KEY : offset + 2 * KEY]:
                hits.append(f"{label} @{offset} in {path} @{i}")
                break  # one hit per file is enough evidence
    return count, size, hits


def egress_summary(path: Path) -> dict[str, Any]:
    """Summarise a site's egress log: replies, bytes, largest reply, error replies.

    Parameters
    ----------
    path : Path
        The site's ``egress_log`` (JSON lines from :class:`fedhealth.clientapp.egress.EgressLog`).

    Returns
    -------
    dict
        ``replies``, ``bytes``, ``max_bytes``, ``errors`` and ``types`` (count per message
        type); zeros when the log does not exist.
    """
    lines = []
    if path.exists():
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    types: dict[str, int] = {}
    for line in lines:
        types[str(line["type"])] = types.get(str(line["type"]), 0) + 1
    return {
        "replies": len(lines),
        "bytes": sum(int(x["bytes"]) for x in lines),
        "max_bytes": max((int(x["bytes"]) for x in lines), default=0),
        "errors": sum(bool(x["error"]) for x in lines),
        "types": types,
    }
