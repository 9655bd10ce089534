"""Run directories are owner-only whatever umask the process started with: the directory is
0700 and the files written into it afterwards (appended metrics, checkpoints) are 0600."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys
os.umask(0o022)  # a permissive login umask
from fedhealth.config import compose
from fedhealth.runs.rundir import RunDir
import numpy as np
run = RunDir(sys.argv[1], compose(["rounds=1", "sites=2"]))
with open(run.metrics, "a") as handle:  # not an atomic write: follows the umask
    handle.write("{}\\n")
run.checkpoints.save(0, {"w": np.zeros(3, dtype=np.float32)})
"""


def test_run_directory_and_the_files_in_it_are_owner_only(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    subprocess.run([sys.executable, "-c", SCRIPT, str(run)], check=True, timeout=120)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE((run / "metrics.jsonl").stat().st_mode) == 0o600
    written = [p for p in run.rglob("*") if p.is_file()]
    assert len(written) >= 2
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    for path in [p for p in run.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
