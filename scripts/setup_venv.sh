#!/usr/bin/env bash
# Build .venv from nothing. torch is installed first and pinned so that pip takes the CPU wheel
# that lies on local disk instead of resolving a multi-GB CUDA build as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,serve,export]"
touch .venv/.installed
