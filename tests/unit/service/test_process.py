"""The shared process API: a child leads its own group, a stop reaches the whole group (SIGTERM,
then SIGKILL at the deadline), and a child dies with the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedhealth.service.process import MALLOC_SETTINGS, flower_env, signal_group, spawn, stop_groups

# A parent that starts a grandchild in its own group, prints the grandchild's pid, then sleeps.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")
STUBBORN = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(120)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_child_leads_its_own_group_and_a_stop_reaches_its_children(tmp_path):
    proc = spawn(
        [sys.executable, "-c", PARENT],
        cwd=tmp_path,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
    assert os.getpgid(grandchild) == proc.pid
    t0 = time.monotonic()
    stop_groups([proc], grace=10)
    assert time.monotonic() - t0 < 5, "SIGTERM should have ended the group at once"
    assert proc.returncode == -signal.SIGTERM
    assert _gone_within(grandchild, 5)


def test_a_child_ignoring_sigterm_is_killed_at_the_deadline(tmp_path):
    proc = spawn(
        [sys.executable, "-c", STUBBORN], cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    killed: list[int] = []
    t0 = time.monotonic()
    stop_groups([proc], grace=0.5, on_kill=killed.append)
    assert 0.4 < time.monotonic() - t0 < 5
    assert killed == [0] and proc.returncode == -signal.SIGKILL


def test_leftovers_of_an_exited_leader_are_killed_on_request(tmp_path):
    script = (
        "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
        + repr(
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
        )
        + "]).pid, flush=True)"
    )
    proc = spawn(
        [sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    orphan = int(proc.stdout.readline())
    proc.wait(timeout=10)  # the leader has exited; its child lives on in the group
    assert _running(orphan)
    stop_groups([proc], grace=1, kill_leftovers=True)
    assert _gone_within(orphan, 5)


def test_signalling_a_group_that_is_gone_is_quiet(tmp_path):
    proc = spawn([sys.executable, "-c", "pass"], cwd=tmp_path, env=dict(os.environ))
    proc.wait(timeout=30)
    assert signal_group(proc.pid, signal.SIGTERM) is False


def test_a_child_dies_with_its_parent(tmp_path):
    launcher = textwrap.dedent(f"""
        import os, sys, time
        from fedhealth.service.process import spawn
        child = spawn([sys.executable, "-c", "import time; time.sleep(120)"],
                      cwd={str(tmp_path)!r}, env=dict(os.environ))
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _running(child)
    parent.kill()
    parent.wait(timeout=10)
    assert _gone_within(child, 10), "child orphaned after SIGKILL of its parent"


def test_flower_env_puts_this_environment_first(tmp_path):
    env = flower_env(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert "PYTHONUNBUFFERED" not in env or os.environ.get("PYTHONUNBUFFERED")
    assert flower_env(tmp_path, unbuffered=True)["PYTHONUNBUFFERED"] == "1"


# Allocates and frees a 120 MB buffer (a 30M-parameter float32 model) ten times; prints how many
# pages the kernel had to fault in (and zero) for it.
MODEL_BUFFERS = textwrap.dedent("""
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        buffer = bytearray(120_000_000)
        del buffer
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(env: dict[str, str]) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MODEL_BUFFERS], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(_huge_pages_always(), reason="page counts assume 4 kB pages (THP: always)")
def test_flower_env_keeps_model_sized_buffers_in_the_heap(tmp_path, monkeypatch):
    for name in MALLOC_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    env = flower_env(tmp_path / "home")
    assert {k: env[k] for k in MALLOC_SETTINGS} == MALLOC_SETTINGS
    glibc_defaults = {k: v for k, v in env.items() if k not in MALLOC_SETTINGS}
    tuned, mapped = _page_faults(env), _page_faults(glibc_defaults)
    # glibc's defaults: every 120 MB buffer mapped and zeroed anew (10 x 29,297 pages of 4 kB);
    # flower_env's: the first one faulted in, the other nine reuse it
    assert mapped > 10 * 25_000, mapped
    assert tuned < 3 * 30_000, tuned


def test_an_operators_allocator_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "67108864")
    env = flower_env(tmp_path / "home")
    assert env["MALLOC_TRIM_THRESHOLD_"] == "67108864"
    assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"]
