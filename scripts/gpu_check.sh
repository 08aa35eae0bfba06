#!/usr/bin/env bash
# One command that validates the whole package on a GPU machine, in stages, each with its own
# timeout and a line in OUTDIR/gpu_check.log; OUTDIR/gpu_check.json sums them up (stage, status,
# seconds) and the benchmarks write their rows into OUTDIR/bench.json.
#
#   bash scripts/gpu_check.sh OUTDIR             # on the GPU machine (about 8-11 minutes on an H200)
#   bash scripts/gpu_check.sh --dry-run OUTDIR   # on any machine: checks that every stage's
#                                                # command exists, its tests are collected and
#                                                # its benchmarks accept their arguments
#
# Where one command may run at most 10 minutes (the device tool), two back-to-back calls on the
# same warm machine: GPU_CHECK_STAGES="env build tests", then GPU_CHECK_STAGES="sanitizer bench"
# (the build stays in the tree between them).
#
# Stages: env (nvidia-smi, torch, triton, nvcc), build (the package and sparsevd._C with its CUDA
# kernels, against the torch that is installed: nothing is downloaded or reinstalled), tests (the
# GPU tests, compiled kernels: TRITON_INTERPRET=0), sanitizer (compute-sanitizer memcheck on the
# CUDA and Triton kernel tests), bench (every benchmark in --quick mode).
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default
# the number of cores), GPU_CHECK_STAGES (default "env build tests sanitizer bench").
# Exit status: 0 when every stage passed, 1 otherwise (the log names the failing stage).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check.json"
: >"$LOG"
STAGES=${GPU_CHECK_STAGES:-env build tests sanitizer bench}

# The GPU tests: every backend-parametrized op test (the Triton backend runs on the GPU there),
# the Triton-specific tests, the CUDA csr_linear kernels, the train-time clipping tests, CUDA
# mixed-precision training (bf16, fp16 with its GradScaler) and 2 NCCL ranks (skipped with one GPU).
GPU_TESTS=(tests/test_lrt_linear.py tests/test_lrt_linear_triton.py tests/test_lrt_conv2d.py
           tests/test_lrt_conv2d_triton.py tests/test_kl.py tests/test_kl_triton.py
           tests/test_csr_linear.py tests/test_masked.py
           "tests/test_amp.py::test_training_run_follows_the_fp32_run[cuda-bf16]"
           "tests/test_amp.py::test_training_run_follows_the_fp32_run[cuda-fp16]"
           "tests/test_distributed.py::test_two_ranks_match_one_process_with_the_global_batch[nccl]")
# Under compute-sanitizer (slow: a subset that launches every kernel).
SANITIZER_TESTS=(tests/test_csr_linear.py tests/test_lrt_linear_triton.py tests/test_kl_triton.py
                 tests/test_lrt_conv2d_triton.py)
SANITIZER_FILTER="matches_dense or index_dtypes or forward_and_gradients or many_layers or partial_blocks"
SANITIZER_FILTER+=" or odd_shapes_small_tiles or split_weight_gradient"
# Every benchmark, in quick mode, with its arguments for the GPU.
BENCHMARKS=(
  "bench_train_step --device cuda --threads 1 --quick"
  "bench_lrt_linear --quick"
  "bench_lrt_conv2d --quick"
  "bench_kl --quick"
  "bench_csr_linear --device cuda --quick --skip-lenet"
  "bench_masked --device cuda --quick"
)

