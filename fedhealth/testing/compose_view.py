"""How each service of a compose file sees this machine: its paths, hosts, command, environment.

* each named volume becomes a directory ``<workdir>/volumes/<name>``; a bind mount is its host
  path;
* a container path in a service's command, entrypoint, environment, healthcheck or
  bind-mounted config file is rewritten to the directory behind it: a path under a mount point
  to the volume's directory (mount-point prefix replacement); a path above a mount point
  (``data.root=/provision/data`` with volumes mounted at ``/provision/data/site-<i>``) to the
  service's own root ``<workdir>/fs/<service>``, where every mount point is a symlink to its
  volume directory;
* ``<service>:<port>`` becomes ``127.0.0.1:<port>``;
* ``python`` is this interpreter, another command found in this environment's ``bin`` runs from
  there; a process sees the service's ``environment`` plus ``PATH`` with that ``bin`` first
  and its own ``HOME``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from fedhealth.errors import ComposeError
from fedhealth.service.process import BIN
from fedhealth.testing.compose_file import Mount, Project, Service

_PATH_TOKEN = re.compile(r"(?<![\w./~-])/[\w.@+-]+(?:/[\w.@+-]*)*")
_PYTHONS = ("python", "python3", "python3.11")


def _file_mount(m: Mount) -> bool:
    return m.kind == "bind" and Path(m.source).is_file()


class Rewriter:
    """Map one service's container paths to local directories and its peers' names to loopback.

    Parameters
    ----------
    host_dirs : dict of Mount to Path
        Each of the service's mounts -> the local directory (or file copy) behind it.
    root : Path
        The service's own root: a container path above or beside a mount point lands here.
    hostnames : list of str
        The project's service names and hostnames (``name:port`` -> ``127.0.0.1:port``).
    """

    def __init__(self, host_dirs: dict[Mount, Path], root: Path, hostnames: list[str]) -> None:
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
        """Map one absolute container path to its local path.

        Parameters
        ----------
        token : str
            An absolute path inside the container.

        Returns
        -------
        str
            The local path: under the longest matching mount's directory, or under the
            service's root if it lies above or beside a mount point, else ``token`` unchanged.
        """
        for mount, local in self.mounts:
            if token == mount.target or token.startswith(mount.target + "/"):
                return str(local) + token[len(mount.target) :]
        if any(token == a or token.startswith(a + "/") for a in self.ancestors):
            return str(self.root) + token  # above or beside a mount point: the service's root
        return token

    def __call__(self, text: str) -> str:
        """Rewrite every container path and ``service:port`` in ``text``.

        Parameters
        ----------
        text : str
            An argument, environment value or config file's text.

        Returns
        -------
        str
            The text for a local process.
        """
        text = _PATH_TOKEN.sub(lambda m: self.path(m.group(0)), text)
        if self.host_re is not None:
            text = self.host_re.sub("127.0.0.1", text)
        return text


class Prepared(NamedTuple):
    """A service's prepared local view (see :meth:`LocalView.prepare`)."""

    rewrite: Rewriter
    """Its path and host rewriter."""
    cwd: Path
    """Its working directory, ``<root>/workdir``."""
    home: Path
    """Its ``HOME``, ``<root>/home``."""


class LocalView:
    """Every service's view of this machine, under one working directory.

    Parameters
    ----------
    project : Project
        The parsed compose file.
    workdir : Path
        Holds ``volumes/<name>`` (each named volume) and ``fs/<service>`` (each service's root).
    """

    def __init__(self, project: Project, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.volume_dirs = {v: self.workdir / "volumes" / v for v in project.volumes}
        self.hostnames = [
            *project.services,
            *[
                h
                for s in project.raw.get("services", {}).values()
                for h in [(s or {}).get("hostname")]
                if h
            ],
        ]
        self._prepared: dict[str, Prepared] = {}

    def prepare(self, svc: Service) -> Prepared:
        """Build the service's local filesystem (once) and its rewriter.

        Creates the volume directories it mounts, its root with a symlink at every mount
        point, a rewritten copy of every bind-mounted file, its working directory and home.

        Parameters
        ----------
        svc : Service
            The service.

        Returns
        -------
        Prepared
            Its rewriter, working directory and home (the same object on every call).
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
        rewrite = Rewriter(host_dirs, root, self.hostnames)
        for m, copy in files:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(rewrite(Path(m.source).read_text()))
        prepared = Prepared(rewrite, root / "workdir", root / "home")
        prepared.cwd.mkdir(parents=True, exist_ok=True)
        prepared.home.mkdir(parents=True, exist_ok=True)
        self._prepared[svc.name] = prepared
        return prepared

    def argv(self, args: list[str], rewrite: Rewriter) -> list[str]:
        """Turn a container command line into a local one.

        Parameters
        ----------
        args : list of str
            The command line in the container.
        rewrite : Rewriter
            The service's rewriter.

        Returns
        -------
        list of str
            Every argument rewritten; ``python`` is this interpreter, a command of this
            environment's ``bin`` its full path there.

        Raises
        ------
        ComposeError
            The command line is empty.
        """
        argv = [rewrite(a) for a in args]
        if not argv:
            raise ComposeError("empty command")
        exe = argv[0]
        if exe in _PYTHONS:
            argv[0] = sys.executable
        elif "/" not in exe and (BIN / exe).exists():
            argv[0] = str(BIN / exe)
        return argv

    def env(self, svc: Service, prepared: Prepared) -> dict[str, str]:
        """Build the environment of one of the service's processes.

        Parameters
        ----------
        svc : Service
            The service.
        prepared : Prepared
            Its prepared view (:meth:`prepare`).

        Returns
        -------
        dict of str to str
            Its ``environment`` rewritten, ``PATH`` with this environment's ``bin`` first
            (SuperLink spawns ``flower-superexec`` by name), ``HOME`` its own unless set.
        """
        env = {k: prepared.rewrite(v) for k, v in svc.environment.items()}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', os.environ.get('PATH', '/usr/bin:/bin'))}"
        env.setdefault("HOME", str(prepared.home))
        return env
