"""Start a child process in its own session and stop its whole process group.

The one place fedhealth spawns and stops long-running children: the service supervisor
(:mod:`fedhealth.service.supervisor`), the loopback and compose harnesses
(:mod:`fedhealth.testing.loopback`, :mod:`fedhealth.testing.compose`) and the e2e consortium.

* :func:`spawn` starts a command as the leader of a new session (so a signal to its group reaches
  its own children too: a SuperNode's ClientApps, a SuperLink's ServerApp) which, on Linux, gets
  SIGTERM when the thread that started it dies (no orphans after a ``kill -9`` of the parent);
* :func:`signal_group` signals a group, quietly if it is already gone;
* :func:`stop_groups` sends SIGTERM to every group, waits for them until one shared deadline,
  then sends SIGKILL to each group still running.

:func:`flower_env` is the environment a Flower process runs with; :data:`MALLOC_SETTINGS` are
the glibc allocator settings it adds.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, overload

__all__ = ["BIN", "MALLOC_SETTINGS", "flower_env", "signal_group", "spawn", "stop_groups"]

BIN = Path(sys.executable).parent
"""This environment's ``bin`` directory (``flower-superlink``, ``flwr``, ``fedhealth``)."""

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
"""glibc's allocator settings for Flower's processes and their children (``mallopt(3)``).

By default glibc serves every block over 128 kB-32 MB with its own ``mmap`` and unmaps it on
``free``, so each model-sized buffer (a 5 MB message chunk, a 120 MB model joined from them, a
3D U-Net's activations) is faulted in and zeroed page by page by the kernel, every time. Measured
with ``perf`` on a 30M-parameter round (4 sites, 2 cores): the kernel's page zeroing was a fifth
of all CPU time, in training, in the ClientApp's unpacking and in the SuperLink, SuperNodes and
ServerApp. With both thresholds at 1 GiB, blocks under 1 GiB come from the heap and a freed one
is reused without a page fault (``benchmarks/round_overhead.py``, rows ``ours`` and
``ours-glibc-malloc``: 10.6-11.1 s against 12.7-13.6 s of non-training time per round, three
runs). The cost: a process keeps its peak heap instead of handing freed memory back (glibc
returns only a free heap top over 1 GiB): the SuperLink about the models of every site in flight
at once, a site's processes a few copies of the model. Values already in the environment win
(an operator's own setting; glibc reads an empty value as 0, i.e. every block mapped)."""

