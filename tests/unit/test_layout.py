"""The package's shape: rooms named after processes, small modules, a wheel that holds it all."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import fedhealth

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(fedhealth.__file__).parent
MAX_MODULE_LINES = 400
MAX_FOLDER_SHARE = 0.25


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_over_400_lines():
    big = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := _lines(p)) > MAX_MODULE_LINES
    }
    assert not big, big


def test_no_folder_holds_over_a_quarter_of_the_package():
    per_folder: Counter[str] = Counter()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        per_folder[rel.parts[0] if len(rel.parts) > 1 else "."] += _lines(path)
    total = sum(per_folder.values())
    heavy = {k: round(v / total, 3) for k, v in per_folder.items() if v > MAX_FOLDER_SHARE * total}
    assert not heavy, heavy


def test_the_wheel_lists_every_subpackage_and_the_configs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")
    }
    listed = set(setuptools["packages"])
    assert listed == on_disk | {"fedhealth.configs"}
    assert setuptools["package-dir"] == {"fedhealth.configs": "configs"}
    assert not any(p.split(".")[0] != "fedhealth" for p in listed)


def test_the_readme_layout_names_every_folder_of_the_package():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"^  ([a-z_]+)/", block, flags=re.M))
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert named == folders, (sorted(named - folders), sorted(folders - named))


PROCESS_ROOMS = ("serverapp", "clientapp", "supernode", "superlink", "testing")
DOMAIN_ROOMS = (
    "protocol",
    "runs",
    "service",
    "data",
    "models",
    "training",
    "privacy",
    "security",
    "reports",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_dependencies_point_down_from_the_process_rooms_to_the_domain():
    upward = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for room in DOMAIN_ROOMS
        for path in (PACKAGE / room).rglob("*.py")
        for name in _imports(path)
        if name.startswith(tuple(f"fedhealth.{r}" for r in PROCESS_ROOMS))
    ]
    assert not upward, upward


def test_the_protocol_and_the_light_clientapp_stages_load_without_torch():
    """Both sides import protocol/; the secure-aggregation stages start in a fresh process."""
    probe = (
        "import sys, fedhealth.protocol.keys, fedhealth.protocol.packing, "
        "fedhealth.protocol.replies, fedhealth.clientapp.app, fedhealth.clientapp.secagg_stages; "
        "print(sorted(m for m in ('torch', 'monai', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
