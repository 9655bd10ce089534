"""The SuperNode's Runtime API as the warm executor uses it: acquire ClientApp tasks, launch them.

Used by :mod:`fedhealth.supernode.warm` in place of ``flower-superexec``'s loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import LaunchResult, LaunchResultStatus
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates

if TYPE_CHECKING:
    from fedhealth.supernode.warm import WarmExecutor

log = logging.getLogger("fedhealth.warm")


class TaskSource:
    """Acquire ClientApp tasks from the SuperNode's Runtime API, as ``flower-superexec`` does.

    Flower's HTTP client and ``AutoExecPlugin``: the one place the warm executor touches
    Flower's SuperExec internals.

    Parameters
    ----------
    address : str
        The SuperNode's Runtime API, ``host:port``.
    executor : WarmExecutor
        Where acquired tasks are launched.
    root_certificates : str, optional
        CA bundle for a TLS Runtime API (default None: plaintext, loopback only).
    auth_secret : bytes, optional
        The SuperExec authentication secret (default None: no authentication).
    """

    def __init__(
        self,
        address: str,
        executor: WarmExecutor,
        root_certificates: str | None = None,
        auth_secret: bytes | None = None,
    ) -> None:
        insecure = root_certificates is None
        interceptors: list[ProtobufClientInterceptor] = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec")
        ]
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
        """Take the next pending task, retrying while the SuperNode is away.

        Returns
        -------
        tuple of (Task, str) or None
            The task and its token, or None when none is pending.
        """
        types, fab_hashes = self.executor.get_eligible_capacity(
            set(self.plugin.supported_task_types)
        )
        res = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=types, agentapp_fab_hashes=fab_hashes)
        )
        return (res.task, res.token) if res.HasField("task") and res.token else None

    def launch(self, task: Task, token: str) -> LaunchResult:
        """Launch ``task`` on the executor, through Flower's plugin.

        Parameters
        ----------
        task : Task
            An acquired task.
        token : str
            Its token.

        Returns
        -------
        LaunchResult
            Whether the executor accepted it.
        """
        return self.plugin.launch_task(token=token, task=task)

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()


def serve(
    source: TaskSource, executor: WarmExecutor, poll_interval: float, stop: threading.Event
) -> None:
    """Acquire and launch tasks until ``stop`` is set; one log line per launch.

    Parameters
    ----------
    source : TaskSource
        The SuperNode's Runtime API.
    executor : WarmExecutor
        Runs the tasks; finished children are reaped between polls.
    poll_interval : float
        Seconds between polls.
    stop : threading.Event
        Set to stop (checked between polls).
    """
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
