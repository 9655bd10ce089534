"""Run the topology of ``docker/docker-compose.yml`` as local processes on loopback.

No Docker engine is needed: the compose file itself is the source of truth. It is read either
from ``docker-compose config`` (which validates it and interpolates ``${VAR:-default}``), or,
without docker-compose, with PyYAML plus the same interpolation done here. Then:

* each named volume becomes a directory ``<workdir>/volumes/<name>``; a bind mount is its host
  path;
* a container path in a service's command, entrypoint, environment or healthcheck is rewritten
  to the directory behind it: a path under a mount point to the volume's directory (mount-point
  prefix replacement); a path above a mount point (``data.root=/provision/data`` with volumes
  mounted at ``/provision/data/site-<i>``) to the service's own root ``<workdir>/fs/<service>``,
  where every mount point is a symlink to its volume directory;
* ``<service>:<port>`` becomes ``127.0.0.1:<port>``; ports are whatever the compose variables say,
  so the caller sets them to free ports (:func:`port_variables`, :func:`free_ports`);
* the image's entrypoint ``fedhealth`` (read from the Dockerfile) is this environment's
  ``fedhealth``, ``python`` its interpreter; a process sees the service's ``environment`` plus
  ``PATH`` with this environment's ``bin`` first (SuperLink spawns ``flower-superexec`` by name)
  and its own ``HOME``;
* services start in dependency order once their ``depends_on`` conditions hold
  (``service_started``, ``service_healthy`` by running the service's healthcheck command,
  ``service_completed_successfully``); a one-shot service (``restart: "no"``) must exit 0, a
  long-running one must not exit at all: either is an error naming the service, with its log.

Each service runs in its own process group with its log in ``<workdir>/logs/<service>.log``;
every wait has a deadline, and at the end every group gets SIGTERM, then SIGKILL.

:func:`isolation_problems` checks the rule the compose file promises: a hospital's volumes are
mounted by that hospital and by the one-shot provisioning services only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from fedhealth.errors import ComposeError
from fedhealth.testing.loopback import free_ports

BIN = Path(sys.executable).parent
ROLE_LABEL = "org.fedhealth.role"
PROVISION, COORDINATOR, HOSPITAL, LAUNCHER = "provision", "coordinator", "hospital", "launcher"

__all__ = [
    "ComposeError",
    "LocalTopology",
    "Mount",
    "Project",
    "Service",
    "TopologyRun",
    "assert_isolated",
    "compose_command",
    "free_ports",
    "isolation_problems",
    "load",
    "port_variables",
    "run",
]


# -- reading the compose file -------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    source: str  # volume name (kind "volume") or absolute host path (kind "bind")
    target: str  # absolute path inside the container
    kind: str  # "volume" | "bind"
    read_only: bool = False


@dataclass
class Service:
    name: str
    entrypoint: list[str] | None
    command: list[str]
    environment: dict[str, str]
    mounts: list[Mount]
    depends_on: dict[str, str]  # service -> condition
    healthcheck: dict[str, Any] | None
    restart: str
    labels: dict[str, str]
    networks: list[str]
    dockerfile: Path | None

    @property
    def role(self) -> str:
        return self.labels.get(ROLE_LABEL, "")

    @property
    def one_shot(self) -> bool:
        return self.restart in ("no", "")

    @property
    def argv(self) -> list[str]:
        entry = (
            self.entrypoint if self.entrypoint is not None else image_entrypoint(self.dockerfile)
        )
        return [*entry, *self.command]


@dataclass
class Project:
    path: Path
    services: dict[str, Service]
    volumes: list[str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def by_role(self, role: str) -> list[Service]:
        return [s for s in self.services.values() if s.role == role]

    def order(self) -> list[str]:
        """Services in dependency order (Kahn; ties by name); a cycle is an error."""
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


def compose_command() -> list[str] | None:
    """``docker-compose`` (1.29 or 2.x standalone), else the ``docker compose`` plugin, else None."""
    if exe := shutil.which("docker-compose"):
        return [exe]
    if (docker := shutil.which("docker")) and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30
    ).returncode == 0:
        return [docker, "compose"]
    return None


def config_output(path: Path, variables: Mapping[str, str], timeout: float = 60.0) -> str:
    """``docker-compose -f PATH config``: validated and interpolated YAML (error if invalid)."""
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
    """Compose variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``,
    ``${VAR:?err}``, ``${VAR?err}``.
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
    """The compose variables that name a port (``FEDHEALTH_..._PORT...``), in file order."""
    names = re.findall(r"\$\{(FEDHEALTH_[A-Z0-9_]*PORT[A-Z0-9_]*)", Path(path).read_text())
    return list(dict.fromkeys(names))


