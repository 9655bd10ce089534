"""Global-model checkpoints in safetensors (no pickle), each with its sha256.

``round-0003.safetensors`` holds the global model after round 3 and ``strategy-0003.safetensors``
the strategy's own state then (e.g. FedAdam's moments); ``SHA256SUMS`` lists every checkpoint's
digest in ``sha256sum`` format, and :meth:`CheckpointStore.load` refuses a file whose bytes no
longer match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhealth.errors import CheckpointError
from fedhealth.io import append_line, atomic_write_bytes, sha256_file


class CheckpointStore:
    """Checkpoints of one run, under ``directory``."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sums = self.directory / "SHA256SUMS"

    def path(self, server_round: int, kind: str = "round") -> Path:
        return self.directory / f"{kind}-{server_round:04d}.safetensors"

    def save(
        self, server_round: int, arrays: dict[str, np.ndarray], kind: str = "round"
    ) -> tuple[Path, str]:
        """Write the round's model atomically; returns (path, sha256)."""
        # One metadata key only: safetensors writes a multi-key metadata map in hash order,
        # which would make identical models hash differently.
        data = st_save(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            metadata={"fedhealth-round": str(server_round)},
        )
        path = self.path(server_round, kind)
        digest = atomic_write_bytes(path, data)
        append_line(self.sums, f"{digest}  {path.name}")
        return path, digest

    def recorded(self) -> dict[str, str]:
        """File name -> sha256 as listed in ``SHA256SUMS`` (last entry wins)."""
        if not self.sums.is_file():
            return {}
        entries: dict[str, str] = {}
        for line in self.sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if digest and name:
                entries[name] = digest
        return entries

    def rounds(self, kind: str = "round") -> list[int]:
        prefix = f"{kind}-"
        return sorted(
            int(name[len(prefix) : len(prefix) + 4])
            for name in self.recorded()
            if name.startswith(prefix)
        )

    def load(self, server_round: int, kind: str = "round") -> dict[str, np.ndarray]:
        """Load and verify the round's checkpoint against its recorded sha256."""
        path = self.path(server_round, kind)
        expected = self.recorded().get(path.name)
        if not path.is_file() or expected is None:
            raise CheckpointError(f"{path}: no checkpoint recorded for round {server_round}")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 {actual[:12]}... != recorded {expected[:12]}...")
        return st_load(path.read_bytes())

    def latest(self) -> int | None:
        rounds = self.rounds()
        return rounds[-1] if rounds else None
