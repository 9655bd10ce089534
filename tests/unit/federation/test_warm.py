"""The warm executor: tasks run in children of a template that has the libraries imported, the
app's own package comes fresh, children are reaped, and no child can take the executor down."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedhealth.federation.warm import WarmExecutor, main


def _spec(task_id: int, task_type: TaskType = TaskType.CLIENT_APP) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="t",
                         insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=task_id)


def _report(out: Path, spec: ExecutionSpec) -> None:
    out.write_text(json.dumps({"pid": os.getpid(), "task": spec.task_id,
                               "torch": "torch" in sys.modules,
                               "app": sorted(m for m in sys.modules if m.startswith("fedhealth"))}))


def _crash(spec: ExecutionSpec) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _sleep(spec: ExecutionSpec) -> None:
    time.sleep(60)


@pytest.fixture(scope="module")
def executor():
    # One template per test process (the stdlib forkserver is a singleton): torch stands in for
    # the heavy stack, fedhealth.errors for the app package the FAB provides.
    ex = WarmExecutor(preload=("torch", "fedhealth.errors"), grace_period=0.2)
    ex.warm_up()
    yield ex
    ex.close()


def _wait_reaped(ex: WarmExecutor, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ex.children and time.monotonic() < deadline:
        ex.reconcile()
        time.sleep(0.02)
    assert not ex.children


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():  # no zombie left behind either
            return True
        time.sleep(0.02)
    return False


def test_task_runs_in_a_warm_child_with_the_app_package_dropped(executor, tmp_path):
    executor.target = functools.partial(_report, tmp_path / "out.json")
    assert executor.launch(_spec(7)).status == LaunchResultStatus.ACCEPTED
    _wait_reaped(executor)
    seen = json.loads((tmp_path / "out.json").read_text())
    assert seen["pid"] != os.getpid() and seen["task"] == 7
    assert seen["torch"], "torch was not preloaded by the template process"
    assert seen["app"] == [], "the app package must come from the run's FAB, not the template"
    assert _gone(seen["pid"])


def test_a_crashing_child_is_reaped_and_the_executor_keeps_launching(executor, tmp_path, caplog):
    executor.target = _crash
    assert executor.launch(_spec(8)).status == LaunchResultStatus.ACCEPTED
    pid = executor.children[8].pid
    _wait_reaped(executor)
    assert _gone(pid)
    assert "task 8: pid %d exited -9" % pid in caplog.text
    executor.target = functools.partial(_report, tmp_path / "after.json")
    assert executor.launch(_spec(9)).status == LaunchResultStatus.ACCEPTED
    _wait_reaped(executor)
    assert json.loads((tmp_path / "after.json").read_text())["task"] == 9


def test_close_terminates_children_that_outlive_the_grace_period(executor):
    executor.target = _sleep
    executor.launch(_spec(10))
    pid = executor.children[10].pid
    started = time.monotonic()
    executor.close()
    assert not executor.children and time.monotonic() - started < 5
    assert _gone(pid)


def test_only_clientapp_tasks_are_acquired_or_launched(executor):
    types, _ = executor.get_eligible_capacity(set(TaskType))
    assert types == {TaskType.CLIENT_APP}
    assert executor.launch(_spec(11, TaskType.SERVER_APP)).status == LaunchResultStatus.FAILED


def test_plaintext_runtime_api_is_refused_off_loopback():
    assert main(["--appio-api-address", "10.1.2.3:9094"]) == 2


def test_executor_exits_cleanly_when_its_parent_dies(tmp_path):
    with socket.socket() as sock:  # a Runtime API address nobody listens on: acquire retries
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    parent = subprocess.Popen(["sleep", "60"])
    log = tmp_path / "warm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedhealth.federation.warm",
                                 "--appio-api-address", f"127.0.0.1:{port}",
                                 "--parent-pid", str(parent.pid)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "template process ready" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # now blocked in Flower's retrying AcquireTask
        parent.kill()
        parent.wait()
        assert proc.wait(timeout=15) == 0, log.read_text()
        assert "stopping on SIGINT" in log.read_text()
    finally:
        for p in (proc, parent):
            if p.poll() is None:
                p.kill()
