"""The shipped systemd units run the daemons owner-only and sandboxed."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def directives(path: Path) -> dict[str, str]:
    lines = [line.split("=", 1) for line in path.read_text().splitlines() if "=" in line]
    return {k.strip(): v.strip() for k, v in lines if not k.startswith("#")}


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("server/fedhealth-coordinator.service", "server run"),
        ("clients/fedhealth-site.service", "site run"),
    ],
)
def test_units_are_owner_only_and_sandboxed(unit: str, command: str) -> None:
    d = directives(ROOT / unit)
    assert command in d["ExecStart"]
    assert d["UMask"] == "0077" and d["User"] == "fedhealth"
    assert d["ProtectSystem"] == "strict" and d["NoNewPrivileges"] == "yes"
    assert d["ReadWritePaths"] == "/var/lib/fedhealth" and "/etc/fedhealth" in d["ReadOnlyPaths"]
    assert d["CapabilityBoundingSet"] == ""
