"""The coordinator's ServerApp executor: it runs only approved ServerApps.

With ``flower-superlink --isolation subprocess`` the SuperLink starts ``flower-superexec``, which
runs the ServerApp of whatever FAB was submitted. The coordinator service instead starts the
SuperLink with ``--isolation process`` and this executor next to it: it acquires the SuperLink's
ServerApp tasks from the Runtime API (loopback) as ``flower-superexec`` does, and launches
Flower's own ``flwr-serverapp`` for a task only when the task's FAB sha256 is approved. The hash
is the one the SuperLink computed over the FAB bytes the launcher submitted (same host, same trust
domain as this executor). For any other FAB it ends the task at once as failed, through the
Runtime API with the task's token, so the run finishes ``failed`` with the reason in ``flwr ls``
and the coordinator's log, instead of waiting. Every decision goes to ``<state>/apps.jsonl``.

    python -m fedhealth.superlink.appexec --runtime-api-address 127.0.0.1:9093
        --approved-app SHA256 [--root-certificates ca.crt | --insecure] [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PushTaskOutputRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates

from fedhealth.errors import ERROR_HELP, ConfigError, ErrorCode
from fedhealth.security.apps import (
    AppPolicy,
    check_sha256,
    installed_sha256,
    record_decision,
)

__all__ = ["ApprovedExecutor", "default_approved", "main"]

log = logging.getLogger("fedhealth.coordinator")


def default_approved(approved: list[str]) -> frozenset[str]:
    """Return the ServerApp hashes the coordinator runs.

    Parameters
    ----------
    approved : list of str
        ``approved_apps`` of ``coordinator.yaml``.

    Returns
    -------
    frozenset of str
        ``approved`` when given (``installed``: the installed project's FAB); otherwise the
        sha256 of the installed fedhealth project's FAB (what ``fedhealth server launch``
        submits), or nothing (every run refused, with a warning) when fedhealth is not
        installed from its source tree.
    """
    if approved:  # "installed" stands for the installed project's FAB
        return AppPolicy.load(approved, "", "coordinator config").approved
    try:
        digest = installed_sha256()
    except ConfigError as exc:
        log.warning("no approved_apps and no project to build, every run is refused: %s", exc)
        return frozenset()
    log.info("approved_apps not set: approving the installed project's FAB %s", digest)
    return frozenset({digest})


class ApprovedExecutor(SubprocessExecutor):
    """Flower's subprocess executor, for approved FABs only.

    Parameters
    ----------
    approved : frozenset of str
        Approved FAB sha256 digests.
    record : Path, optional
        ``apps.jsonl`` (default None: log only).
    """

    def __init__(self, approved: frozenset[str], record: Path | None = None) -> None:
        self.approved = approved
        self.record = record

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Launch ``flwr-serverapp`` for an approved FAB; end the task failed otherwise.

        Parameters
        ----------
        spec : ExecutionSpec
            The task, its token and its FAB hash.

        Returns
        -------
        LaunchResult
            Accepted, or failed with the reason.
        """
        digest = spec.fab_hash or ""
        approved = digest in self.approved
        self._record(spec, digest, approved)
        if approved:
            log.info("task %d: ServerApp of FAB %s approved, launching", spec.task_id, digest)
            return super().launch(spec)
        reason = (
            f"app not approved at the coordinator: FAB sha256 {digest or '(none)'} is not in "
            f"approved_apps (E{int(ErrorCode.APP_NOT_APPROVED):04d}: "
            f"{ERROR_HELP[ErrorCode.APP_NOT_APPROVED]})"
        )
        log.error("task %d: REFUSED, none of its code ran: %s", spec.task_id, reason)
        _end_task(spec, reason)
        return LaunchResult.failed(reason)

    def _record(self, spec: ExecutionSpec, digest: str, approved: bool) -> None:
        if self.record is not None:
            record_decision(
                self.record,
                {
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "site": "coordinator",
                    "task_id": spec.task_id,
                    "sha256": digest,
                    "decision": "approved" if approved else "refused",
                },
            )


def _end_task(spec: ExecutionSpec, reason: str) -> None:
    """Push the task's output as failed, as ``flwr-serverapp`` does when its app raises."""
    client = RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-serverapp"),
            RuntimeTokenHttpInterceptor(token=spec.token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=reason))
    except Exception as exc:  # noqa: BLE001 - the task then expires as Flower handles it
        log.error("task %d: could not end it as failed: %s", spec.task_id, exc)
    finally:
        client.close()


def serve(
    address: str,
    executor: ApprovedExecutor,
    root_certificates: str | None,
    poll_interval: float,
    stop: threading.Event,
) -> None:
    """Acquire ServerApp tasks from the SuperLink and launch them until ``stop`` is set.

    Parameters
    ----------
    address : str
        The SuperLink's Runtime API, ``host:port``.
    executor : ApprovedExecutor
        Decides and launches.
    root_certificates : str, optional
        The CA of a TLS Runtime API; None: plaintext.
    poll_interval : float
        Seconds between polls.
    stop : threading.Event
        Set to stop.
    """
    insecure = root_certificates is None
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    plugin = AutoExecPlugin(
        runtime_api_address=address,
        insecure=insecure,
        root_certificates_path=root_certificates,
        runtime_dependency_install=False,
        executor=executor,
    )
    try:
        while not stop.is_set():
            executor.reconcile()
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
            if res.HasField("task") and res.token:
                task: Task = res.task
                plugin.launch_task(token=res.token, task=task)
            stop.wait(poll_interval)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """Run the executor until SIGTERM/SIGINT or until the parent process exits.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default None: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 after a clean stop.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedhealth.superlink.appexec", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperLink's host:port")
    parser.add_argument("--root-certificates", default=None, help="CA of a TLS Runtime API")
    parser.add_argument("--insecure", action="store_true", help="plaintext Runtime API")
    parser.add_argument("--approved-app", action="append", default=[], metavar="SHA256")
    parser.add_argument("--apps-log", default="", help="record of decisions (JSON lines)")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.insecure == bool(args.root_certificates):
        parser.error("give exactly one of --insecure and --root-certificates")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    # Flower's logger prints through its own handler: propagating to the root one too would
    # write every Flower line twice into the coordinator's log
    logging.getLogger("flwr").propagate = False
    try:
        approved = frozenset(check_sha256(h, "appexec: --approved-app") for h in args.approved_app)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "ServerApp executor: approved FAB sha256 %s",
        ", ".join(sorted(approved)) or "none (every run is refused)",
    )
    executor = ApprovedExecutor(approved, Path(args.apps_log) if args.apps_log else None)
    serve(args.runtime_api_address, executor, args.root_certificates, args.poll_interval, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
