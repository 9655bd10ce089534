"""Keep long-running Flower processes alive, restarting them with exponential backoff.

A supervisor stops its children cleanly on SIGTERM/SIGINT and relays every line they print as
one structured log record (a child's hook may say at which level, with which words and fields:
:class:`Relayed`). Used by the site daemon (``flower-supernode``) and the
coordinator service (``flower-superlink``). Each child is started by
:func:`fedhealth.service.process.spawn` in its own session, so a stop reaches its own children
too (a SuperNode's ClientApp processes, a SuperLink's ServerApp), and it dies with the
supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, TextIO

from fedhealth.io import atomic_write_text
from fedhealth.service.jsonlog import JsonFormatter, setup_json_logging
from fedhealth.service.process import spawn, stop_groups

__all__ = ["Child", "JsonFormatter", "Relayed", "Supervisor", "setup_json_logging"]

log = logging.getLogger("fedhealth.service")


class Relayed(NamedTuple):
    """How the supervisor logs one line a child printed (what a :class:`Child` hook returns).

    Parameters
    ----------
    level : int
        The record's level: a line below the logger's level is not written at all.
    msg : str
        The words, without the child's own timestamp and level.
    fields : dict
        Structured fields of the record, merged as they are (never as a JSON string); an
        ``event`` key replaces the default ``child.output``.
    """

    level: int
    msg: str
    fields: dict[str, Any]


@dataclass
class Child:
    """One supervised command and what the supervisor knows of it.

    Parameters
    ----------
    name : str
        The child's name in logs and in the status file.
    argv : list of str
        The command and its arguments.
    env : dict of str to str
        The child's whole environment.
    cwd : Path
        Its working directory.
    on_line : callable, optional
        Called as ``on_line(name, line)`` with each non-empty line the child prints (ANSI
        colours removed), before the line is logged. It may return a :class:`Relayed`: the line
        is logged as that, once; None (or an exception in it, which is logged and never stops
        the relay): as the supervisor reads it. Default None.
    proc, started, restarts, delay, reader, last_exit
        Kept by the supervisor: the running process, when it started (monotonic seconds), how
        often it was restarted, the current backoff (seconds), the thread relaying its output,
        and its last exit code.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    on_line: Callable[[str, str], Relayed | None] | None = None
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = 0.0
    reader: threading.Thread | None = None
    last_exit: int | None = None


