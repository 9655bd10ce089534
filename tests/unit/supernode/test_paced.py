"""The paced SuperNode launcher: Flower's own SuperNode loop with its polls capped at the site's
pull interval, applied only when the installed Flower's loop is the one the patch fits."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import time

import pytest

from fedhealth.supernode import paced as supernode
from fedhealth.testing.loopback import BIN, flower_env, free_ports, superlink_listen


def _module_from(tmp_path, name: str, source: str):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_paced_sleep_is_capped_at_the_interval_and_short_sleeps_are_kept():
    paced = supernode.paced_time(0.05)
    started = time.monotonic()
    paced.sleep(3)  # the SuperNode's sleep after an empty pull
    capped = time.monotonic() - started
    started = time.monotonic()
    paced.sleep(0.01)
    short = time.monotonic() - started
    assert 0.05 <= capped < 1.0 and 0.01 <= short < 0.05
    paced = supernode.paced_time(0.5)
    started = time.monotonic()
    paced.sleep(0.5)  # the SuperNode's poll of its own state for a finished reply
    local = time.monotonic() - started
    started = time.monotonic()
    paced.sleep(3)
    pull = time.monotonic() - started
    assert supernode.LOCAL_POLL <= local < 0.25 and 0.5 <= pull < 1.5, (local, pull)
    assert paced.monotonic is time.monotonic and paced.time is time.time
    for bad in (0, -1, 3.5):
        with pytest.raises(ValueError, match="pull interval"):
            supernode.paced_time(bad)


def test_the_installed_flower_supernode_loop_is_the_one_the_patch_fits(monkeypatch):
    module = importlib.import_module(supernode.MODULE)
    monkeypatch.setattr(module, "time", time)  # restored after the test
    supernode.check_module(module)
    assert supernode.pace(0.2) is True
    assert module.time.pull_interval == 0.2
    # the loop's `time.sleep(3)` now resolves to the paced sleep
    started = time.monotonic()
    module.time.sleep(3)
    assert time.monotonic() - started < 1.0
    assert supernode.pace(0.3) is True and module.time.pull_interval == 0.3  # re-pacing


def test_a_loop_the_patch_does_not_fit_is_left_alone(tmp_path):
    no_sleep = _module_from(
        tmp_path,
        "loop_without_sleep",
        """
        import time
        def loop():
            time.sleep(1)
    """,
    )
    with pytest.raises(supernode.PatchMismatch, match=r"no longer contains \['time.sleep\(3\)'\]"):
        supernode.check_module(no_sleep)
    other_use = _module_from(
        tmp_path,
        "loop_with_strftime",
        """
        import time
        def loop():
            time.sleep(3)
            return time.strftime("%H")
    """,
    )
    with pytest.raises(supernode.PatchMismatch, match=r"time.\['strftime'\]"):
        supernode.check_module(other_use)
    renamed = _module_from(
        tmp_path,
        "loop_with_renamed_time",
        """
        import time as clock
        def loop():
            clock.sleep(3)
    """,
    )
    with pytest.raises(supernode.PatchMismatch, match="is not the time module"):
        supernode.check_module(renamed)
    new_sleep = _module_from(
        tmp_path,
        "loop_with_a_new_sleep",
        """
        import time
        def loop(backoff):
            time.sleep(3)
            time.sleep(0.5)
            time.sleep(backoff)
            time.sleep(10)
    """,
    )
    with pytest.raises(
        supernode.PatchMismatch, match=r"sleeps for \['0.5', '10', '3', 'backoff'\] s"
    ):
        supernode.check_module(new_sleep)
    one_more_poll = _module_from(
        tmp_path,
        "loop_with_one_more_poll",
        """
        import time
        def loop():
            time.sleep(3)
            time.sleep(0.5)
            time.sleep(0.5)
            time.sleep(0.5)  # a new wait: local or remote, the patch cannot tell
    """,
    )
    with pytest.raises(
        supernode.PatchMismatch,
        match=r"sleeps for \['0.5', '0.5', '0.5', '3'\] s, not \['0.5', '0.5', '3'\]",
    ):
        supernode.check_module(one_more_poll)


@pytest.mark.slow
def test_launcher_runs_flowers_supernode_against_a_real_superlink(tmp_path):
    """The launcher starts the real SuperNode (its CLI arguments after ``--``), paced, and it
    registers with a SuperLink on loopback."""
    link, control, appio = free_ports(3)
    env = flower_env(tmp_path / "flwr-home")
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("superlink", "supernode")}
    procs = [
        subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                *superlink_listen(link, control),
                "--disable-runtime-dependency-installation",
            ],
            cwd=tmp_path,
            env=env,
            stdout=logs["superlink"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedhealth.supernode.paced",
                    "--pull-interval",
                    "0.2",
                    "--",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(appio),
                ],
                cwd=tmp_path,
                env=env,
                stdout=logs["supernode"],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log = tmp_path / "supernode.log"
        deadline = time.monotonic() + 90
        while "SuperNode ID" not in log.read_text() and time.monotonic() < deadline:
            assert procs[1].poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "SuperNode pull interval 0.20 s" in text and "SuperNode ID" in text, text
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _node_state():
    """The SuperNode's own state (Flower's in-memory NodeState), as flower-supernode makes it."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    return NodeStateFactory(ObjectStoreFactory()).state()


