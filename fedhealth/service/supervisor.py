"""Keep long-running Flower processes alive: restart with exponential backoff, stop cleanly on
SIGTERM/SIGINT, and relay every line they print as one structured (JSON) log line.

Used by the site daemon (``flower-supernode``) and the coordinator service
(``flower-superlink``). Each child runs in its own session, so a stop reaches its own children
too (a SuperNode's ClientApp processes, a SuperLink's ServerApp).
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
from typing import Any, TextIO

from fedhealth.io import atomic_write_text

log = logging.getLogger("fedhealth.service")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=False)


def setup_json_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Route the ``fedhealth`` loggers to stderr (and ``log_file``) as JSON lines."""
    root = logging.getLogger("fedhealth")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(level)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)


@dataclass
class Child:
    """One supervised command."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    on_line: Callable[[str, str], None] | None = None  # (child name, line)
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = 0.0
    reader: threading.Thread | None = None
    last_exit: int | None = None


class Supervisor:
    """Run children until told to stop; restart each one that exits, with backoff.

    ``backoff_initial`` doubles per consecutive failure up to ``backoff_max``; a child that ran
    for ``healthy_after`` seconds starts again from ``backoff_initial``.
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
        self.children.append(child)
        return child

    # -- status ---------------------------------------------------------------------------------
    def set_status(self, **fields: Any) -> None:
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
        child.proc = subprocess.Popen(
            child.argv,
            cwd=child.cwd,
            env=child.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            bufsize=1,
            preexec_fn=_die_with_parent,
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
            log.log(
                _level(line), line, extra={"fields": {"event": "child.output", "child": child.name}}
            )
            if child.on_line is not None:
                try:
                    child.on_line(child.name, line)
                except Exception:  # noqa: BLE001 - a status hook must never stop the relay
                    log.exception("status hook failed on a line from %s", child.name)

    def _signal(self, child: Child, sig: int) -> None:
        if child.proc is not None and child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, sig)
            except ProcessLookupError:
                pass

    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        if not self.stopping.is_set():
            log.info(
                "stop requested (signal %d)",
                signum,
                extra={"fields": {"event": "stop.requested", "signal": signum}},
            )
        self.stopping.set()

    def run(self, until: Callable[[], bool] | None = None, poll: float = 0.2) -> int:
        """Supervise until SIGTERM/SIGINT (or ``until()`` is true); returns 0 after a clean stop."""
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
        """SIGTERM every child's process group, wait ``stop_grace``, then SIGKILL what is left."""
        self.set_status(state="stopping")
        for child in self.children:
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %.0fs; killing it",
                    child.name,
                    self.stop_grace,
                    extra={"fields": {"event": "child.kill", "child": child.name}},
                )
                self._signal(child, signal.SIGKILL)
                child.proc.wait(timeout=10)
            child.last_exit = child.proc.returncode
            if child.reader is not None:
                child.reader.join(timeout=5)
        self.set_status(state="stopped")
        log.info("stopped cleanly", extra={"fields": {"event": "stopped"}})
        return 0


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if the supervisor itself is killed (no orphaned SuperNode)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _level(line: str) -> int:
    """The level a child's line was printed at (Flower: ``ERROR :``; uvicorn: ``... INFO [``);
    HTTP access lines (a SuperNode polls every few seconds) only at debug level.
    """
    if "[uvicorn.access]" in line:
        return logging.DEBUG
    head = line[:40]
    for name in ("CRITICAL", "ERROR", "WARNING", "DEBUG"):
        if name in head:
            return getattr(logging, name)
    return logging.INFO


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
