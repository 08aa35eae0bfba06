#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, triton (for its CPU interpreter) and the package.
# Usage: bash scripts/setup.sh   (idempotent; run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${SPARSEVD_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-build-isolation -e .
