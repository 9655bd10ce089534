#!/usr/bin/env bash
# Every check, as CI runs it: set-up, type check (mypy strict), lint (ruff), format check, then
# every test including the slow end-to-end ones, in two pytest-xdist workers (one test file per
# worker at a time; `bash scripts/check.sh -n 0` runs them in one process). Stops at the first
# failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== mypy (strict) =="
.venv/bin/mypy
echo "== ruff check =="
.venv/bin/ruff check fedhealth tests benchmarks server clients configs
echo "== ruff format --check =="
.venv/bin/ruff format --check fedhealth tests benchmarks server clients configs
echo "== pytest (all tests, slow ones included) =="
.venv/bin/python -m pytest -m "" -n 2 --dist loadfile "$@"
