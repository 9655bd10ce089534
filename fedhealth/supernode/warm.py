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
import functools
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

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth import add_superexec_auth_secret_args, load_superexec_auth_secret
from flwr.supercore.constant import PULL_MAX_TIME, TaskType
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, LaunchResultStatus
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime import run_clientapp as run_clientapp_module
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fedhealth.errors import PatchMismatch

log = logging.getLogger("fedhealth.warm")
# Run as ``python -m``, each child re-runs this module as multiprocessing's __mp_main__ while it is
# already imported (preloaded); runpy's warning about that would print once per task.
warnings.filterwarnings(
    "ignore", r"'fedhealth\.federation\.warm' found in sys\.modules", RuntimeWarning
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


# Flower's SuperNode creates a ClientApp task as soon as a message's header arrives, before the
# message's objects are downloaded, so a child that starts at once finds them unavailable and
# Flower's pull retries after 1 s, then 2 s (``PULL_INITIAL_BACKOFF``), however soon they arrive.
# In the child only, the pull retries after 0.05 s, doubling to at most 0.25 s, bounded
# by Flower's own total wait (``PULL_MAX_TIME``) instead of its per-object try count.
PULL_BACKOFF = {
    "initial_backoff": 0.05,
    "backoff_cap": 0.25,
    "max_tries_per_object": None,
    "max_time": PULL_MAX_TIME,
}


def fast_pull() -> None:
    """Make this process's ClientApp pull its message with :data:`PULL_BACKOFF`."""
    module = run_clientapp_module
    current = module.pull_and_inflate_object_from_tree
    if isinstance(current, functools.partial):
        return
    if current is not pull_and_inflate_object_from_tree:
        raise PatchMismatch(
            "flwr.supernode.runtime.run_clientapp no longer pulls with "
            "pull_and_inflate_object_from_tree"
        )
    module.pull_and_inflate_object_from_tree = functools.partial(current, **PULL_BACKOFF)


def run_clientapp_task(spec: ExecutionSpec) -> None:
    """What ``flwr-clientapp --token ...`` does, in this already-warm process (pulling its
    message with a short backoff, :func:`fast_pull`).
    """
    fast_pull()
    run_flower_clientapp_task(spec)


def run_flower_clientapp_task(spec: ExecutionSpec) -> None:
    """:func:`run_clientapp_task` with Flower's own pull backoff (for comparison)."""
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def _child(
    target: Callable[[ExecutionSpec], None], spec: ExecutionSpec, app_packages: tuple[str, ...]
) -> None:
    for name in [n for n in sys.modules if n.partition(".")[0] in app_packages]:
        del sys.modules[name]
    target(spec)


def _check_preloaded(modules: tuple[str, ...]) -> None:
    missing = [m for m in modules if m not in sys.modules]  # the forkserver ignores ImportErrors
    if missing:
        sys.exit(f"template process could not import {missing}")


@dataclass
class Child:
    process: BaseProcess
    pid: int
    started: float  # time.monotonic() when forked


class WarmExecutor:
    """A Flower ``Executor`` (``flwr.supercore.superexec.executor.types``) that forks each
    ClientApp task from a pre-warmed template process. Only ClientApp tasks are acquired.

    ``target`` runs in the child with the task's ``ExecutionSpec``; ``grace_period`` is how long
    :meth:`close` lets running tasks finish before terminating them.
    """

    def __init__(
        self,
        preload: Sequence[str] = PRELOAD,
        app_packages: Sequence[str] = APP_PACKAGES,
        target: Callable[[ExecutionSpec], None] = run_clientapp_task,
        grace_period: float = 10.0,
    ) -> None:
        self.preload = (__name__, *preload)  # the child unpickles _child from this module
        self.app_packages = tuple(app_packages)
        self.target, self.grace_period = target, grace_period
        self.children: dict[int, Child] = {}
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(self.preload))

    def warm_up(self) -> float:
        """Start the template process and wait until it has imported ``preload``; seconds."""
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
        del task_type, fab_hash, insecure, root_certificates_path  # no capacity gate

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
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


class TaskSource:
    """The SuperNode's Runtime API as ``flower-superexec`` uses it: Flower's HTTP client and
    ``AutoExecPlugin``. The one place this module touches Flower's SuperExec internals.
    """

    def __init__(
        self,
        address: str,
        executor: WarmExecutor,
        root_certificates: str | None = None,
        auth_secret: bytes | None = None,
    ) -> None:
        insecure = root_certificates is None
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=auth_secret,
                    protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
                )
            )
        self.executor = executor
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=insecure,
            root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self.plugin = AutoExecPlugin(
            runtime_api_address=address,
            insecure=insecure,
            root_certificates_path=root_certificates,
            executor=executor,
        )

    def acquire(self) -> tuple[Task, str] | None:
        """The next pending task and its token, if any (retries while the SuperNode is away)."""
        types, fab_hashes = self.executor.get_eligible_capacity(
            set(self.plugin.supported_task_types)
        )
        res = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=types, agentapp_fab_hashes=fab_hashes)
        )
        return (res.task, res.token) if res.HasField("task") and res.token else None

    def launch(self, task: Task, token: str) -> LaunchResult:
        return self.plugin.launch_task(token=token, task=task)

    def close(self) -> None:
        self.client.close()


def serve(
    source: TaskSource, executor: WarmExecutor, poll_interval: float, stop: threading.Event
) -> None:
    """Acquire and launch tasks until ``stop`` is set; one log line per launch."""
    while not stop.is_set():
        executor.reconcile()
        acquired = source.acquire()
        if acquired is not None:
            task, token = acquired
            started = time.monotonic()
            result = source.launch(task, token)
            ms = (time.monotonic() - started) * 1000
            if result.status == LaunchResultStatus.ACCEPTED:
                log.info(
                    "task %d run %d: launched pid %d %.1f ms after acquisition",
                    task.task_id,
                    task.run_id,
                    executor.children[task.task_id].pid,
                    ms,
                )
            else:
                log.error(
                    "task %d run %d: not launched (%s): %s",
                    task.task_id,
                    task.run_id,
                    result.status,
                    result.message,
                )
        stop.wait(poll_interval)


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
