"""Helpers for running the app on a real SuperLink with ``flwr run``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fedhealth.config import Config
from fedhealth.federation.apps import RUN_CONFIG_KEY
from fedhealth.io import atomic_write_text


def run_config_toml(cfg: Config) -> str:
    """The ``--run-config`` TOML: the resolved config as one JSON string of plain values.

    ``json.dumps`` of a string is a valid TOML basic string (same escapes, ASCII only).
    """
    payload = json.dumps(asdict(cfg), sort_keys=True)
    return f"{RUN_CONFIG_KEY} = {json.dumps(payload)}\n"


def write_run_config(cfg: Config, path: Path | str) -> Path:
    path = Path(path)
    atomic_write_text(path, run_config_toml(cfg))
    return path

