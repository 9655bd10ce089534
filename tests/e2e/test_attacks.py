"""The attack suite against a real loopback consortium: every attack refused, at least 8 rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fedhealth.data.synth import write_cohort
from fedhealth.testing.attacks import format_table, run_suite
from fedhealth.testing.attacks_evidence import plant_canary, scan
from fedhealth.testing.attacks_privacy import privacy_rows


@pytest.mark.slow
def test_every_attack_on_the_consortium_is_refused(tmp_path):
    rows = run_suite(tmp_path / "lab", privacy=False)  # those: the test below
    table = format_table(rows)
    assert len(rows) >= 8, table
    assert all(row.refused is True for row in rows), table
    assert all(row.evidence for row in rows), table
    names = {row.attack for row in rows}
    for expected in ("rogue registration", "plaintext", "foreign CA", "unregistered key"):
        assert expected in names, table
    assert any(name.startswith("unapproved app") for name in names), table
    assert any(name.startswith("unapproved ServerApp") for name in names), table


def test_the_module_entry_point_answers_help():
    out = subprocess.run(
        [sys.executable, "-m", "fedhealth.testing.attacks", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--workdir" in out.stdout and "--json" in out.stdout
    json.dumps(out.stdout)  # plain text


def test_the_canary_scan_finds_a_site_image_that_left(tmp_path):
    """The exfiltration row can fail: any copy of an image, or of its voxels, is found."""
    write_cohort(tmp_path / "cohort", sites=1, seed=0, n_train=2, n_test=1, fov=32)
    site = tmp_path / "cohort" / "site-0"
    prints = plant_canary(site)
    out = tmp_path / "coordinator"
    out.mkdir()
    (out / "model.bin").write_bytes(bytes(range(256)) * 64)
    assert scan([out], prints)[2] == []
    image = sorted((site / "imagesTr").iterdir())[0]
    (out / "reply.bin").write_bytes(b"header" + image.read_bytes()[1000:3000] + b"tail")
    assert scan([out], prints)[2]
    (out / "reply.bin").write_bytes(b"x" + prints.voxels[8:40] + b"y")  # a few canary voxels
    assert scan([out], prints)[2]


@pytest.mark.slow
def test_every_privacy_row_holds_against_a_site(tmp_path):
    """What a curious coordinator can send the approved ClientApp: every row refused."""
    write_cohort(tmp_path / "cohort", sites=1, seed=11, n_train=4, n_test=1, fov=32)
    data = tmp_path / "cohort" / "site-0"
    before = sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*"))
    rows = privacy_rows(tmp_path / "work", data)
    table = format_table(rows)
    assert len(rows) == 28 and all(row.refused is True for row in rows), table
    found = [re.search(r"\[policy: (\w+)\]", row.expected) for row in rows[:9]]
    fields = {m.group(1) for m in found if m is not None}
    assert len(fields) == 9, table  # one row per policy field
    names = {row.attack for row in rows}
    for expected in ("DP switched off", "replay: other seed, lr, dataset", "ledger truncation"):
        assert expected in names, table
    after = sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*"))
    assert after == before  # nothing written into the site's data folder
