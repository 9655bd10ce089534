"""Read the compose document with its variables substituted; compose's small syntaxes.

Through ``docker-compose config`` where it is installed (which also validates the file), else
with PyYAML plus the same interpolation done here (:func:`interpolate`), reading the file's
``.env`` as docker-compose does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedhealth.errors import ComposeError


def compose_command() -> list[str] | None:
    """Find docker-compose: ``docker-compose`` (1.29 or 2.x), else ``docker compose``.

    Returns
    -------
    list of str or None
        The command to run; None if neither is installed.
    """
    if exe := shutil.which("docker-compose"):
        return [exe]
    if (docker := shutil.which("docker")) and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30
    ).returncode == 0:
        return [docker, "compose"]
    return None


def config_output(path: Path, variables: Mapping[str, str], timeout: float = 60.0) -> str:
    """Run ``docker-compose -f PATH config``: the validated and interpolated file.

    Parameters
    ----------
    path : Path
        The compose file.
    variables : mapping of str to str
        Compose variables, on top of this process's environment (minus ``PYTHON*``).
    timeout : float, optional
        Seconds docker-compose may take (default 60).

    Returns
    -------
    str
        The YAML docker-compose prints.

    Raises
    ------
    ComposeError
        docker-compose is not installed, or it refuses the file (its error output included).
    """
    cmd = compose_command()
    if cmd is None:
        raise ComposeError("neither docker-compose nor `docker compose` is installed")
    # Debian's docker-compose is a program of the system's Python: none of this process's
    # PYTHON* variables (Ray's workers, for one, leave PYTHONPATH pointing into our venv).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, **variables}
    done = subprocess.run(
        [*cmd, "-f", str(path), "config"], capture_output=True, text=True, env=env, timeout=timeout
    )
    if done.returncode != 0:
        raise ComposeError(
            f"{' '.join(cmd)} -f {path} config failed (exit {done.returncode}):\n"
            f"{done.stderr.strip()}"
        )
    return done.stdout


_VAR = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Substitute compose variables as docker-compose does.

    Handles ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?err}`` and
    ``${VAR?err}``.

    Parameters
    ----------
    text : str
        A string of the compose file.
    variables : mapping of str to str
        The variables' values.

    Returns
    -------
    str
        ``text`` with every reference replaced (an unset one without default: ``""``).

    Raises
    ------
    ComposeError
        A required (``?``) variable is unset; the message has its error text.
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = variables.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise ComposeError(f"required variable {name} is not set: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(x, variables) for x in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, variables) for k, v in node.items()}
    return node


def port_variables(path: Path) -> list[str]:
    """List the compose variables that name a port (``FEDHEALTH_..._PORT...``).

    Parameters
    ----------
    path : Path
        The compose file.

    Returns
    -------
    list of str
        Variable names, each once, in file order.
    """
    names = re.findall(r"\$\{(FEDHEALTH_[A-Z0-9_]*PORT[A-Z0-9_]*)", Path(path).read_text())
    return list(dict.fromkeys(names))


def read_document(
    path: Path, variables: Mapping[str, str] | None = None, *, use_compose: bool | None = None
) -> dict[str, Any]:
    """Read the compose file as a mapping, its variables substituted.

    Parameters
    ----------
    path : Path
        The compose file.
    variables : mapping of str to str, optional
        Compose variables, over the environment and the file's ``.env``. Default: none.
    use_compose : bool or None, optional
        True: through ``docker-compose config``; False: PyYAML and :func:`interpolate`.
        Default None: docker-compose when it is installed.

    Returns
    -------
    dict
        The YAML document.

    Raises
    ------
    ComposeError
        docker-compose refuses the file, a required variable is unset, or the document is
        not a mapping.
    """
    variables = dict(variables or {})
    if use_compose is None:
        use_compose = compose_command() is not None
    if use_compose:
        data = yaml.safe_load(config_output(path, variables))
    else:
        env_file = path.parent / ".env"
        file_vars = {}
        if env_file.is_file():
            for line in env_file.read_text().splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    file_vars[key.strip()] = value.strip()
        data = _interpolate_tree(
            yaml.safe_load(path.read_text()), {**file_vars, **os.environ, **variables}
        )
    if not isinstance(data, dict):
        raise ComposeError(f"{path}: no services")
    return data


def duration_seconds(value: Any, default: float) -> float:
    """Read a compose duration (``30s``, ``1m30s``, ``500ms``, a number of seconds).

    Parameters
    ----------
    value : Any
        The value as written; None: not given.
    default : float
        Seconds to return when ``value`` is None or holds no duration.

    Returns
    -------
    float
        Seconds.
    """
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    total, found = 0.0, False
    for num, unit in re.findall(r"([0-9.]+)(us|ms|h|m|s)", str(value)):
        found = True
        total += float(num) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total if found else default


APP_VARIABLE = "FEDHEALTH_APP_SHA256"
"""The compose variable the hospitals' ``approved_apps`` is made of."""


def app_variables() -> dict[str, str]:
    """Return :data:`APP_VARIABLE` set to the sha256 of this project's FAB.

    That is what the launcher submits (``flwr run`` builds the same bytes), so the hospitals of
    a local run approve it, as an operator sets it from ``fedhealth app build``.

    Returns
    -------
    dict of str to str
        ``{"FEDHEALTH_APP_SHA256": <hex>}``.
    """
    from fedhealth.security.apps import build_fab, fab_sha256, project_dir

    return {APP_VARIABLE: fab_sha256(build_fab(project_dir()))}