RESULTS=()
FAILED=0

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run_stage NAME TIMEOUT_S CMD...: runs CMD with a timeout, its output into the log.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS status
  log "stage $name: start (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout
  else status=failed; fi
  [ $status = ok ] || FAILED=1
  log "stage $name: $status (rc $rc, $((SECONDS - t0)) s)"
  RESULTS+=("{\"stage\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

# need CMD [gpu]: in a dry run, a missing command fails the check unless it is a GPU-machine tool
# (gpu), which is reported; on the GPU machine every command must exist.
need() {
  if command -v "$1" >/dev/null 2>&1; then log "found $1: $(command -v "$1")"; return 0; fi
  if [ $DRY -eq 1 ] && [ "${2:-}" = gpu ]; then
    log "not on this machine: $1 (needed on the GPU machine)"; return 0
  fi
  log "missing command: $1"; FAILED=1; return 1
}

stage_env() {
  need nvidia-smi gpu && [ $DRY -eq 0 ] && run_stage env-gpu 30 nvidia-smi
  need nvcc gpu
  need "$PY" || return
  run_stage env-python 60 "$PY" -c "
import torch, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
try:
    import triton; print('triton', triton.__version__)
except ImportError as e:
    print('triton missing:', e); sys.exit(1)
"
  command -v nvcc >/dev/null && nvcc --version >>"$LOG" 2>&1
}

stage_build() {
  if [ $DRY -eq 1 ]; then
    run_stage build-dry 60 "$PY" -m pip --version
    return
  fi
  # Against the installed torch: no build isolation, no dependencies, no index.
  run_stage build "${BUILD_TIMEOUT:-300}" env FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
  run_stage build-check 60 "$PY" -c "
from sparsevd.ops import library
assert library.available(), library.unavailable_reason()
assert library.has_cuda(), 'sparsevd._C was built without its CUDA kernels'
print('sparsevd._C with CUDA:', library.module().__file__)
"
}

stage_tests() {
  if [ $DRY -eq 1 ]; then
    run_stage tests-collect 300 "$PY" -m pytest --collect-only -q "${GPU_TESTS[@]}"
    return
  fi
  # 420 s: the conv kernels add some 40 compiled variants (dtypes, layouts, tiles) to the run.
  run_stage tests "${TESTS_TIMEOUT:-420}" env TRITON_INTERPRET=0 SPARSEVD_TRITON_AUTOTUNE=0 \
    "$PY" -m pytest -q -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" "${GPU_TESTS[@]}"
}

stage_sanitizer() {
  need compute-sanitizer gpu
  if [ $DRY -eq 1 ]; then
    run_stage sanitizer-collect 300 "$PY" -m pytest --collect-only -q -k "$SANITIZER_FILTER" \
      "${SANITIZER_TESTS[@]}"
    return
  fi
  command -v compute-sanitizer >/dev/null || return
  run_stage sanitizer "${SANITIZER_TIMEOUT:-150}" env TRITON_INTERPRET=0 SPARSEVD_TRITON_AUTOTUNE=0 \
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider -k "$SANITIZER_FILTER" \
    "${SANITIZER_TESTS[@]}"
}

stage_bench() {
  local spec name
  for spec in "${BENCHMARKS[@]}"; do
    name=${spec%% *}
    # shellcheck disable=SC2086
    if [ $DRY -eq 1 ]; then
      run_stage "$name-args" 120 "$PY" -m "benchmarks.$name" ${spec#* } --out "$OUT/bench.json" --dry-run
    else
      run_stage "$name" "${BENCH_TIMEOUT:-90}" "$PY" -m "benchmarks.$name" ${spec#* } --out "$OUT/bench.json"
    fi
  done
}

log "sparsevd gpu_check $([ $DRY -eq 1 ] && echo '(dry run) ')into $OUT, stages: $STAGES"
for s in $STAGES; do
  case $s in
    env) stage_env ;;
    build) stage_build ;;
    tests) stage_tests ;;
    sanitizer) stage_sanitizer ;;
    bench) stage_bench ;;
    *) log "unknown stage $s"; FAILED=1 ;;
  esac
done

{
  echo "{\"dry_run\": $([ $DRY -eq 1 ] && echo true || echo false), \"ok\": $([ $FAILED -eq 0 ] && echo true || echo false),"
  echo " \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\", \"seconds\": $SECONDS,"
  echo " \"stages\": ["
  for i in "${!RESULTS[@]}"; do
    sep=,; [ "$i" -eq $((${#RESULTS[@]} - 1)) ] && sep=
    echo "  ${RESULTS[$i]}$sep"
  done
  echo " ]}"
} >"$SUMMARY"
log "done in $SECONDS s: $([ $FAILED -eq 0 ] && echo 'all stages passed' || echo 'FAILED, see above'); summary $SUMMARY"
exit $FAILED
