"""The run config of a deployed run: the resolved :class:`~fedhealth.config.Config` as one JSON
string under :data:`~fedhealth.protocol.keys.RUN_CONFIG` (``flwr run --run-config``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fedhealth.errors import ConfigError
from fedhealth.io import atomic_write_text
from fedhealth.protocol.keys import RUN_CONFIG

if TYPE_CHECKING:
    from fedhealth.config import Config


def config_from_run_config(run_config: dict[str, object]) -> Config:
    """The run's config travels as one JSON object of plain values under ``fedhealth-config``."""
    from fedhealth.config import validate

    raw = run_config.get(RUN_CONFIG, "")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"run config needs '{RUN_CONFIG}' (JSON of the resolved config)")
    try:
        return validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config '{RUN_CONFIG}' is not valid JSON: {exc}") from exc


def run_config_toml(cfg: Config) -> str:
    """The ``--run-config`` TOML: the resolved config as one JSON string of plain values.

    ``json.dumps`` of a string is a valid TOML basic string (same escapes, ASCII only).
    """
    payload = json.dumps(asdict(cfg), sort_keys=True)
    return f"{RUN_CONFIG} = {json.dumps(payload)}\n"


def write_run_config(cfg: Config, path: Path | str) -> Path:
    path = Path(path)
    atomic_write_text(path, run_config_toml(cfg))
    return path
