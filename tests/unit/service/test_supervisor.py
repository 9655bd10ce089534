"""The supervisor restarts a failing child with growing delays, relays its output as JSON lines,
and stops every child cleanly on SIGTERM (real processes, real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fedhealth.service.supervisor import Child, Supervisor


def test_failing_child_is_restarted_with_backoff(tmp_path):
    status = tmp_path / "status.json"
    sup = Supervisor(status, backoff_initial=0.2, backoff_max=0.8, healthy_after=60)
    starts = tmp_path / "starts"
    child = sup.add(
        Child(
            "flaky",
            [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"],
            dict(os.environ),
            tmp_path,
        )
    )
    t0 = time.monotonic()
    assert sup.run(until=lambda: child.restarts >= 4) == 0
    elapsed = time.monotonic() - t0
    assert child.last_exit == 3
    assert starts.read_text().count("x") >= 4
    assert elapsed >= 0.2 + 0.4 + 0.8 + 0.8 - 0.1  # delays doubled up to backoff_max
    saved = json.loads(status.read_text())
    assert saved["state"] == "stopped" and saved["children"]["flaky"]["restarts"] >= 4


def test_sigterm_stops_children_and_exits_zero(tmp_path):
    script = tmp_path / "daemon.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from fedhealth.service.supervisor import Child, Supervisor, setup_json_logging
        setup_json_logging(Path({str(tmp_path / "daemon.jsonl")!r}))
        sup = Supervisor(Path({str(tmp_path / "status.json")!r}), stop_grace=5)
        sup.add(Child("worker", [sys.executable, "-u", "-c",
                                 "import time; print('WARNING :   working', flush=True); "
                                 "time.sleep(120)"],
                      dict(os.environ), Path({str(tmp_path)!r})))
        sys.exit(sup.run())
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)])
    status = tmp_path / "status.json"
    deadline = time.monotonic() + 30
    worker = None
    while time.monotonic() < deadline and worker is None:
        if status.is_file():
            worker = json.loads(status.read_text())["children"]["worker"]["pid"]
        time.sleep(0.1)
    assert worker, "supervisor never started its child"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert json.loads(status.read_text())["state"] == "stopped"
    assert not _running(worker), "child still alive after the supervisor stopped"
    lines = [json.loads(ln) for ln in (tmp_path / "daemon.jsonl").read_text().splitlines()]
    relayed = [ln for ln in lines if ln.get("event") == "child.output"]
    assert relayed and relayed[0]["child"] == "worker" and relayed[0]["level"] == "warning"
    assert any(ln.get("event") == "stop.requested" for ln in lines)


def test_child_dies_with_a_killed_supervisor(tmp_path):
    script = tmp_path / "daemon.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from fedhealth.service.supervisor import Child, Supervisor
        sup = Supervisor(Path({str(tmp_path / "status.json")!r}))
        sup.add(Child("worker", [sys.executable, "-c", "import time; time.sleep(120)"],
                      dict(os.environ), Path({str(tmp_path)!r})))
        sys.exit(sup.run())
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)])
    status: Path = tmp_path / "status.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not status.is_file():
        time.sleep(0.1)
    worker = json.loads(status.read_text())["children"]["worker"]["pid"]
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _running(worker):
            return
        time.sleep(0.1)
    raise AssertionError("child orphaned after SIGKILL of its supervisor")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
