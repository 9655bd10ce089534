"""The run config of a deployed run, written and read.

The resolved :class:`~fedhealth.config.Config` travels as one JSON string under
:data:`~fedhealth.protocol.keys.RUN_CONFIG` (``flwr run --run-config``): plain values only, never
class paths or pickles.
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
    """Return the validated config carried by a run config.

    Parameters
    ----------
    run_config : dict[str, object]
        Flower's ``context.run_config``; the config is the JSON string under
        :data:`~fedhealth.protocol.keys.RUN_CONFIG` (``fedhealth-config``).

    Returns
    -------
    Config
        The config, validated by :func:`fedhealth.config.validate`.

    Raises
    ------
    ConfigError
        The key is missing or empty, its value is not valid JSON, or the config is invalid.
    """
    from fedhealth.config import validate

    raw = run_config.get(RUN_CONFIG, "")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"run config needs '{RUN_CONFIG}' (JSON of the resolved config)")
    try:
        return validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config '{RUN_CONFIG}' is not valid JSON: {exc}") from exc


def run_config_toml(cfg: Config) -> str:
    """Return the ``--run-config`` TOML: the resolved config as one JSON string.

    ``json.dumps`` of a string is a valid TOML basic string (same escapes, ASCII only).

    Parameters
    ----------
    cfg : Config
        The resolved config.

    Returns
    -------
    str
        One line, ``fedhealth-config = "<JSON>"``, keys sorted.
    """
    payload = json.dumps(asdict(cfg), sort_keys=True)
    return f"{RUN_CONFIG} = {json.dumps(payload)}\n"


def write_run_config(cfg: Config, path: Path | str) -> Path:
    """Write :func:`run_config_toml` of ``cfg`` to ``path`` atomically.

    Parameters
    ----------
    cfg : Config
        The resolved config.
    path : Path or str
        The TOML file to write (replaced if it exists).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    atomic_write_text(path, run_config_toml(cfg))
    return path
