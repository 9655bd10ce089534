"""Warm ClientApp executor for a SuperNode in process-isolation mode.

Stock Flower starts a fresh ``flwr-clientapp`` process for every message, which imports torch,
MONAI, Opacus and Flower again (seconds per message, more when sites share cores). Started next to
``flower-supernode --isolation process --port P``, this executor takes the place of
``flower-superexec``: it acquires the SuperNode's ClientApp tasks from its Runtime API and runs
each one in a child forked from a template process (the stdlib forkserver, single-threaded) that
has already imported those libraries. In the child the app's own packages are dropped from
``sys.modules``, so the run's FAB supplies them as it does for ``flwr-clientapp`` (~0.1 s).

    python -m fedhealth.supernode.warm --appio-api-address 127.0.0.1:P [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth import add_superexec_auth_secret_args, load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

from fedhealth.supernode.clientapp_task import run_clientapp_task, run_flower_clientapp_task
from fedhealth.supernode.tasks import TaskSource, serve

log = logging.getLogger("fedhealth.warm")
# Run as ``python -m``, each child re-runs this module as multiprocessing's __mp_main__ while it is
# already imported (preloaded); runpy's warning about that would print once per task.
warnings.filterwarnings(
    "ignore", r"'fedhealth\.supernode\.warm' found in sys\.modules", RuntimeWarning
)

# Imported once by the template process: the libraries, the app modules whose imports pull in the
# rest of the stack (MONAI and Opacus submodules load lazily), and what a task would otherwise
# import on first use (found by diffing a task's sys.modules): httpx's transport, when Flower's
# Runtime client is created, and torch._dynamo (0.6-1.5 s), when the first optimizer is built.
PRELOAD = (
    "torch",
    "monai",
    "opacus",
    "flwr.supernode.runtime.run_clientapp",
    "fedhealth.clientapp.app",
    "fedhealth.clientapp.egress",
    "fedhealth.clientapp.handlers",
    "fedhealth.clientapp.secagg_stages",
    "fedhealth.training",
    "httpcore",
    "torch._dynamo",
)
APP_PACKAGES = ("fedhealth",)  # re-imported in each child from the run's FAB
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STOP_WAIT_S = 5.0  # after terminate(), before kill()


def _child(
    target: Callable[[ExecutionSpec], None], spec: ExecutionSpec, app_packages: tuple[str, ...]
) -> None:
    for name in [n for n in sys.modules if n.partition(".")[0] in app_packages]:
        del sys.modules[name]
    # Opacus's import gives the template's root logger a handler: Flower's lines printed twice
    logging.getLogger("flwr").propagate = False
    target(spec)


def _check_preloaded(modules: tuple[str, ...]) -> None:
    missing = [m for m in modules if m not in sys.modules]  # the forkserver ignores ImportErrors
    if missing:
        sys.exit(f"template process could not import {missing}")


@dataclass
class Child:
    """One running task's process.

    Parameters
    ----------
    process : BaseProcess
        The child forked from the template process.
    pid : int
        Its pid.
    started : float
        ``time.monotonic()`` when it was forked.
    """

    process: BaseProcess
    pid: int
    started: float


class WarmExecutor:
    """Fork each ClientApp task from a pre-warmed template process: a Flower ``Executor``.

    Implements ``flwr.supercore.superexec.executor.types.Executor``; only ClientApp tasks are
    acquired. The template is the stdlib forkserver, preloaded with ``preload``.

    Parameters
    ----------
    preload : sequence of str, optional
        Modules the template imports once (default :data:`PRELOAD`).
    app_packages : sequence of str, optional
        Top-level packages dropped from ``sys.modules`` in each child, so the run's FAB
        supplies them (default :data:`APP_PACKAGES`).
    target : callable, optional
        Runs in the child with the task's ``ExecutionSpec`` (default
        :func:`run_clientapp_task`).
    grace_period : float, optional
        Keyword-only. Seconds :meth:`close` lets running tasks finish before terminating them
        (default 10.0).
    """

    def __init__(
        self,
        preload: Sequence[str] = PRELOAD,
        app_packages: Sequence[str] = APP_PACKAGES,
        target: Callable[[ExecutionSpec], None] = run_clientapp_task,
        *,
        grace_period: float = 10.0,
    ) -> None:
        self.preload = (__name__, *preload)  # the child unpickles _child from this module
        self.app_packages = tuple(app_packages)
        self.target, self.grace_period = target, grace_period
        self.children: dict[int, Child] = {}
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(self.preload))

    def warm_up(self) -> float:
        """Start the template process and wait until it has imported ``preload``.

        Returns
        -------
        float
            Seconds it took.

        Raises
        ------
        RuntimeError
            The template process could not import ``preload``.
        """
        started = time.monotonic()
        probe = self._context.Process(target=_check_preloaded, args=(self.preload,))
        probe.start()
        probe.join()
        code = probe.exitcode
        probe.close()
        if code != 0:
            raise RuntimeError(f"template process failed to preload {self.preload}")
        return time.monotonic() - started

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Return the task types this executor takes now: ClientApp tasks, any FAB.

        Parameters
        ----------
        supported_task_types : set of TaskType
            What the plugin supports.
        insecure, root_certificates_path
            Keyword-only; unused (Flower's ``Executor`` signature).

        Returns
        -------
        tuple of (set of TaskType, set of str)
            ``{CLIENT_APP}`` if supported, and no FAB-hash restriction.
        """
        del insecure, root_certificates_path
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        """Return at once: a fork needs no capacity wait (Flower's ``Executor`` signature).

        Parameters
        ----------
        task_type, fab_hash, insecure, root_certificates_path
            Unused.
        """
        del task_type, fab_hash, insecure, root_certificates_path  # no capacity gate

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child from the template to run ``spec``.

        Parameters
        ----------
        spec : ExecutionSpec
            The task.

        Returns
        -------
        LaunchResult
            Accepted, or failed: not a ClientApp task, or the fork failed (a dead template is
            restarted, cold, on the next launch).
        """
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"the warm executor runs ClientApp tasks, not {spec.task_type}"
            )
        process = self._context.Process(
            target=_child,
            name=f"clientapp-task-{spec.task_id}",
            args=(self.target, spec, self.app_packages),
        )
        try:  # a dead template process is restarted (cold) on the next launch
            process.start()
        except (OSError, EOFError) as exc:
            return LaunchResult.failed(f"fork from the template process failed: {exc}")
        self.children[spec.task_id] = Child(process, process.pid or 0, time.monotonic())
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Forget finished children (the template process reaps them) and log how they ended."""
        for task_id, child in list(self.children.items()):
            code = child.process.exitcode
            if code is None:
                continue
            del self.children[task_id]
            child.process.close()
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "task %d: pid %d exited %d after %.2f s",
                task_id,
                child.pid,
                code,
                time.monotonic() - child.started,
            )

    def close(self) -> None:
        """Let running tasks finish for ``grace_period`` seconds, then terminate, then kill."""
        for signal_children, wait in (
            (None, self.grace_period),
            ("terminate", STOP_WAIT_S),
            ("kill", STOP_WAIT_S),
        ):
            if not self.children:
                return
            if signal_children:
                log.warning("%s %d running task(s)", signal_children, len(self.children))
                for child in self.children.values():
                    getattr(child.process, signal_children)()
            deadline = time.monotonic() + wait
            while self.children and time.monotonic() < deadline:
                self.reconcile()
                time.sleep(0.05)


