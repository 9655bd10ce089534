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

import numpy as np
import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedhealth.supernode.warm import WarmExecutor, main


def _spec(task_id: int, task_type: TaskType = TaskType.CLIENT_APP) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:1",
        token="t",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=os.getpid(),
        suppress_output=False,
        task_id=task_id,
    )


def _report(out: Path, spec: ExecutionSpec) -> None:
    out.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "task": spec.task_id,
                "torch": "torch" in sys.modules,
                "app": sorted(m for m in sys.modules if m.startswith("fedhealth")),
            }
        )
    )


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
    assert f"task 8: pid {pid} exited -9" in caplog.text
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
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedhealth.supernode.warm",
                "--appio-api-address",
                f"127.0.0.1:{port}",
                "--parent-pid",
                str(parent.pid),
            ],
            stdout=out,
            stderr=out,
        )
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


def _late_objects(delay: float):
    """A message's object tree and a pull function for which every object becomes available
    ``delay`` seconds after the first pull (the SuperNode still downloading it); the times of
    each object's pull attempts."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    message = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(weights)})}),
        dst_node_id=1,
        message_type="train",
    )
    contents = {k: v.deflate() for k, v in get_all_nested_objects(message).items()}
    attempts: dict[str, list[float]] = {}
    first = []

    def pull(object_id: str) -> bytes:
        now = time.monotonic()
        first[:] = first or [now]
        attempts.setdefault(object_id, []).append(now)
        if now < first[0] + delay:
            raise ObjectUnavailableError(object_id)
        return contents[object_id]

    return get_object_tree(message), pull, attempts, weights


def test_a_warm_child_pulls_a_late_message_with_a_short_backoff(monkeypatch, flower_identity):
    """Flower waits 1 s, then 2 s, for a message object the SuperNode has not finished
    downloading; the warm child retries after 0.05 s (doubling to 0.25 s) and gets the same
    message."""
    from flwr.app import Message

    from fedhealth.supernode import clientapp_task as warm

    module = warm.run_clientapp_module
    stock = module.pull_and_inflate_object_from_tree
    monkeypatch.setattr(module, "pull_and_inflate_object_from_tree", stock)  # restored after
    gaps = {}
    for name in ("stock", "warm"):
        if name == "warm":
            warm.fast_pull()
            warm.fast_pull()  # idempotent: one partial, not a partial of a partial
        pull_fn = module.pull_and_inflate_object_from_tree
        tree, pull, attempts, weights = _late_objects(delay=0.3)
        message = pull_fn(tree, pull, lambda _id: None, return_type=Message)
        np.testing.assert_array_equal(message.content["arrays"]["w"].numpy(), weights)
        gaps[name] = min(t[1] - t[0] for t in attempts.values() if len(t) > 1)
    assert module.pull_and_inflate_object_from_tree.func is stock
    assert module.pull_and_inflate_object_from_tree.keywords == warm.PULL_BACKOFF
    assert gaps["stock"] >= 0.75, gaps  # Flower: 1 s +- 20 %
    assert gaps["warm"] < 0.5, gaps
