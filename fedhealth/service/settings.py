"""Load a service's YAML settings file plus ``key=value`` overrides into a typed dataclass.

OmegaConf checks keys and types against the dataclass; errors name the file and the key.
Relative paths in a file are taken relative to that file's directory (so a ``site.yaml`` can
sit next to its keys), relative paths given as overrides relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhealth.errors import ConfigError

T = TypeVar("T")


def load_settings(
    schema: type[T], path: Path | None, overrides: list[str], path_keys: tuple[str, ...], what: str
) -> T:
    """Merge the dataclass defaults, the YAML file and ``key=value`` overrides; check them.

    Parameters
    ----------
    schema : type
        The settings dataclass: its fields are the allowed keys, their types and defaults
        (``"???"``: required).
    path : Path or None
        The YAML settings file; None: defaults and overrides only.
    overrides : list of str
        ``key=value`` items, applied after the file.
    path_keys : tuple of str
        The keys holding paths: a relative one in the file is taken relative to the file's
        directory, one given as an override relative to the working directory; all are made
        absolute.
    what : str
        What the settings are for (``site``, ``coordinator``), for error messages.

    Returns
    -------
    T
        An instance of ``schema``.

    Raises
    ------
    ConfigError
        The file is missing or not a mapping, an override has no ``=``, a key is unknown,
        missing or of the wrong type; the message names the file (or the overrides) and the
        key.
    """
    base = OmegaConf.structured(schema)
    layers = []
    where = "command line"
    try:
        if path is not None:
            where = str(path)
            if not path.is_file():
                raise ConfigError(f"{path}: {what} config file not found")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: {what} config must be a mapping of keys to values")
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