_PR_SET_PDEATHSIG = 1
# What ``stdin`` / ``stdout`` of :func:`spawn` accept (as for :class:`subprocess.Popen`).
_Stream = int | IO[Any] | None


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """Resolve libc's ``prctl`` in the parent (never ``dlopen`` in a forked child).

    Returns
    -------
    Callable or None
        ``prctl`` of ``libc.so.6``; None where there is none (not Linux, another libc).
    """
    try:
        func: Callable[..., int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return func


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this (forked, not yet exec'd) child when its parent dies.

    Runs in the child between fork and exec, so it only calls a function resolved before the
    fork. Linux only (``PR_SET_PDEATHSIG``); elsewhere a no-op.
    """
    prctl = _prctl()  # cached: resolved in the parent by spawn()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@overload
def spawn(
    argv: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str],
    stdin: _Stream = ...,
    stdout: _Stream = ...,
    text: Literal[False] = ...,
    die_with_parent: bool = ...,
) -> subprocess.Popen[bytes]: ...


@overload
def spawn(
    argv: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str],
    stdin: _Stream = ...,
    stdout: _Stream = ...,
    text: Literal[True],
    die_with_parent: bool = ...,
) -> subprocess.Popen[str]: ...


def spawn(
    argv: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str],
    stdin: _Stream = None,
    stdout: _Stream = None,
    text: bool = False,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes] | subprocess.Popen[str]:
    """Start ``argv`` as the leader of a new session, stderr merged into stdout.

    Parameters
    ----------
    argv : sequence of str
        The command and its arguments (``argv[0]`` a path or a name on ``env``'s ``PATH``).
    cwd : Path or str
        Working directory of the child.
    env : mapping of str to str
        The child's whole environment (nothing is inherited beyond it).
    stdin, stdout : int, file object or None, optional
        As for :class:`subprocess.Popen` (``subprocess.PIPE``, ``subprocess.DEVNULL``, an open
        file); default None: this process's own.
    text : bool, optional
        Default False: bytes streams. True: text streams, line-buffered, undecodable bytes
        replaced (for reading a child's output line by line).
    die_with_parent : bool, optional
        Default True: on Linux the child gets SIGTERM when the thread that started it dies
        (``PR_SET_PDEATHSIG``), so killing the parent leaves no orphan. Start children from a
        thread that lives as long as they should (the main thread).

    Returns
    -------
    subprocess.Popen
        The running child; its pid is also its process group's id.

    Raises
    ------
    OSError
        The command cannot be started (``FileNotFoundError`` for a missing executable).
    """
    preexec = None
    if die_with_parent:
        _prctl()  # resolve it here, before the fork
        preexec = _die_with_parent
    if text:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
            text=True,
            errors="replace",
            bufsize=1,
        )
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec,
    )


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid`` (a child from :func:`spawn`).

    Parameters
    ----------
    pid : int
        The group's id: the pid of the process :func:`spawn` started.
    sig : int
        The signal, e.g. ``signal.SIGTERM``.

    Returns
    -------
    bool
        True if the signal was sent; False if no process of the group is left.
    """
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_groups(
    procs: Sequence[subprocess.Popen[Any]],
    *,
    grace: float,
    kill_wait: float = 5.0,
    kill_leftovers: bool = False,
    on_kill: Callable[[int], None] | None = None,
) -> None:
    """Stop children from :func:`spawn`: SIGTERM, wait until a shared deadline, then SIGKILL.

    Every child still running gets SIGTERM to its group, in the order given; then each is waited
    for until ``grace`` seconds after the signals (at least 0.1 s each); a group whose leader
    has not exited by then gets SIGKILL and is waited for ``kill_wait`` seconds more.

    Parameters
    ----------
    procs : sequence of subprocess.Popen
        Children started by :func:`spawn` (each leads its own group), in the order to signal.
    grace : float
        Seconds, from the SIGTERMs, that all of them together have to exit.
    kill_wait : float, optional
        Seconds to wait for a leader after its group's SIGKILL (default 5).
    kill_leftovers : bool, optional
        Default False. True: SIGKILL every group after its leader has exited as well, for
        processes that can outlive their leader (a SuperLink's ServerApp).
    on_kill : callable, optional
        Called with the index in ``procs`` of each child that did not exit within ``grace``,
        before its group is killed (to log it).

    Raises
    ------
    subprocess.TimeoutExpired
        A leader still ran ``kill_wait`` seconds after SIGKILL (an uninterruptible sleep).
    """
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for index, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(index)
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=kill_wait)
        else:
            if kill_leftovers:
                signal_group(proc.pid, signal.SIGKILL)


def flower_env(flwr_home: Path, *, unbuffered: bool = False) -> dict[str, str]:
    """Build the environment of a Flower process: this one's, with Flower's settings.

    Parameters
    ----------
    flwr_home : Path
        Flower's home directory (``FLWR_HOME``: its app cache, the ``flwr`` CLI's
        ``config.toml``).
    unbuffered : bool, optional
        Default False. True sets ``PYTHONUNBUFFERED=1``, so a child's lines reach whoever reads
        its output (a supervisor relaying them) as they are printed.

    Returns
    -------
    dict of str to str
        ``os.environ`` plus ``PATH`` with this environment's ``bin`` first (the SuperLink
        spawns ``flower-superexec`` by name), ``FLWR_HOME``, telemetry and update checks off,
        and :data:`MALLOC_SETTINGS` where the environment does not set them.
    """
    env = {**MALLOC_SETTINGS, **os.environ}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env