class _Stop(Exception):
    """Raised by the signal handler, so that a blocked Runtime API call is left too."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedhealth.supernode.warm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--appio-api-address",
        "--runtime-api-address",
        dest="address",
        required=True,
        help="the SuperNode's Runtime API, HOST:PORT",
    )
    parser.add_argument(
        "--root-certificates",
        default=None,
        help="CA bundle for a TLS Runtime API (without it: plaintext, loopback only)",
    )
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.1,
        help="seconds between task polls (flower-superexec: 1.0)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        help="on stop, seconds running tasks may finish before being terminated",
    )
    parser.add_argument(
        "--flower-pull-backoff",
        action="store_true",
        help="pull each task's message with Flower's backoff (1 s, 2 s, ...) "
        "instead of 0.05 s doubling to 0.25 s",
    )
    add_superexec_auth_secret_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the warm executor until SIGTERM/SIGINT (or the parent process dies).

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default None: ``sys.argv[1:]``); see ``--help``.

    Returns
    -------
    int
        0 after a clean stop; 1 after a non-retryable Runtime API error; 2 for bad arguments
        (plaintext off loopback, an unreadable auth secret).
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    host = args.address.rpartition(":")[0].strip("[]")
    if args.root_certificates is None and host not in LOOPBACK:
        log.error("plaintext Runtime API only on loopback; %s needs --root-certificates", host)
        return 2
    try:
        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    except ValueError as exc:
        log.error("%s", exc)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT when the parent is gone

    target = run_flower_clientapp_task if args.flower_pull_backoff else run_clientapp_task
    executor = WarmExecutor(target=target, grace_period=args.grace_period)
    source = None
    try:
        seconds = executor.warm_up()
        log.info(
            "template process ready in %.1f s; polling %s every %.2f s",
            seconds,
            args.address,
            args.poll_interval,
        )
        source = TaskSource(args.address, executor, args.root_certificates, secret)
        serve(source, executor, args.poll_interval, stop)
    except _Stop as why:
        log.info("stopping on %s", why)
    except Exception:  # noqa: BLE001 - a non-retryable Runtime API error: stop cleanly, exit 1
        log.exception("warm executor failed")
        return 1
    finally:
        stop.set()
        executor.close()
        if source is not None:
            source.close()
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: children unpickle from its name.
    from fedhealth.supernode.warm import main as _main

    sys.exit(_main())