def _reply(run_id: int):
    """A ClientApp's reply as the SuperNode stores it (its id set, replying to an instruction)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.metadata import Metadata

    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=5,
        dst_node_id=0,
        reply_to_message_id="a" * 64,
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type="train",
    )
    reply = Message(RecordDict({"c": ConfigRecord({"loss": 0.5})}), metadata=metadata)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def test_a_reply_left_waiting_after_an_empty_pull_is_pushed(monkeypatch):
    """After a coordinator restart: the new run's reply must not wait for a pull that never
    comes (Flower's loop pushes only after a pull that returned a message). The reply is only
    looked at: Flower's push stage must still find it (get_messages marks what it returns)."""
    module = importlib.import_module(supernode.MODULE)
    pulled: list[int | None] = [None, 7, None]
    monkeypatch.setattr(module, supernode.PULL, lambda *, state: pulled.pop(0))
    assert supernode.push_stranded_replies()
    assert supernode.push_stranded_replies()  # once only: not wrapped twice
    pull = getattr(module, supernode.PULL)
    state = _node_state()
    assert pull(state=state) is None  # nothing pulled, nothing waiting: the loop sleeps
    assert pull(state=state) == 7  # a pulled message is passed through
    state.store_message(_reply(42))
    assert pull(state=state) == 42  # nothing pulled, a reply waits: the loop pushes it
    # what Flower's push stage asks for next: the reply is still there to be sent
    assert [m.metadata.run_id for m in state.get_messages(is_reply=True)] == [42]


def test_after_a_message_the_next_pulls_back_off_from_a_short_wait(monkeypatch):
    """Under SecAgg+ the next stage's message follows a reply within about a second: the
    SuperNode re-pulls after 0.1 s, 0.2 s, 0.2 s, then every pull interval."""
    slept: list[float] = []
    paced = supernode.paced_time(0.5)
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    paced.sleep(3)  # idle since start: the pull interval
    paced.after_message()
    for _ in range(5):
        paced.sleep(3)
    paced.sleep(0.5)  # a poll of local state, unaffected
    # the burst's waits add up to one interval: its pulls fall on the flat schedule's times
    # (0.5 s after the reply) and between them, never after
    assert slept == [0.5, 0.1, 0.2, 0.2, 0.5, 0.5, supernode.LOCAL_POLL]
    slept.clear()
    paced = supernode.paced_time(3.0)
    paced.after_message()
    for _ in range(6):
        paced.sleep(3)
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.5, 3.0])


def test_a_pulled_message_resets_the_pull_backoff(monkeypatch):
    module = importlib.import_module(supernode.MODULE)
    paced = supernode.paced_time(0.5)
    monkeypatch.setattr(module, "time", paced)
    pulled: list[int | None] = [None, 7]
    monkeypatch.setattr(module, supernode.PULL, lambda *, state: pulled.pop(0))
    assert supernode.push_stranded_replies()
    pull = getattr(module, supernode.PULL)

    state = _node_state()
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    assert pull(state=state) is None
    paced.sleep(3)
    assert pull(state=state) == 7
    paced.sleep(3)
    assert slept == [0.5, supernode.FIRST_RETRY]
