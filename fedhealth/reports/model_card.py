"""The model card of a run's global model: what it is, how it scored, what it cost in privacy.

Written beside the model (``<run dir>/model_card.json``) when a run finishes, and beside the
segmentations ``fedhealth predict`` writes. It carries no patient data: per-site figures are
those the sites released to the coordinator (Dice on their own test cases, epsilon spent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedhealth.runs.rundir import read_jsonl, read_metrics

__all__ = ["MODEL_CARD", "model_card", "write_model_card"]

MODEL_CARD = "model_card.json"
"""The model card's file name, beside the model."""


def _last_dice(lines: list[dict[str, Any]]) -> tuple[int | None, dict[str, dict[str, float]]]:
    for line in reversed(lines):
        sites = (line.get("evaluate") or {}).get("sites") or {}
        if sites:
            return int(line["round"]), {
                name: {k: v for k, v in m.items() if k.startswith("dice") or k == "num-examples"}
                for name, m in sorted(sites.items())
            }
    return None, {}


def model_card(run_dir: Path | str, server_round: int | None = None) -> dict[str, Any]:
    """Describe a run's final global model from its run directory.

    Parameters
    ----------
    run_dir : Path or str
        A run directory (``manifest.json``, ``config.yaml``, ``metrics.jsonl``,
        ``privacy.jsonl``, ``checkpoints/``).
    server_round : int or None, default None
        The round whose global model is described; None: the last completed round.

    Returns
    -------
    dict
        ``run``, ``config_sha256``, ``model`` (the config's ``model`` section), ``data``
        (patch size, spacing, orientation), ``checkpoint`` (file and sha256 of the last
        round's model, or of ``server_round``'s), ``round``, ``rounds_completed``, ``dice``
        (round evaluated and, per site, the Dice it reported on its own test cases),
        ``epsilon`` (per site: the last epsilon spent, its cap and delta), ``versions``.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` has no ``manifest.json``.
    """
    path = Path(run_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    done = int(manifest.get("rounds_completed", 0))
    name = f"round-{done if server_round is None else server_round:04d}.safetensors"
    evaluated, dice = _last_dice(read_metrics(path))
    epsilon: dict[str, dict[str, float]] = {}
    for row in read_jsonl(path / "privacy.jsonl"):
        if "epsilon" in row:
            epsilon[str(row["site"])] = {
                k: row[k] for k in ("epsilon", "epsilon_cap", "delta", "round") if k in row
            }
    data = config.get("data", {})
    return {
        "run": manifest.get("run", path.name),
        "config_sha256": manifest.get("config_sha256"),
        "model": config.get("model", {}),
        "data": {
            "patch_size": data.get("patch_size"),
            "target_spacing_mm": data.get("target_spacing"),
            "orientation": "RAS",
        },
        "checkpoint": {
            "file": f"checkpoints/{name}",
            "sha256": manifest.get("checkpoints", {}).get(name),
        },
        "round": done if server_round is None else server_round,
        "rounds_completed": done,
        "dice": {"round": evaluated, "sites": dice},
        "epsilon": dict(sorted(epsilon.items())),
        "versions": manifest.get("versions", {}),
    }


def write_model_card(
    run_dir: Path | str, out: Path | str | None = None, server_round: int | None = None
) -> Path:
    """Write :func:`model_card` as JSON to ``out`` (default: ``<run_dir>/model_card.json``).

    Parameters
    ----------
    run_dir : Path or str
        The run directory.
    out : Path or str or None, default None
        Where to write; a folder gets ``model_card.json`` inside.
    server_round : int or None, default None
        As :func:`model_card`.

    Returns
    -------
    Path
        The file written.
    """
    target = Path(out) if out is not None else Path(run_dir)
    if target.is_dir() or out is None:
        target = target / MODEL_CARD
    target.write_text(json.dumps(model_card(run_dir, server_round), indent=2) + "\n")
    return target