class Supervisor:
    """Run children until told to stop; restart each one that exits, with backoff.

    Parameters
    ----------
    status_file : Path, optional
        Where to keep the status as JSON (rewritten atomically on every change): ``state``
        (starting, running, backoff, stopping, stopped), ``since``, the supervisor's ``pid``
        and each child's pid, restarts and last exit code. Default None: not written.
    backoff_initial : float, optional
        Seconds before the first restart of a child that exited (default 1.0); the delay
        doubles with each consecutive failure.
    backoff_max : float, optional
        The longest delay between restarts, in seconds (default 60.0).
    healthy_after : float, optional
        A child that ran this many seconds before exiting starts again from
        ``backoff_initial`` (default 60.0).
    stop_grace : float, optional
        Seconds the children have, after SIGTERM, before SIGKILL (default 30.0).
    """

    def __init__(
        self,
        status_file: Path | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        healthy_after: float = 60.0,
        stop_grace: float = 30.0,
    ) -> None:
        self.children: list[Child] = []
        self.status_file = status_file
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.healthy_after, self.stop_grace = healthy_after, stop_grace
        self.stopping = threading.Event()
        self.status: dict[str, Any] = {
            "pid": os.getpid(),
            "state": "starting",
            "since": _now(),
            "children": {},
        }

    def add(self, child: Child) -> Child:
        """Supervise ``child`` too (started by :meth:`run`).

        Parameters
        ----------
        child : Child
            The command to keep running.

        Returns
        -------
        Child
            ``child`` itself, for its counters.
        """
        self.children.append(child)
        return child

    # -- status ---------------------------------------------------------------------------------
    def set_status(self, **fields: Any) -> None:
        """Update the status and write the status file.

        Parameters
        ----------
        **fields : Any
            Keys to set (JSON-serialisable). A new ``state`` also sets ``since`` unless given.
        """
        if "state" in fields and fields["state"] != self.status.get("state"):
            fields.setdefault("since", _now())
        self.status.update(fields)
        self._write_status()

    def _write_status(self) -> None:
        self.status["children"] = {
            c.name: {
                "pid": c.proc.pid if c.proc else None,
                "restarts": c.restarts,
                "last_exit": c.last_exit,
            }
            for c in self.children
        }
        self.status["updated"] = _now()
        if self.status_file is not None:
            atomic_write_text(self.status_file, json.dumps(self.status, indent=2, sort_keys=True))

    # -- processes ------------------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        child.proc = spawn(
            child.argv, cwd=child.cwd, env=child.env, stdout=subprocess.PIPE, text=True
        )
        child.started = time.monotonic()
        log.info(
            "started %s",
            child.name,
            extra={
                "fields": {
                    "event": "child.start",
                    "child": child.name,
                    "pid": child.proc.pid,
                    "restarts": child.restarts,
                }
            },
        )
        child.reader = threading.Thread(
            target=self._relay, args=(child, child.proc.stdout), daemon=True
        )
        child.reader.start()
        self._write_status()

    def _relay(self, child: Child, stream: TextIO | None) -> None:
        if stream is None:
            return
        for raw in stream:
            line = _strip_ansi(raw.rstrip())
            if not line.strip():
                continue
            relayed = None
            if child.on_line is not None:
                try:
                    relayed = child.on_line(child.name, line)
                except Exception:  # noqa: BLE001 - a status hook must never stop the relay
                    log.exception("status hook failed on a line from %s", child.name)
            if relayed is None:
                relayed = Relayed(_level(line), line, {})
            fields = {"event": "child.output", "child": child.name, **relayed.fields}
            log.log(relayed.level, "%s", relayed.msg, extra={"fields": fields})

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Ask :meth:`run` to stop its children and return (a signal handler).

        Parameters
        ----------
        signum : int, optional
            The signal received (default SIGTERM), for the log.
        _frame : FrameType, optional
            The interrupted frame (unused; the signal-handler signature).
        """
        if not self.stopping.is_set():
            log.info(
                "stop requested (signal %d)",
                signum,
                extra={"fields": {"event": "stop.requested", "signal": signum}},
            )
        self.stopping.set()

    def run(self, until: Callable[[], bool] | None = None, poll: float = 0.2) -> int:
        """Start the children and supervise them until SIGTERM/SIGINT, then stop them.

        Installs SIGTERM and SIGINT handlers (:meth:`request_stop`) for the duration and
        restores the previous ones. Call it from the main thread: a child dies with the thread
        that started it.

        Parameters
        ----------
        until : callable, optional
            Also stop once ``until()`` returns True (checked every ``poll`` seconds). Default
            None: only on a signal or :meth:`request_stop`.
        poll : float, optional
            Seconds between checks of the children (default 0.2).

        Returns
        -------
        int
            0 after a clean stop (the process exit code), as :meth:`stop`.
        """
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._start(child)
            self.set_status(state="running")
            restart_at: dict[str, float] = {}
            while not self.stopping.is_set():
                if until is not None and until():
                    break
                now = time.monotonic()
                for child in self.children:
                    assert child.proc is not None
                    code = child.proc.poll()
                    if code is None:
                        continue
                    if child.name not in restart_at:
                        child.last_exit = code
                        ran = now - child.started
                        child.delay = (
                            self.backoff_initial
                            if ran >= self.healthy_after or not child.delay
                            else min(self.backoff_max, child.delay * 2)
                        )
                        restart_at[child.name] = now + child.delay
                        log.warning(
                            "%s exited with %d after %.1fs; restarting in %.1fs",
                            child.name,
                            code,
                            ran,
                            child.delay,
                            extra={
                                "fields": {
                                    "event": "child.exit",
                                    "child": child.name,
                                    "code": code,
                                    "ran_s": round(ran, 1),
                                    "backoff_s": child.delay,
                                }
                            },
                        )
                        self.set_status(
                            state="backoff", last_exit={"child": child.name, "code": code}
                        )
                    elif now >= restart_at[child.name]:
                        del restart_at[child.name]
                        child.restarts += 1
                        self._start(child)
                        self.set_status(state="running")
                self.stopping.wait(poll)
            return self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> int:
        """Stop every child: SIGTERM to its process group, ``stop_grace`` seconds, SIGKILL.

        Returns
        -------
        int
            0: the exit code of a clean stop.

        Raises
        ------
        subprocess.TimeoutExpired
            A child still ran 10 s after SIGKILL.
        """
        self.set_status(state="stopping")
        started = [c for c in self.children if c.proc is not None]

        def killing(index: int) -> None:
            log.warning(
                "%s did not stop within %.0fs; killing it",
                started[index].name,
                self.stop_grace,
                extra={"fields": {"event": "child.kill", "child": started[index].name}},
            )

        stop_groups(
            [c.proc for c in started if c.proc is not None],
            grace=self.stop_grace,
            kill_wait=10,
            on_kill=killing,
        )
        for child in started:
            assert child.proc is not None
            child.last_exit = child.proc.returncode
            if child.reader is not None:
                child.reader.join(timeout=5)
        self.set_status(state="stopped")
        log.info("stopped cleanly", extra={"fields": {"event": "stopped"}})
        return 0


_LEVELS = (
    ("CRITICAL", logging.CRITICAL),
    ("ERROR", logging.ERROR),
    ("WARNING", logging.WARNING),
    ("DEBUG", logging.DEBUG),
)


_HTTPX_OK = re.compile(r" httpx: HTTP Request: .* \"HTTP/[\d.]+ [23]\d\d ")


def _level(line: str) -> int:
    """Guess the level a child's line was printed at (Flower: ``ERROR :``; uvicorn: ``INFO [``).

    HTTP access lines and successful httpx requests (an executor polls twice a second) are
    logged at debug level only.
    """
    if "[uvicorn.access]" in line or _HTTPX_OK.search(line):
        return logging.DEBUG
    head = line[:40]
    for name, level in _LEVELS:
        if name in head:
            return level
    return logging.INFO


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