def load(
    path: Path | str, variables: Mapping[str, str] | None = None, use_compose: bool | None = None
) -> Project:
    """Parse the compose file with ``variables`` substituted.

    ``use_compose`` None: through ``docker-compose config`` when it is installed, else PyYAML.
    """
    path = Path(path).resolve()
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
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
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
    if isinstance(build, dict) or isinstance(build, str):
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
    """The last ``ENTRYPOINT`` (exec form) of the Dockerfile; ``["fedhealth"]`` if none."""
    if dockerfile is not None and dockerfile.is_file():
        found = re.findall(r"^\s*ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.M)
        if found:
            return [str(x) for x in json.loads(found[-1])]
    return ["fedhealth"]


# -- isolation ----------------------------------------------------------------------------------
def isolation_problems(project: Project) -> list[str]:
    """What breaks "no hospital can read another's volume" (empty list: nothing).

    A volume (or bind source) that a hospital mounts may be mounted by no other service but the
    one-shot provisioning services; every hospital has its own data and key mounts; a hospital
    shares no network with another hospital.
    """
    problems: list[str] = []
    hospitals = project.by_role(HOSPITAL)
    if not hospitals:
        return ["no service is labelled as a hospital"]
    users: dict[str, set[str]] = {}
    for svc in project.services.values():
        for m in svc.mounts:
            users.setdefault(m.source, set()).add(svc.name)
    for h in hospitals:
        for m in h.mounts:
            others = {
                u
                for u in users[m.source]
                if u != h.name
                and not (project.services[u].role == PROVISION and project.services[u].one_shot)
            }
            if others:
                problems.append(
                    f"{h.name}'s volume {m.source} ({m.target}) is also mounted by "
                    f"{', '.join(sorted(others))}"
                )
        if h.networks:
            for other in hospitals:
                shared = set(h.networks) & set(other.networks)
                if other.name > h.name and shared:
                    problems.append(f"{h.name} and {other.name} share network(s) {sorted(shared)}")
        targets = {m.target for m in h.mounts}
        for needed in ("data_dir", "auth_key"):
            path = _setting(h, needed)
            if path is None or not any(path == t or path.startswith(t + "/") for t in targets):
                problems.append(f"{h.name}: {needed} ({path}) is not on a volume of its own")
    return problems


def assert_isolated(project: Project) -> None:
    """Raise :class:`ComposeError` listing every :func:`isolation_problems` entry."""
    problems = isolation_problems(project)
    if problems:
        raise ComposeError("compose file breaks hospital isolation: " + "; ".join(problems))


def _setting(svc: Service, key: str) -> str | None:
    for arg in svc.command:
        if arg.startswith(f"{key}="):
            return arg.split("=", 1)[1]
    return None


# -- running it as local processes ---------------------------------------------------------------
def _file_mount(m: Mount) -> bool:
    return m.kind == "bind" and Path(m.source).is_file()


_PATH_TOKEN = re.compile(r"(?<![\w./~-])/[\w.@+-]+(?:/[\w.@+-]*)*")


class Rewriter:
    """Container paths -> local directories, service hostnames -> 127.0.0.1, for one service."""

    def __init__(
        self, svc: Service, host_dirs: dict[Mount, Path], root: Path, hostnames: list[str]
    ) -> None:
        self.mounts = sorted(host_dirs.items(), key=lambda kv: -len(kv[0].target))
        self.root = root
        self.ancestors = {
            str(p)
            for m in host_dirs
            if not _file_mount(m)  # directories only
            for p in PurePosixPath(m.target).parents
            if str(p) != "/"
        }
        names = "|".join(re.escape(h) for h in sorted(hostnames, key=len, reverse=True))
        self.host_re = re.compile(rf"(?<![\w.-])(?:{names})(?=:\d)") if names else None

    def path(self, token: str) -> str:
        for mount, local in self.mounts:
            if token == mount.target or token.startswith(mount.target + "/"):
                return str(local) + token[len(mount.target) :]
        if any(token == a or token.startswith(a + "/") for a in self.ancestors):
            return str(self.root) + token  # above or beside a mount point: the service's root
        return token

    def __call__(self, text: str) -> str:
        text = _PATH_TOKEN.sub(lambda m: self.path(m.group(0)), text)
        if self.host_re is not None:
            text = self.host_re.sub("127.0.0.1", text)
        return text


@dataclass
class Running:
    service: Service
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    healthy: bool = False
    checked: float = 0.0  # when the healthcheck last ran
    failures: int = 0  # failed healthchecks after the start period


@dataclass
class TopologyRun:
    """What a local run of the compose topology left behind."""

    workdir: Path
    volumes: dict[str, Path]
    logs: dict[str, Path]
    exit_codes: dict[str, int | None]
    seconds: float

    def volume(self, name: str) -> Path:
        return self.volumes[name]


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    total, found = 0.0, False
    for num, unit in re.findall(r"([0-9.]+)(us|ms|h|m|s)", str(value)):
        found = True
        total += float(num) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total if found else default


class LocalTopology:
    """Start, watch and stop the services of a :class:`Project` as local processes."""

    def __init__(self, project: Project, workdir: Path, deadline: float) -> None:
        self.project, self.workdir, self.deadline = project, Path(workdir), deadline
        self.volume_dirs = {v: self.workdir / "volumes" / v for v in project.volumes}
        self.running: dict[str, Running] = {}
        self.done: dict[str, int] = {}
        self._prepared: dict[str, tuple[Rewriter, Path, Path]] = {}
        self.hostnames = [
            *project.services,
            *[
                h
                for s in project.raw.get("services", {}).values()
                for h in [(s or {}).get("hostname")]
                if h
            ],
        ]

    # paths -----------------------------------------------------------------------------------
    def _prepare(self, svc: Service) -> tuple[Rewriter, Path, Path]:
        """The service's local filesystem view (once): volume directories, its root with a
        symlink at every mount point, a rewritten copy of every bind-mounted file.
        """
        if svc.name in self._prepared:
            return self._prepared[svc.name]
        root = self.workdir / "fs" / svc.name
        host_dirs: dict[Mount, Path] = {}
        files: list[tuple[Mount, Path]] = []
        for m in svc.mounts:
            if _file_mount(m):
                copy = root / m.target.lstrip("/")  # a config file: container paths inside
                host_dirs[m] = copy
                files.append((m, copy))
                continue
            local = self.volume_dirs[m.source] if m.kind == "volume" else Path(m.source)
            local.mkdir(parents=True, exist_ok=True)
            host_dirs[m] = local
            link = root / m.target.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(local, target_is_directory=True)
        rewrite = Rewriter(svc, host_dirs, root, self.hostnames)
        for m, copy in files:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(rewrite(Path(m.source).read_text()))
        cwd = root / "workdir"
        home = root / "home"
        cwd.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        self._prepared[svc.name] = (rewrite, cwd, home)
        return self._prepared[svc.name]

    def _argv(self, args: list[str], rewrite: Rewriter) -> list[str]:
        argv = [rewrite(a) for a in args]
        if not argv:
            raise ComposeError("empty command")
        exe = argv[0]
        if exe in ("python", "python3", "python3.11"):
            argv[0] = sys.executable
        elif "/" not in exe and (BIN / exe).exists():
            argv[0] = str(BIN / exe)
        return argv

    def _env(self, svc: Service, rewrite: Rewriter, home: Path) -> dict[str, str]:
        env = {k: rewrite(v) for k, v in svc.environment.items()}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', os.environ.get('PATH', '/usr/bin:/bin'))}"
        env.setdefault("HOME", str(home))
        return env

    # processes -------------------------------------------------------------------------------
    def start(self, name: str) -> None:
        svc = self.project.services[name]
        rewrite, cwd, home = self._prepare(svc)
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = self._argv(svc.argv, rewrite)
        with log.open("ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=self._env(svc, rewrite, home),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = Running(svc, proc, log, started=time.monotonic())

    def healthy(self, name: str) -> bool:
        run = self.running[name]
        if run.healthy:
            return True
        check = run.service.healthcheck
        if not check or check.get("disable"):
            run.healthy = run.proc.poll() is None
            return run.healthy
        test = check.get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if not test or test[0] == "NONE":
            run.healthy = True
            return True
        now = time.monotonic()
        if now - run.checked < min(_seconds(check.get("interval"), 30.0), 2.0):
            return False
        run.checked = now
        rewrite, cwd, home = self._prepare(run.service)
        argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else list(test[1:])
        try:
            done = subprocess.run(
                self._argv(argv, rewrite),
                cwd=cwd,
                env=self._env(run.service, rewrite, home),
                capture_output=True,
                timeout=_seconds(check.get("timeout"), 30),
            )
            run.healthy = done.returncode == 0
        except subprocess.TimeoutExpired:
            run.healthy = False
        if not run.healthy and now - run.started > _seconds(check.get("start_period"), 0.0):
            run.failures += 1
            if run.failures > int(check.get("retries", 3)):
                raise ComposeError(
                    f"service {name} is unhealthy: its healthcheck failed "
                    f"{run.failures} times\n{self.logs()}"
                )
        return run.healthy

    def condition_met(self, dep: str, condition: str) -> bool:
        if condition == "service_completed_successfully":
            return self.done.get(dep) == 0
        if dep not in self.running:
            return False
        if condition == "service_healthy":
            return self.healthy(dep)
        return True  # service_started

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- {name} ({run.log}) ---\n{run.log.read_text(errors='replace')[-tail:]}"
            for name, run in self.running.items()
            if run.log.exists()
        )

    def poll(self) -> None:
        """Record finished one-shots; any failure (one-shot != 0, daemon exit) is an error."""
        for name, run in self.running.items():
            code = run.proc.poll()
            if code is None or name in self.done:
                continue
            self.done[name] = code
            if not run.service.one_shot:
                raise ComposeError(f"long-running service {name} exited with {code}\n{self.logs()}")
            if code != 0:
                raise ComposeError(
                    f"one-shot service {name} failed with exit {code}\n{self.logs()}"
                )

    def run(self, poll_interval: float = 0.5) -> None:
        order = self.project.order()
        one_shots = {n for n in order if self.project.services[n].one_shot}
        while True:
            self.poll()
            if one_shots <= set(self.done):
                return
            for name in order:
                svc = self.project.services[name]
                if name in self.running:
                    continue
                if all(self.condition_met(d, c) for d, c in svc.depends_on.items()):
                    self.start(name)
            if time.monotonic() > self.deadline:
                waiting = {
                    n: {
                        d: c
                        for d, c in self.project.services[n].depends_on.items()
                        if not self.condition_met(d, c)
                    }
                    for n in order
                    if n not in self.running
                }
                raise ComposeError(
                    f"deadline passed; still running: "
                    f"{sorted(n for n in self.running if n not in self.done)}; not started "
                    f"(waiting on): {waiting}\n{self.logs()}"
                )
            time.sleep(poll_interval)

    def stop(self, grace: float = 20.0) -> None:
        for run in reversed(list(self.running.values())):
            if run.proc.poll() is None:
                try:
                    os.killpg(run.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + grace
        for run in self.running.values():
            try:
                run.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (a SuperLink's ServerApp): kill it anyway
                os.killpg(run.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if run.proc.poll() is None:
                run.proc.wait(timeout=5)


def run(
    path: Path | str,
    workdir: Path | str,
    variables: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    use_compose: bool | None = None,
) -> TopologyRun:
    """Run the compose file's topology as local processes until every one-shot service has
    finished (0 exit), then stop the long-running ones. Raises :class:`ComposeError` naming the
    service that failed (with every service's log tail) or what was still waited on at the
    deadline.
    """
    start = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    project = load(path, variables, use_compose=use_compose)
    assert_isolated(project)
    topo = LocalTopology(project, workdir, start + timeout)
    try:
        topo.run()
    finally:
        topo.stop()
    return TopologyRun(
        workdir=workdir,
        volumes=topo.volume_dirs,
        logs={n: r.log for n, r in topo.running.items()},
        exit_codes={n: r.proc.returncode for n, r in topo.running.items()},
        seconds=time.monotonic() - start,
    )
