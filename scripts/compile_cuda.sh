#!/usr/bin/env bash
# Compile-only check of the CUDA kernels for sm_80 and sm_90: `nvcc -c` of each csrc/cuda/*.cu.
# Needs nvcc (CUDA 12 or 13), no GPU and no torch. Usage: bash scripts/compile_cuda.sh [OUT_DIR]
# Env: NVCC (default nvcc), NVCC_FLAGS (extra flags).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
OUT_DIR=${1:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda.sh: no .cu files under csrc/cuda" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  obj="$OUT_DIR/$(basename "$src" .cu).o"
  echo "nvcc -c $src -> $obj"
  # shellcheck disable=SC2086
  "$NVCC" -c "$src" -o "$obj" -std=c++17 -O3 -Icsrc -Xcompiler -fPIC \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 --threads 2 ${NVCC_FLAGS:-}
done
echo "compile_cuda.sh: ${#sources[@]} file(s) compiled for sm_80 and sm_90"
