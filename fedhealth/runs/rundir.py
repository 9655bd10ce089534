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
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.config import Config, to_yaml
from fedhealth.errors import ConfigError
from fedhealth.io import append_line, atomic_write_text
from fedhealth.protocol.keys import NUM_EXAMPLES
from fedhealth.runs.checkpoint import CheckpointStore

PACKAGES = ("fedhealth", "flwr", "torch", "monai", "opacus", "numpy", "safetensors")

SiteMetrics = dict[str, float | int]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def weighted(rows: dict[str, SiteMetrics], keys: tuple[str, ...]) -> dict[str, float]:
    """Example-weighted mean of ``keys`` over the sites' metric rows."""
    total = sum(float(r[NUM_EXAMPLES]) for r in rows.values())
    if total <= 0:
        return {}
    return {
        k: sum(float(r[k]) * float(r[NUM_EXAMPLES]) for r in rows.values()) / total
        for k in keys
        if all(k in r for r in rows.values())
    }


@dataclass
class RoundLog:
    train: dict[str, SiteMetrics] = field(default_factory=dict)
    evaluate: dict[str, SiteMetrics] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # train replies: site -> reason
    rejected_evaluate: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=lambda: {"train": 0, "evaluate": 0})


class RunDir:
    """Creates and fills one run directory; the strategy calls it as rounds progress."""

    def __init__(self, path: Path | str, cfg: Config) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.metrics = self.path / "metrics.jsonl"
        self.privacy = self.path / "privacy.jsonl"
        self.checkpoints = CheckpointStore(self.path / "checkpoints")
        self.rounds: dict[int, RoundLog] = {}
        self.started = time.time()
        config_text = to_yaml(cfg)
        config_sha = hashlib.sha256(config_text.encode()).hexdigest()
        self.resumed_from: int | None = None
        self.pending: dict[str, Any] | None = None  # a line waiting for its folded evaluation
        manifest = self.path / "manifest.json"
        if manifest.is_file():
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
            if self.manifest.get("config_sha256") != config_sha:
                raise ConfigError(
                    f"{self.path}: exists with a different configuration "
                    "(config.yaml); choose another run_name"
                )
            if not self.manifest.get("finished"):
                self.resumed_from = int(self.manifest["rounds_completed"])
                self.pending = self.manifest.get("pending_line")
                # a pending round's line may have been written just before the coordinator died:
                # it is dropped and written again when the repeated evaluation arrives
                self._drop_lines_after(self.resumed_from, self.pending is not None)
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
        """Stable across resubmissions of the same run (sites key their ledger entries by it)."""
        return f"{self.path.name}@{self.manifest['config_sha256'][:16]}"

    @property
    def finished(self) -> bool:
        return bool(self.manifest.get("finished"))

    def _drop_lines_after(self, server_round: int, pending: bool = False) -> None:
        for path in (self.metrics, self.privacy):
            last = server_round - 1 if pending and path == self.metrics else server_round
            lines = [ln for ln in read_jsonl(path) if ln["round"] <= last]
            if path.is_file():
                atomic_write_text(
                    path, "".join(json.dumps(ln, sort_keys=True) + "\n" for ln in lines)
                )

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        name = cfg.run_name or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return cls(Path(cfg.run_root) / name, cfg)

    def log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog())

    def end_round(
        self, server_round: int, arrays: dict[str, np.ndarray], defer_evaluate: bool = False
    ) -> list[dict[str, Any]]:
        """Checkpoint the global model and append the round's metrics line; returns the lines
        written. ``defer_evaluate``: this round's model is evaluated with the next round's
        train message, so its line waits (in the manifest, to survive a restart) until then;
        a waiting earlier line is written first.
        """
        written = self.flush_pending()
        ckpt, digest = self.checkpoints.save(server_round, arrays)
        line: dict[str, Any] = {
            "round": server_round,
            "time": _now(),
            "elapsed_s": round(time.time() - self.started, 3),
            "checkpoint": {"file": f"checkpoints/{ckpt.name}", "sha256": digest},
        }
        if server_round > 0:
            entry = self.log(server_round)
            line["train"] = {
                "sites": entry.train,
                "weighted": weighted(entry.train, ("loss",)),
                "rejected": entry.rejected,
                "failed": entry.failed["train"],
            }
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

    def flush_pending(self) -> list[dict[str, Any]]:
        """Write the line waiting for its folded evaluation, with whatever evaluation arrived
        (none if the run stopped first).
        """
        if self.pending is None:
            return []
        line, self.pending = self.pending, None
        self.manifest.pop("pending_line", None)
        return [self._append(line, folded=True)]

    def _append(self, line: dict[str, Any], folded: bool = False) -> dict[str, Any]:
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
        """The privacy table: one JSON line per site and round (trained or refused)."""
        entry = self.log(server_round)
        for site, row in sorted(entry.privacy.items()):
            append_line(
                self.privacy,
                json.dumps(
                    {"round": server_round, "site": site, "status": "trained", **row},
                    sort_keys=True,
                ),
            )
        for site in sorted(entry.refused):
            append_line(
                self.privacy,
                json.dumps(
                    {"round": server_round, "site": site, "status": "refused"}, sort_keys=True
                ),
            )

    def stop(self, server_round: int, reason: str) -> None:
        """The run stopped cleanly in ``server_round``: the global model stays as last saved."""
        self.flush_pending()
        self._write_privacy(server_round)
        self.manifest["stopped"] = {"round": server_round, "reason": reason}
        self.finish()

    def finish(self) -> None:
        self.flush_pending()
        self.manifest["finished"] = _now()
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=2))


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
