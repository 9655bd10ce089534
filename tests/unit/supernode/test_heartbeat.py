"""The SuperNode's heartbeat interval: declared to the SuperLink and kept by its thread."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from flwr.common import constant

from fedhealth.errors import PatchMismatch
from fedhealth.supernode import heartbeat, paced


@pytest.fixture
def flower_modules(monkeypatch):
    """Flower's two modules, restored after the test whatever it set."""
    modules = [importlib.import_module(name) for name in heartbeat.MODULES]
    for module in modules:
        monkeypatch.setattr(module, heartbeat.NAME, getattr(module, heartbeat.NAME))
    return modules


def test_sets_the_declared_interval_and_the_threads_pause(flower_modules):
    heartbeat.set_heartbeat_interval(12)
    assert [getattr(m, heartbeat.NAME) for m in flower_modules] == [12, 12]
    assert constant.HEARTBEAT_DEFAULT_INTERVAL == 30  # the SuperLink's side is not this process's


def test_the_heartbeat_thread_waits_by_the_new_interval(flower_modules, monkeypatch):
    """Flower's sender pauses (interval - call timeout) x 0.7-0.9 between heartbeats."""
    from flwr.supercore.heartbeat import HeartbeatSender

    heartbeat.set_heartbeat_interval(10)
    waits: list[float] = []
    sender = HeartbeatSender(lambda: True)

    def wait(seconds: float | None = None) -> bool:
        waits.append(float(seconds or 0))
        if len(waits) == 3:
            sender._stop_event.set()
        return sender._stop_event.is_set()

    monkeypatch.setattr(sender._stop_event, "wait", wait)
    sender._run()
    timeout = constant.HEARTBEAT_CALL_TIMEOUT
    assert len(waits) == 3 and all((10 - timeout) * 0.7 <= w <= (10 - timeout) * 0.9 for w in waits)


@pytest.mark.parametrize("seconds", [9.9, 1800.5, 0])
def test_outside_the_superlinks_limits_is_refused(flower_modules, seconds):
    with pytest.raises(ValueError, match="10 <= interval <= 1800"):
        heartbeat.set_heartbeat_interval(seconds)
    assert [getattr(m, heartbeat.NAME) for m in flower_modules] == [30, 30]


def test_a_module_that_no_longer_reads_the_constant_changes_nothing(flower_modules, monkeypatch):
    monkeypatch.delattr(flower_modules[1], heartbeat.NAME)
    with pytest.raises(PatchMismatch, match="flwr.supercore.heartbeat"):
        heartbeat.set_heartbeat_interval(12)
    assert getattr(flower_modules[0], heartbeat.NAME) == 30  # not half applied


def test_the_launcher_refuses_a_bad_interval_before_flower_starts(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", paced.__name__, "--heartbeat-interval", "5", "--", "--insecure"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "heartbeat interval 5.0: need 10 <= interval <= 1800" in done.stderr
    assert "Starting" not in done.stderr + done.stdout  # Flower's SuperNode never started


def test_the_limits_and_default_are_flowers():
    """Kept as numbers (reading site.yaml needs no Flower import); Flower's own say so."""
    assert heartbeat.LIMITS == (constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL)
    assert heartbeat.DEFAULT == constant.HEARTBEAT_DEFAULT_INTERVAL
