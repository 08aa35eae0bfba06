#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, triton (for its CPU interpreter) and the package.
# Usage: bash scripts/setup.sh   (idempotent; run from anywhere inside the repository)
# Environment: PYTHON (interpreter for the venv, default python3), SPARSEVD_TORCH_VERSION
# (default 2.13.0), SPARSEVD_TORCH_INDEX (extra pip index for torch, e.g.
# https://download.pytorch.org/whl/cpu to get the small CPU wheel instead of PyPI's CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip || echo "setup.sh: pip upgrade failed; continuing" >&2
TORCH_ARGS=()
if [ -n "${SPARSEVD_TORCH_INDEX:-}" ]; then TORCH_ARGS+=(--extra-index-url "$SPARSEVD_TORCH_INDEX"); fi
.venv/bin/python -m pip install -q "${TORCH_ARGS[@]}" "torch==${SPARSEVD_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-build-isolation -e .
