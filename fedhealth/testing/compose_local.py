"""Run the services of a compose file as local processes, in dependency order, with deadlines.

Services start once their ``depends_on`` conditions hold (``service_started``,
``service_healthy`` by running the service's healthcheck command,
``service_completed_successfully``); a one-shot service (``restart: "no"``) must exit 0, a
long-running one must not exit at all: either is an error naming the service, with its log.
Each service leads its own process group (:func:`fedhealth.service.process.spawn`) with its log
in ``<workdir>/logs/<service>.log``; at the end every group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedhealth.errors import ComposeError
from fedhealth.service.process import spawn, stop_groups
from fedhealth.testing.compose_config import app_variables, duration_seconds
from fedhealth.testing.compose_file import Project, Service, load
from fedhealth.testing.compose_isolation import assert_isolated
from fedhealth.testing.compose_view import LocalView


@dataclass
class Running:
    """A started service.

    Parameters
    ----------
    service : Service
        What was started.
    proc : subprocess.Popen
        Its process (the leader of its group).
    log : Path
        Its log file.
    started : float
        When it started (``time.monotonic()`` seconds).
    healthy : bool, optional
        Its healthcheck passed (default False; once True it stays True).
    checked : float, optional
        When its healthcheck last ran (monotonic seconds; default 0).
    failures : int, optional
        Failed healthchecks after its start period (default 0).
    """

    service: Service
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    healthy: bool = False
    checked: float = 0.0
    failures: int = 0


@dataclass
class TopologyRun:
    """What a local run of the compose topology left behind.

    Parameters
    ----------
    workdir : Path
        The run's working directory.
    volumes : dict of str to Path
        Each named volume's directory.
    logs : dict of str to Path
        Each started service's log file.
    exit_codes : dict of str to int or None
        Each started service's exit code (negative: killed by that signal).
    seconds : float
        Wall time of the whole run.
    """

    workdir: Path
    volumes: dict[str, Path]
    logs: dict[str, Path]
    exit_codes: dict[str, int | None]
    seconds: float

    def volume(self, name: str) -> Path:
        """Return the directory of the named volume.

        Parameters
        ----------
        name : str
            A volume of the compose file.

        Returns
        -------
        Path
            ``<workdir>/volumes/<name>``.

        Raises
        ------
        KeyError
            The compose file declares no such volume.
        """
        return self.volumes[name]


class LocalTopology:
    """Start, watch and stop the services of a :class:`Project` as local processes.

    Parameters
    ----------
    project : Project
        The parsed compose file.
    workdir : Path
        Holds the volumes, each service's root and the logs.
    deadline : float
        ``time.monotonic()`` by which :meth:`run` must be done.
    """

    def __init__(self, project: Project, workdir: Path, deadline: float) -> None:
        self.project, self.workdir, self.deadline = project, Path(workdir), deadline
        self.view = LocalView(project, self.workdir)
        self.volume_dirs = self.view.volume_dirs
        self.running: dict[str, Running] = {}
        self.done: dict[str, int] = {}

    def start(self, name: str) -> None:
        """Start a service in the background, its output appended to its log.

        Parameters
        ----------
        name : str
            The service.

        Raises
        ------
        ComposeError
            Its command line is empty.
        """
        svc = self.project.services[name]
        prepared = self.view.prepare(svc)
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = self.view.argv(svc.argv, prepared.rewrite)
        with log.open("ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            proc = spawn(
                argv,
                cwd=prepared.cwd,
                env=self.view.env(svc, prepared),
                stdin=subprocess.DEVNULL,
                stdout=out,
            )
        self.running[name] = Running(svc, proc, log, started=time.monotonic())

    def healthy(self, name: str) -> bool:
        """Tell whether a started service is healthy, running its healthcheck if due.

        Without a healthcheck a service is healthy while it runs. A check runs at most every
        ``min(interval, 2 s)``; failures after ``start_period`` count against ``retries``.

        Parameters
        ----------
        name : str
            A started service.

        Returns
        -------
        bool
            Whether its last healthcheck passed.

        Raises
        ------
        ComposeError
            The healthcheck failed more than ``retries`` times (the message ends with the logs).
        """
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
        if now - run.checked < min(duration_seconds(check.get("interval"), 30.0), 2.0):
            return False
        run.checked = now
        prepared = self.view.prepare(run.service)
        argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else list(test[1:])
        try:
            done = subprocess.run(
                self.view.argv(argv, prepared.rewrite),
                cwd=prepared.cwd,
                env=self.view.env(run.service, prepared),
                capture_output=True,
                timeout=duration_seconds(check.get("timeout"), 30),
            )
            run.healthy = done.returncode == 0
        except subprocess.TimeoutExpired:
            run.healthy = False
        if not run.healthy and now - run.started > duration_seconds(check.get("start_period"), 0.0):
            run.failures += 1
            if run.failures > int(check.get("retries", 3)):
                raise ComposeError(
                    f"service {name} is unhealthy: its healthcheck failed "
                    f"{run.failures} times\n{self.logs()}"
                )
        return run.healthy

    def condition_met(self, dep: str, condition: str) -> bool:
        """Tell whether a ``depends_on`` condition on ``dep`` holds now.

        Parameters
        ----------
        dep : str
            The service depended on.
        condition : str
            ``service_started``, ``service_healthy`` or ``service_completed_successfully``.

        Returns
        -------
        bool
            Whether the condition holds.

        Raises
        ------
        ComposeError
            ``dep``'s healthcheck failed too often (see :meth:`healthy`).
        """
        if condition == "service_completed_successfully":
            return self.done.get(dep) == 0
        if dep not in self.running:
            return False
        if condition == "service_healthy":
            return self.healthy(dep)
        return True  # service_started

    def logs(self, tail: int = 4000) -> str:
        """Return the end of every started service's log, each under a header line.

        Parameters
        ----------
        tail : int, optional
            Characters kept from the end of each log (default 4000).

        Returns
        -------
        str
            The log tails, in start order.
        """
        return "\n".join(
            f"--- {name} ({run.log}) ---\n{run.log.read_text(errors='replace')[-tail:]}"
            for name, run in self.running.items()
            if run.log.exists()
        )

    def poll(self) -> None:
        """Record the services that finished.

        Raises
        ------
        ComposeError
            A one-shot service exited non-zero, or a long-running one exited at all (the
            message names it and ends with the logs).
        """
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
        """Start services as their dependencies allow until every one-shot service has exited 0.

        Parameters
        ----------
        poll_interval : float, optional
            Seconds between checks (default 0.5).

        Raises
        ------
        ComposeError
            The dependencies are unknown or cyclic, a service failed (see :meth:`poll`,
            :meth:`healthy`), or the deadline passed (naming what still ran and what waited on
            what).
        """
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
        """Stop every service: SIGTERM (last started first), ``grace`` seconds, SIGKILL.

        Every group gets SIGKILL in the end, even after its leader exited: a group may outlive
        its leader (a SuperLink's ServerApp).

        Parameters
        ----------
        grace : float, optional
            Seconds all services together have to exit after SIGTERM (default 20).
        """
        procs = [run.proc for run in reversed(list(self.running.values()))]
        stop_groups(procs, grace=grace, kill_wait=5.0, kill_leftovers=True)


def run(
    path: Path | str,
    workdir: Path | str,
    variables: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    *,
    use_compose: bool | None = None,
) -> TopologyRun:
    """Run the compose file's topology as local processes until its one-shot services are done.

    Then the long-running services are stopped. The file must keep the hospitals apart
    (:func:`fedhealth.testing.compose_isolation.assert_isolated`).

    Parameters
    ----------
    path : Path or str
        The compose file.
    workdir : Path or str
        Where the volumes, service roots and logs go (created).
    variables : mapping of str to str, optional
        Compose variables (ports: see :func:`fedhealth.testing.compose_file.port_variables`);
        ``FEDHEALTH_APP_SHA256`` defaults to this project's FAB (:func:`app_variables`).
    timeout : float, optional
        Seconds until every one-shot service must have exited 0 (default 600).
    use_compose : bool or None, optional
        How to read the file (see :func:`fedhealth.testing.compose_file.load`).

    Returns
    -------
    TopologyRun
        Volumes, logs, exit codes and wall time.

    Raises
    ------
    ComposeError
        The file is invalid or breaks isolation, a service failed (named, with every
        service's log tail), or the deadline passed (with what was still waited on).
    """
    start = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    variables = {**app_variables(), **(variables or {})}  # the sites approve this project
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
