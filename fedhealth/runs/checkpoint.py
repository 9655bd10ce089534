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
    """Checkpoints of one run, under ``directory``.

    Parameters
    ----------
    directory : Path or str
        Where the ``<kind>-NNNN.safetensors`` files and ``SHA256SUMS`` live; created if missing.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sums = self.directory / "SHA256SUMS"

    def path(self, server_round: int, kind: str = "round") -> Path:
        """Return the file of round ``server_round``'s checkpoint of ``kind``.

        Parameters
        ----------
        server_round : int
            The round (0 to 9999 for the four-digit name).
        kind : str, default "round"
            ``"round"`` for the global model, ``"strategy"`` for the strategy's state.

        Returns
        -------
        Path
            ``<directory>/<kind>-NNNN.safetensors``.
        """
        return self.directory / f"{kind}-{server_round:04d}.safetensors"

    def save(
        self, server_round: int, arrays: dict[str, np.ndarray], kind: str = "round"
    ) -> tuple[Path, str]:
        """Write the round's checkpoint atomically and record its sha256.

        Parameters
        ----------
        server_round : int
            The round the arrays belong to.
        arrays : dict[str, np.ndarray]
            Name -> array, any shapes and dtypes safetensors stores.
        kind : str, default "round"
            ``"round"`` (global model) or ``"strategy"`` (strategy state).

        Returns
        -------
        tuple[Path, str]
            The file written and its sha256 (hex).
        """
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
        """Return the rounds with a recorded checkpoint of ``kind``, ascending."""
        prefix = f"{kind}-"
        return sorted(
            int(name[len(prefix) : len(prefix) + 4])
            for name in self.recorded()
            if name.startswith(prefix)
        )

    def load(self, server_round: int, kind: str = "round") -> dict[str, np.ndarray]:
        """Load round ``server_round``'s checkpoint after verifying it against its sha256.

        Parameters
        ----------
        server_round : int
            The round.
        kind : str, default "round"
            ``"round"`` (global model) or ``"strategy"`` (strategy state).

        Returns
        -------
        dict[str, np.ndarray]
            Name -> array, as saved.

        Raises
        ------
        CheckpointError
            No such checkpoint is recorded, or its bytes no longer match the recorded sha256.
        """
        path = self.path(server_round, kind)
        expected = self.recorded().get(path.name)
        if not path.is_file() or expected is None:
            raise CheckpointError(f"{path}: no checkpoint recorded for round {server_round}")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 {actual[:12]}... != recorded {expected[:12]}...")
        return st_load(path.read_bytes())

    def latest(self) -> int | None:
        """Return the last round with a global-model checkpoint, or None when there is none."""
        rounds = self.rounds()
        return rounds[-1] if rounds else None
