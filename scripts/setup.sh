#!/usr/bin/env bash
# Idempotent set-up of .venv: the CPU torch wheel first (otherwise pip pulls the CUDA build and
# gigabytes of CUDA packages through a dependency), then fedhealth with its pinned stack.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, got {sys.version}"'
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c 'import torch, flwr, monai, opacus; print(f"fedhealth env ready: torch {torch.__version__}, flwr {flwr.__version__}, monai {monai.__version__}, opacus {opacus.__version__}")'
