"""The run directory: what happened in one run, written as it happens.

```
<run_root>/<run_name>/
  config.yaml            resolved configuration
  metrics.jsonl          one JSON line per round: per-site and weighted train/evaluate metrics
                         (with evaluation folded into the next round's train message, a round's
                         line is written when that evaluation arrives; until then it waits in
                         the manifest as ``pending_line``)
  checkpoints/           round-NNNN.safetensors + SHA256SUMS
  manifest.json          versions, config hash, seed, rounds completed, checkpoint hashes
```
A run directory that exists is resumed, not overwritten: same configuration (hash of
config.yaml) -> the run continues after its last completed round (lines written for a round
that did not complete are dropped); a finished run is left as it is; a different configuration
is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.config import Config, to_yaml
from fedhealth.errors import ConfigError
from fedhealth.io import append_line, atomic_write_text
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.runs.ledgers import LedgerWatch
from fedhealth.runs.records import (
    Manifest,
    MetricsLine,
    PrivacyRow,
    RoundLog,
    SiteMetrics,
    weighted,
)

__all__ = [
    "PACKAGES",
    "PrivacyRow",
    "RoundLog",
    "RunDir",
    "SiteMetrics",
    "package_versions",
    "read_jsonl",
    "read_metrics",
    "weighted",
]

PACKAGES = ("fedhealth", "flwr", "torch", "monai", "opacus", "numpy", "safetensors")


def package_versions() -> dict[str, str]:
    """Return the versions of Python and of the packages a run's results depend on.

    Returns
    -------
    dict[str, str]
        ``python`` and each of :data:`PACKAGES` -> its version, or ``"not installed"``.
    """
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunDir:
    """Create (or resume) and fill one run directory; the strategy calls it as rounds progress.

    The run directory holds the global model and per-site metrics: it is created owner-only
    (0700), and the process's umask is set to 077 so every file written into it (checkpoints,
    metrics, reports) is owner-only too.

    Parameters
    ----------
    path : Path or str
        The run directory; created if missing, resumed if it holds this config's manifest.
    cfg : Config
        The resolved run config (its YAML's sha256 identifies the run).

    Raises
    ------
    ConfigError
        ``path`` holds a run of a different configuration.
    """

    def __init__(self, path: Path | str, cfg: Config) -> None:
        self.path = Path(path)
        os.umask(0o077)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self.cfg = cfg
        self.metrics = self.path / "metrics.jsonl"
        self.privacy = self.path / "privacy.jsonl"
        self.checkpoints = CheckpointStore(self.path / "checkpoints")
        self.rounds: dict[int, RoundLog] = {}
        self.ledgers = LedgerWatch()  # each site's ledger as reported: it may only grow
        self.started = time.time()
        config_text = to_yaml(cfg)
        config_sha = hashlib.sha256(config_text.encode()).hexdigest()
        self.resumed_from: int | None = None
        self.pending: MetricsLine | None = None  # a line waiting for its folded evaluation
        manifest = self.path / "manifest.json"
        if manifest.is_file():
            self.manifest: Manifest = json.loads(manifest.read_text())
            if self.manifest.get("config_sha256") != config_sha:
                raise ConfigError(
                    f"{self.path}: exists with a different configuration "
                    "(config.yaml); choose another run_name"
                )
            completed = int(self.manifest["rounds_completed"])
            if not self.manifest.get("finished") and (completed or 0 in self.checkpoints.rounds()):
                # (a coordinator that died before it checkpointed the initial model left nothing
                # to resume: the run starts afresh, with the same seeded initial model)
                self.resumed_from = completed
                self.pending = self.manifest.get("pending_line")
                # a pending round's line may have been written just before the coordinator died:
                # it is dropped and written again when the repeated evaluation arrives
                self._drop_lines_after(self.resumed_from, pending=self.pending is not None)
                self.ledgers.load(read_jsonl(self.privacy))
                self.manifest.setdefault("resumed", []).append(
                    {"at": _now(), "after_round": self.resumed_from}
                )
                self._write_manifest()
            return
        atomic_write_text(self.path / "config.yaml", config_text)
        self.manifest = {
            "run": self.path.name,
            "started": _now(),
            "finished": None,
            "seed": cfg.seed,
            "config_sha256": config_sha,
            "versions": package_versions(),
            "rounds_planned": cfg.rounds,
            "rounds_completed": 0,
            "checkpoints": {},
        }
        self._write_manifest()

    @property
    def key(self) -> str:
        """The run's identity, stable across resubmissions (sites key their ledger by it)."""
        return f"{self.path.name}@{self.manifest['config_sha256'][:16]}"

    @property
    def finished(self) -> bool:
        """Whether the run has finished (or stopped): nothing is left to do."""
        return bool(self.manifest.get("finished"))

    def _drop_lines_after(self, server_round: int, *, pending: bool = False) -> None:
        for path in (self.metrics, self.privacy):
            last = server_round - 1 if pending and path == self.metrics else server_round
            lines = [ln for ln in read_jsonl(path) if ln["round"] <= last]
            if path.is_file():
                atomic_write_text(
                    path, "".join(json.dumps(ln, sort_keys=True) + "\n" for ln in lines)
                )

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        """Open ``<run_root>/<run_name>``; an unnamed run is named after the UTC time.

        Parameters
        ----------
        cfg : Config
            The resolved run config (``run_root``, ``run_name``).

        Returns
        -------
        RunDir
            New, or resumed when the directory holds a run of the same config.
        """
        name = cfg.run_name or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return cls(Path(cfg.run_root) / name, cfg)

    def log(self, server_round: int) -> RoundLog:
        """Return round ``server_round``'s log, created empty on first use."""
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundLog(ledgers=self.ledgers)
        return self.rounds[server_round]

    def end_round(
        self, server_round: int, arrays: dict[str, np.ndarray], *, defer_evaluate: bool = False
    ) -> list[MetricsLine]:
        """Checkpoint the global model and append the round's metrics line.

        A waiting earlier line (see ``defer_evaluate``) is written first.

        Parameters
        ----------
        server_round : int
            The round that ended (0: the initial model).
        arrays : dict[str, np.ndarray]
            The global model after the round, per tensor.
        defer_evaluate : bool, default False
            This round's model is evaluated with the next round's train message, so its line
            waits (in the manifest, to survive a restart) until then.

        Returns
        -------
        list[dict]
            The lines written now, in round order.
        """
        written = self.flush_pending()
        started = time.perf_counter()
        ckpt, digest = self.checkpoints.save(server_round, arrays)
        saved = round(time.perf_counter() - started, 3)
        line: MetricsLine = {
            "round": server_round,
            "time": _now(),
            "elapsed_s": round(time.time() - self.started, 3),
            "checkpoint": {"file": f"checkpoints/{ckpt.name}", "sha256": digest},
        }
        if server_round > 0:
            entry = self.log(server_round)
            line["train"] = {
                "sites": entry.train,
                # securely aggregated: the sum's weighted loss (the sites' own stay inside it)
                "weighted": (
                    {k: v for k, v in entry.secure_sum.items() if k == "loss"}
                    if entry.secure_sum
                    else weighted(entry.train, ("loss",))
                ),
                "rejected": entry.rejected,
                "failed": entry.failed["train"],
            }
            if entry.secure_sum:
                line["train"]["secure_sum"] = entry.secure_sum
            line["coordinator_s"] = {**entry.seconds, "checkpoint": saved}
        if server_round > 0 and defer_evaluate:
            self.pending = line
            self.manifest["pending_line"] = line
        else:
            written.append(self._append(line))
        self._write_privacy(server_round)
        self.manifest["checkpoints"][ckpt.name] = digest
        self.manifest["rounds_completed"] = server_round
        self._write_manifest()
        return written

    def flush_pending(self) -> list[MetricsLine]:
        """Write the line waiting for its folded evaluation, with whatever evaluation arrived.

        Returns
        -------
        list[dict]
            The line written, or none when no line was waiting (the run may have stopped before
            the evaluation came: the line then has what arrived).
        """
        if self.pending is None:
            return []
        line, self.pending = self.pending, None
        self.manifest.pop("pending_line", None)
        return [self._append(line, folded=True)]

    def _append(self, line: MetricsLine, *, folded: bool = False) -> MetricsLine:
        server_round = line["round"]
        if server_round > 0:
            entry = self.log(server_round)
            line["evaluate"] = {
                "sites": entry.evaluate,
                "weighted": weighted(entry.evaluate, ("dice", "loss")),
                "rejected": entry.rejected_evaluate,
                "failed": entry.failed["evaluate"],
            }
            if folded:  # evaluated by the sites along with the next round's training
                line["evaluate"]["with_round"] = server_round + 1
        append_line(self.metrics, json.dumps(line, sort_keys=True))
        return line

    def _write_privacy(self, server_round: int) -> None:
        """Append the privacy table's lines: one per site and round (trained or refused)."""
        entry = self.log(server_round)
        for site, row in sorted(entry.privacy.items()):
            append_line(
                self.privacy,
                json.dumps(
                    {"round": server_round, "site": site, "status": "trained", **row},
                    sort_keys=True,
                ),
            )
        for site, reason in sorted(entry.refused.items()):
            append_line(
                self.privacy,
                json.dumps(
                    {"round": server_round, "site": site, "status": "refused", "reason": reason},
                    sort_keys=True,
                ),
            )

    def stop(self, server_round: int, reason: str) -> None:
        """Record that the run stopped cleanly in ``server_round``, and finish it.

        The global model stays as last saved.

        Parameters
        ----------
        server_round : int
            The round in which the run stopped.
        reason : str
            Why, as logged (goes to the manifest's ``stopped``).
        """
        self.flush_pending()
        self._write_privacy(server_round)
        self.manifest["stopped"] = {"round": server_round, "reason": reason}
        self.finish()

    def finish(self) -> None:
        """Write any waiting line and mark the run finished in the manifest."""
        self.flush_pending()
        self.manifest["finished"] = _now()
        self._write_manifest()

    def save_manifest(self) -> None:
        """Write ``manifest.json`` as it is now (temp file, fsync, rename)."""
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=2))


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Return the JSON objects of a JSON-lines file, in order; none if it does not exist.

    A last line cut short by a crash or Ctrl-C mid-write (no newline after it, not JSON) is
    left out: :func:`fedhealth.io.append_line` loses at most the line being written. Any other
    line that is not JSON raises (``json.JSONDecodeError``, a ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines]


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Return a run directory's ``metrics.jsonl`` lines, one per round, in order."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
