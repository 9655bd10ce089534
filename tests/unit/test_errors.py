"""The error catalogue: one code per error class, a help text per code, no stray exception class."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from fedhealth import errors
from fedhealth.cli import main
from fedhealth.errors import ERROR_HELP, ErrorCode, FedHealthError, component

PACKAGE = Path(errors.__file__).parent


def _catalogued() -> list[type[FedHealthError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, FedHealthError) and cls is not FedHealthError
    ]


def test_every_code_has_a_help_text_and_a_component():
    assert set(ERROR_HELP) == set(ErrorCode)
    for code in ErrorCode:
        assert ERROR_HELP[code].strip(), code
        assert component(code) in {
            "config",
            "data",
            "serverapp",
            "runs",
            "privacy",
            "security",
            "supernode",
            "testing",
            "site-reply",
        }


def test_each_error_class_has_its_own_code():
    codes = [cls.code for cls in _catalogued()]
    assert len(codes) == len(set(codes)), codes
    assert all(code < 1000 for code in codes)  # 1001-1005 are what a site *replies*


def test_site_reply_codes_come_from_the_catalogue():
    assert set(errors.SITE_ERROR_CODES) == {int(c) for c in ErrorCode if c >= 1000}
    assert errors.site_error_code(errors.BudgetExhausted("x")) == errors.BUDGET_REFUSAL
    assert errors.site_error_code(errors.DataError("x")) == ErrorCode.SITE_DATA
    assert errors.site_error_code(KeyError("x")) == ErrorCode.SITE_TRAINING


def test_no_exception_class_is_defined_outside_the_catalogue():
    """Every error fedhealth raises on purpose is catalogued (private control-flow ones aside)."""
    stray = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception", "Mismatch")) for b in bases):
                    stray.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not stray, stray


@pytest.mark.parametrize(
    "cls", [errors.ConfigError, errors.RunIncomplete, errors.LedgerError, errors.ComposeError]
)
def test_cli_prints_code_and_help_never_a_traceback(cls, monkeypatch, capsys):
    def fail(_args: object) -> int:
        raise cls("what went wrong, and where")

    monkeypatch.setattr("fedhealth.cli_data.cmd_data_synth", fail)
    assert main(["data", "synth"]) == 2
    err = capsys.readouterr().err
    assert f"E{int(cls.code):04d} {component(cls.code)}: what went wrong, and where" in err
    assert ERROR_HELP[cls.code][:40] in err
    assert "Traceback" not in err
