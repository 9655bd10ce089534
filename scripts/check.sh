#!/usr/bin/env bash
# Every check, as CI runs it: set-up, type check (mypy strict), lint (ruff), format check, then
# every test including the slow end-to-end ones. Stops at the first failure.
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
.venv/bin/python -m pytest -m "" "$@"
