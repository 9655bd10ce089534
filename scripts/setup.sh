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
# constraints.txt pins every package to the version the checks ran with.
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# Two Debian tools the end-to-end tests use, installed only as root with apt-get (never failing the
# set-up): docker-compose (1.29 is enough) validates docker/docker-compose.yml with
# `docker-compose config`, which needs no Docker engine (tests/e2e/test_compose.py); headless
# Chromium renders the training and privacy reports (tests/e2e/test_report_render.py).
apt_tool() {  # apt_tool <command> <package> <test that needs it>
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 \
           || { apt-get update -qq >/dev/null 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1; }; }; then
      echo "note: could not install $2 with apt-get; $3 will skip" >&2
    fi
  else
    echo "note: $1 not found (install it: apt-get install $2); $3 will skip" >&2
  fi
}
apt_tool docker-compose docker-compose tests/e2e/test_compose.py
apt_tool chromium chromium tests/e2e/test_report_render.py
.venv/bin/python -c 'import torch, flwr, monai, opacus; print(f"fedhealth env ready: torch {torch.__version__}, flwr {flwr.__version__}, monai {monai.__version__}, opacus {opacus.__version__}")'
