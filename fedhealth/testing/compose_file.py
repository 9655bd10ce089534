"""Read a compose file into typed services: mounts, dependencies, roles, healthchecks.

The document comes from :func:`fedhealth.testing.compose_config.read_document` (through
``docker-compose config``, or PyYAML plus the same interpolation); this module checks and types
it. See :mod:`fedhealth.testing.compose` for the whole harness.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fedhealth.errors import ComposeError
from fedhealth.testing.compose_config import read_document

ROLE_LABEL = "org.fedhealth.role"
PROVISION, COORDINATOR, HOSPITAL, LAUNCHER = "provision", "coordinator", "hospital", "launcher"


@dataclass(frozen=True)
class Mount:
    """One volume or bind mount of a service.

    Parameters
    ----------
    source : str
        The volume's name (``kind`` ``"volume"``) or the absolute host path (``"bind"``).
    target : str
        The absolute path inside the container.
    kind : str
        ``"volume"`` or ``"bind"``.
    read_only : bool, optional
        Mounted read-only (default False).
    """

    source: str
    target: str
    kind: str
    read_only: bool = False


@dataclass
class Service:
    """One service of a compose file, as far as running it locally needs.

    Parameters
    ----------
    name : str
        The service's name (also its hostname on the compose networks).
    entrypoint : list of str or None
        The service's own entrypoint; None: the image's (:func:`image_entrypoint`).
    command : list of str
        The command (a string command is split as a shell would).
    environment : dict of str to str
        The service's environment variables.
    mounts : list of Mount
        Its volumes and bind mounts.
    depends_on : dict of str to str
        Service name -> condition (``service_started``, ``service_healthy``,
        ``service_completed_successfully``).
    healthcheck : dict or None
        The compose ``healthcheck`` mapping, as written.
    restart : str
        The restart policy; ``"no"`` marks a one-shot service.
    labels : dict of str to str
        Its labels (``org.fedhealth.role`` says its role).
    networks : list of str
        The networks it joins.
    dockerfile : Path or None
        The Dockerfile of its ``build``, if any.
    ports : list of str, optional
        Its published ports, as written (default: none).
    network_mode : str, optional
        Its ``network_mode`` (``"service:coordinator"`` shares that service's network
        namespace; default ``""``: its own).
    """

    name: str
    entrypoint: list[str] | None
    command: list[str]
    environment: dict[str, str]
    mounts: list[Mount]
    depends_on: dict[str, str]
    healthcheck: dict[str, Any] | None
    restart: str
    labels: dict[str, str]
    networks: list[str]
    dockerfile: Path | None
    ports: list[str] = field(default_factory=list)
    network_mode: str = ""

    @property
    def role(self) -> str:
        """The ``org.fedhealth.role`` label: provision, coordinator, hospital, launcher, ``""``."""
        return self.labels.get(ROLE_LABEL, "")

    @property
    def one_shot(self) -> bool:
        """Whether the service runs once and must exit 0 (restart policy ``"no"``)."""
        return self.restart in ("no", "")

    @property
    def argv(self) -> list[str]:
        """The container's command line: the entrypoint (its own or the image's), the command."""
        entry = (
            self.entrypoint if self.entrypoint is not None else image_entrypoint(self.dockerfile)
        )
        return [*entry, *self.command]


@dataclass
class Project:
    """A parsed compose file.

    Parameters
    ----------
    path : Path
        The compose file (absolute).
    services : dict of str to Service
        Its services by name.
    volumes : list of str
        Its named volumes.
    raw : dict, optional
        The whole parsed (interpolated) YAML document.
    """

    path: Path
    services: dict[str, Service]
    volumes: list[str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def by_role(self, role: str) -> list[Service]:
        """Return the services labelled with ``role``.

        Parameters
        ----------
        role : str
            One of :data:`PROVISION`, :data:`COORDINATOR`, :data:`HOSPITAL`, :data:`LAUNCHER`.

        Returns
        -------
        list of Service
            In file order.
        """
        return [s for s in self.services.values() if s.role == role]

    def order(self) -> list[str]:
        """Sort the services in dependency order (Kahn's algorithm; ties by name).

        Returns
        -------
        list of str
            Every service's name, each after those it depends on.

        Raises
        ------
        ComposeError
            A service depends on an unknown one, or the dependencies form a cycle.
        """
        pending = {name: set(s.depends_on) for name, s in self.services.items()}
        for name, deps in pending.items():
            unknown = deps - set(self.services)
            if unknown:
                raise ComposeError(f"service {name} depends on unknown {sorted(unknown)}")
        order: list[str] = []
        while pending:
            ready = sorted(n for n, deps in pending.items() if not deps - set(order))
            if not ready:
                raise ComposeError(f"dependency cycle among {sorted(pending)}")
            order.extend(ready)
            for name in ready:
                del pending[name]
        return order


def load(
    path: Path | str, variables: Mapping[str, str] | None = None, *, use_compose: bool | None = None
) -> Project:
    """Parse the compose file with ``variables`` substituted.

    Parameters
    ----------
    path : Path or str
        The compose file.
    variables : mapping of str to str, optional
        Compose variables (over the environment and the file's ``.env``). Default: none.
    use_compose : bool or None, optional
        True: through ``docker-compose config``; False: PyYAML and :func:`interpolate`.
        Default None: docker-compose when it is installed.

    Returns
    -------
    Project
        The services, volumes and raw document.

    Raises
    ------
    ComposeError
        docker-compose refuses the file, there are no services, a required variable is
        unset, or a mount is anonymous, undeclared, relative or of an unsupported type.
    """
    path = Path(path).resolve()
    data = read_document(path, variables, use_compose=use_compose)
    if not isinstance(data.get("services"), dict):
        raise ComposeError(f"{path}: no services")
    volumes = list((data.get("volumes") or {}).keys())
    services = {
        name: _service(name, spec or {}, path.parent, volumes)
        for name, spec in data["services"].items()
    }
    return Project(path, services, volumes, data)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(x) for x in value]


def _service(name: str, spec: dict[str, Any], base: Path, volumes: list[str]) -> Service:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(
            item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env
        )
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    labels = spec.get("labels") or {}
    if isinstance(labels, list):
        labels = dict(item.split("=", 1) for item in labels)
    networks = spec.get("networks") or []
    build = spec.get("build")
    dockerfile = None
    if isinstance(build, dict | str):
        context = Path(build if isinstance(build, str) else build.get("context", "."))
        context = context if context.is_absolute() else (base / context).resolve()
        name_ = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        dockerfile = context / name_
    entry = spec.get("entrypoint")
    restart = spec.get("restart", "no")
    return Service(
        name=name,
        entrypoint=None if entry is None else _as_list(entry),
        command=_as_list(spec.get("command")),
        environment={str(k): "" if v is None else str(v) for k, v in env.items()},
        mounts=[_mount(m, base, volumes, name) for m in spec.get("volumes") or []],
        depends_on={d: (c or {}).get("condition", "service_started") for d, c in deps.items()},
        healthcheck=spec.get("healthcheck"),
        restart="no" if restart is False else str(restart),
        labels={str(k): str(v) for k, v in labels.items()},
        networks=[str(n) for n in networks],  # a list, or a mapping of name -> settings
        dockerfile=dockerfile,
        ports=[
            f"{p.get('published', '')}:{p.get('target', '')}" if isinstance(p, dict) else str(p)
            for p in spec.get("ports") or []
        ],
        network_mode=str(spec.get("network_mode") or ""),
    )


def _mount(item: Any, base: Path, volumes: list[str], service: str) -> Mount:
    if isinstance(item, dict):  # long syntax (docker compose v2 config prints this)
        source, target = str(item.get("source", "")), str(item["target"])
        kind = str(item.get("type", "volume"))
        read_only = bool(item.get("read_only", False))
    else:
        parts = str(item).split(":")
        if len(parts) == 1:
            raise ComposeError(f"service {service}: anonymous volume {item!r}: name every volume")
        source, target = parts[0], parts[1]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    if kind == "bind":
        source = str((base / Path(source).expanduser()).resolve())
    elif kind == "volume" and source not in volumes:
        raise ComposeError(f"service {service}: volume {source!r} is not declared")
    elif kind not in ("volume", "bind"):
        raise ComposeError(f"service {service}: mount type {kind!r} is not supported")
    if not target.startswith("/"):
        raise ComposeError(f"service {service}: mount target {target!r} is not absolute")
    return Mount(source, str(PurePosixPath(target)), kind, read_only)


def image_entrypoint(dockerfile: Path | None) -> list[str]:
    """Read the image's entrypoint: the Dockerfile's last ``ENTRYPOINT`` in exec form.

    Parameters
    ----------
    dockerfile : Path or None
        The Dockerfile (None, or a missing file: no entrypoint found).

    Returns
    -------
    list of str
        The entrypoint; ``["fedhealth"]`` where none is found.
    """
    if dockerfile is not None and dockerfile.is_file():
        found = re.findall(r"^\s*ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.M)
        if found:
            return [str(x) for x in json.loads(found[-1])]
    return ["fedhealth"]
