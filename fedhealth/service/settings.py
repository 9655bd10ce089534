"""Load a service's YAML settings file plus ``key=value`` overrides into a typed dataclass.

OmegaConf checks keys and types against the dataclass; errors name the file and the key.
Relative paths in a file are taken relative to that file's directory (so a ``site.yaml`` can
sit next to its keys), relative paths given as overrides relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhealth.errors import ConfigError

T = TypeVar("T")


def load_settings(
    schema: type[T], path: Path | None, overrides: list[str], path_keys: tuple[str, ...], what: str
) -> T:
    base = OmegaConf.structured(schema)
    layers = []
    where = "command line"
    try:
        if path is not None:
            where = str(path)
            if not path.is_file():
                raise ConfigError(f"{path}: {what} config file not found")
            loaded = OmegaConf.load(path)
            for key in path_keys:
                value = loaded.get(key)
                if isinstance(value, str) and value and not Path(value).is_absolute():
                    loaded[key] = str((path.parent / value).resolve())
            layers.append(loaded)
        where = "overrides"
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"{what} override {item!r}: expected key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"{what} config: missing {', '.join(missing)}" + (f" (file {path})" if path else "")
            )
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc.msg).splitlines()[0] if exc.msg else type(exc).__name__
        raise ConfigError(f"{what} config ({where}): key {key}: {reason}") from exc
    assert isinstance(obj, schema)
    for key in path_keys:  # absolute from here on: services change directories
        value = getattr(obj, key)
        if value:
            setattr(obj, key, str(Path(value).resolve()))
    return obj
