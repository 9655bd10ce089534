"""Updates a site already released: a retried round resends them instead of training again.

With the DP noise drawn from the site's own secret randomness, training a round twice gives two
different noisy updates: two releases. The ledger charges a round once per (run, round, global
model) (:meth:`fedhealth.privacy.ledger.PrivacyLedger.release`), so a coordinator that asks for
the same round again (after its own restart, or on purpose, with another seed or learning rate)
would get a second release for free and could average the noise down. Instead, the site stores
every update it is about to send, keyed by the ledger entry that charged it, and a retried round
resends those exact bytes. The update is stored before it is sent: if the site dies before
storing, nothing left the site, and training again is a first release.

Stored in safetensors (no pickle) beside the ledger, ``<ledger dir>/releases/``, owner-only;
only the last two rounds of a run are kept. An older update's file is replaced by an empty
``.purged`` marker (written before the update is deleted): a coordinator that asks for that
round again with the same global model (no new charge) is refused (1007 ``[policy:
released]``) instead of getting a second, freshly noised release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors
import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from fedhealth.errors import LedgerError, PolicyRefused
from fedhealth.privacy.ledger import Entry

__all__ = ["ReleaseStore", "resend"]

log = logging.getLogger("fedhealth.site")

KEEP_ROUNDS = 2  # a retry asks for the round in flight, or at most the one before
PURGED = ".purged"  # marks a released update deleted by the purge: that round is never retrained


def _fsync_dir(path: Path) -> None:
    """Make a new entry in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReleaseStore:
    """The updates a site has released, by the ledger entry that charged them.

    Parameters
    ----------
    ledger_path : Path
        The site's ``ledger.sqlite``; releases live in ``releases/`` beside it.
    """

    def __init__(self, ledger_path: Path) -> None:
        self.root = Path(ledger_path).parent / "releases"

    def lock(self, run: str, server_round: int) -> FileLock:
        """Return the lock that makes charge, training and storing one step per (run, round).

        A retry of a round that arrives while the first delivery still trains (two ClientApp
        processes) waits here, then finds the stored update and resends it: never a second
        release under one charge.

        Parameters
        ----------
        run : str
            The run's key.
        server_round : int
            The server round.

        Returns
        -------
        filelock.FileLock
            A lock file in ``releases/`` (owner-only), to use as a context manager.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        run_tag = hashlib.sha256(run.encode()).hexdigest()[:16]
        return FileLock(self.root / f"{run_tag}-r{server_round:06d}.lock", mode=0o600)

    def _path(self, run: str, server_round: int, entry: Entry) -> Path:
        run_tag = hashlib.sha256(run.encode()).hexdigest()[:16]
        return self.root / f"{run_tag}-r{server_round:06d}-{entry.hash[:16]}.safetensors"

    def load(
        self, run: str, server_round: int, entry: Entry
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """Return the update released under ``entry``, if it was stored.

        Parameters
        ----------
        run : str
            The run's key.
        server_round : int
            The server round.
        entry : Entry
            The ledger entry that charged the round.

        Returns
        -------
        tuple of (dict of str to Tensor, dict of str to float) or None
            The state dict and the training metrics sent with it; None when nothing was
            stored for that entry (never released).

        Raises
        ------
        LedgerError
            The stored file exists but cannot be read (the site must not train again then:
            that would be a second release).
        PolicyRefused
            The update was released and later purged (reply 1007 ``[policy: released]``).
        """
        path = self._path(run, server_round, entry)
        if not path.is_file() and path.with_suffix(PURGED).is_file():
            raise PolicyRefused(
                f"{path.with_suffix(PURGED)}: round {server_round} of this run was released and "
                f"its update deleted (only the last {KEEP_ROUNDS} rounds are kept); refusing to "
                "train it again (a second release under one charge). A run started over needs "
                "a new run_name. Nothing was trained or charged.",
                field="released",
            )
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                state = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118
                metrics = json.loads((stored.metadata() or {})["metrics"])
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:
            raise LedgerError(
                f"{path}: the update released for round {server_round} cannot be read ({exc}); "
                "refusing to train the round again (it would be a second release)"
            ) from exc
        return state, {str(k): float(v) for k, v in metrics.items()}

    def save(
        self,
        run: str,
        server_round: int,
        entry: Entry,
        state: dict[str, torch.Tensor],
        metrics: dict[str, float],
    ) -> Path:
        """Store an update durably before it is sent; keep only the run's last rounds.

        Parameters
        ----------
        run : str
            The run's key.
        server_round : int
            The server round.
        entry : Entry
            The ledger entry that charged the round.
        state : dict of str to Tensor
            The update (the model's state dict after local training).
        metrics : dict of str to float
            The training metrics sent with it (loss, examples, steps, seconds).

        Returns
        -------
        Path
            The stored file (mode 0600, written atomically and fsynced).
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(run, server_round, entry)
        tmp = path.with_suffix(".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp), metadata={"metrics": json.dumps(metrics)})
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        prefix = path.name.split("-r", 1)[0]
        for old in [
            *self.root.glob(f"{prefix}-r*.safetensors"),
            *self.root.glob(f"{prefix}-r*.lock"),
        ]:
            kept_round = int(old.name.split("-r", 1)[1].split("-", 1)[0].split(".", 1)[0])
            if kept_round <= server_round - KEEP_ROUNDS:
                if old.suffix == ".safetensors":  # the marker first: a crash keeps the refusal
                    marker = old.with_suffix(PURGED)
                    marker.touch(mode=0o600)
                    _fsync_dir(marker.parent)
                old.unlink(missing_ok=True)
        return path


def resend(
    stored: tuple[dict[str, torch.Tensor], dict[str, float]],
    model: torch.nn.Module,
    site: str,
    server_round: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prepare a stored release to be sent again, in the model's key order.

    Parameters
    ----------
    stored : tuple
        :meth:`ReleaseStore.load`'s state dict and metrics.
    model : torch.nn.Module
        The model of this round's instruction (its keys, in order, for packing).
    site : str
        The site's name, for the log and errors.
    server_round : int
        The server round, for the log.

    Returns
    -------
    tuple of (dict of str to Tensor, dict of str to float)
        The same tensors, in the model's key order, and the stored metrics.

    Raises
    ------
    LedgerError
        The stored update's keys are not the model's.
    """
    kept, done = stored
    if set(kept) != set(model.state_dict()):
        raise LedgerError(f"site {site}: the stored release does not fit the model")
    log.info(
        "site %s round %d: resending the update released before (charged once)", site, server_round
    )
    return {key: kept[key] for key in model.state_dict()}, done
