"""LRT linear benchmark: the fused Triton op against dense and the naive reference (BENCHMARKS.md).

Shapes (M = batch rows, K = in_features, N = out_features):
  - LeNet-300-100's layers at B=100, fp32: 100x784x300, 100x300x100, 100x100x10;
  - 1024x1024 at B=256, fp32;
  - 4096x4096 at M=8192 under bf16 autocast (bf16 activations, fp32 parameters).
Modes: fwd (forward with autograd recording, as in training), bwd (the backward of that forward),
full (forward + backward). Providers:
  - ``dense``: F.linear (nn.Linear's forward) on x, θ, b, the same dtype / autocast;
  - ``reference``: the naive formulation written out in torch ops (the authors': two matmuls and
    ~10 elementwise passes forward, autograd backward; the math of
    sparsevd/ops/lrt_linear/naive.py) with ξ = torch.randn_like;
  - ``reference_compiled``: torch.compile of that function (default mode);
  - ``sparsevd``: the fused op torch.ops.sparsevd.lrt_linear with a fresh seed per call (the seed
    draw is timed too), SPARSEVD_BACKEND=triton.
Each row carries ``tflops`` from the provider's essential FLOPs (dense: 2MNK forward, 4MNK
backward; LRT: twice that, the mean and the variance products) and ``gbps`` from the byte floor
of benchmarks/NOTES.md (the tensors each direction must read and write once).

GPU only: timing by triton.testing.do_bench (CUDA events, L2 flushed, median / p20 / p80), leaf
gradients set to None between runs. Without CUDA the script stops with a message, unless
``--smoke``: tiny shapes on CPU (sparsevd then runs the kernels in Triton's interpreter), no
result file, to check the harness.

Usage: python -m benchmarks.bench_lrt_linear [--shapes lenet 1024 4096] [--modes fwd bwd full]
       [--providers dense reference reference_compiled sparsevd] [--no-save] [--smoke]
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import common

SHAPES = {
    # name: list of (M, K, N, dtype, autocast)
    "lenet": [(100, 784, 300, torch.float32, False), (100, 300, 100, torch.float32, False),
              (100, 100, 10, torch.float32, False)],
    "1024": [(256, 1024, 1024, torch.float32, False)],
    "4096": [(8192, 4096, 4096, torch.bfloat16, True)],
}
SMOKE_SHAPES = [(8, 24, 16, torch.float32, False)]
PROVIDERS = ("dense", "reference", "reference_compiled", "sparsevd")
MODES = ("fwd", "bwd", "full")


def flops(provider: str, mode: str, m: int, k: int, n: int) -> float:
    """Essential FLOPs: 2MNK per matmul; dense 1 forward + 2 backward, LRT 2 + 4."""
    per = {"fwd": 1, "bwd": 2, "full": 3}[mode] * 2.0 * m * n * k
    return per if provider == "dense" else 2.0 * per


def byte_floor(provider: str, mode: str, m: int, k: int, n: int, act_bytes: int) -> float:
    """Bytes each direction must move at least (benchmarks/NOTES.md, "LRT linear").

    fwd: read x, θ (and log σ², b) once; write y (and the fp32 std the backward needs).
    bwd: read g, x, θ (and log σ², std); write ∂x, ∂θ (and ∂log σ²), ∂b.
    Parameters are fp32 (4 bytes) under autocast too; x, y, g and ∂x take ``act_bytes``.
    """
    p = 4
    if provider == "dense":
        fwd = act_bytes * (m * k + m * n) + p * (n * k + n)
        bwd = act_bytes * (m * n + m * k + m * k) + p * (n * k + n * k + n)
    else:
        fwd = act_bytes * (m * k + m * n) + 4 * m * n + p * (2 * n * k + n)
        bwd = act_bytes * (m * n + m * k + m * k) + 4 * m * n + p * (2 * n * k + 2 * n * k + n)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _reference_fn(x, w, ls2, b):
    """The naive LRT (sparsevd/ops/lrt_linear/naive.py's math) in plain torch ops, under the
    caller's autocast as PyTorch runs it, with torch's own ξ."""
    mu = F.linear(x, w, b)
    return mu + torch.sqrt(F.linear(x * x, ls2.exp()) + 1e-8) * torch.randn_like(mu)


def _make_forward(provider: str, compiled: Dict[str, Callable]) -> Callable:
    if provider == "dense":
        return lambda x, w, ls2, b: F.linear(x, w, b)
    if provider == "reference":
        return _reference_fn
    if provider == "reference_compiled":
        if "ref" not in compiled:
            compiled["ref"] = torch.compile(_reference_fn)
        return compiled["ref"]
    if provider == "sparsevd":
        from sparsevd.ops.lrt_linear import lrt_linear
        from sparsevd.ops.noise import draw_seed

        return lambda x, w, ls2, b: lrt_linear(x, w, ls2, b, draw_seed(x.device))[0]
    raise ValueError(f"provider: unknown {provider!r}")


def bench_shape(m, k, n, dtype, autocast, device, providers, modes, compiled) -> List[Dict]:
    dtype_name = ("autocast-" if autocast else "") + str(dtype).replace("torch.", "")
    act_bytes = torch.empty((), dtype=dtype).element_size()
    return common.time_lrt_modes(
        "lrt_linear", f"M={m},K={k},N={n}", dtype_name, common.environment(device), providers, modes,
        lambda p: _make_forward(p, compiled),
        common.lrt_inputs((m, k), (n, k), (m, n), dtype, autocast, device),
        dtype if autocast else None, batch=m,
        nbytes=lambda p, mode: byte_floor(p, mode, m, k, n, act_bytes),
        flops=lambda p, mode: flops(p, mode, m, k, n))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    common.add_triton_args(ap, MODES, PROVIDERS, smoke="tiny shapes")
    args = common.parse_args(ap, argv)

    where = common.triton_device(args, "bench_lrt_linear", args.providers)
    if where is None:
        return 2
    device, save, providers = where
    shapes = SMOKE_SHAPES if device == "cpu" else [s for name in args.shapes for s in SHAPES[name]]
    rows, compiled = [], {}
    for m, k, n, dtype, autocast in shapes:
        rows += bench_shape(m, k, n, dtype, autocast, device, providers, args.modes, compiled)
    print()
    common.print_rows(rows, baseline="dense")
    if save:
        print("saved to", common.save_rows(rows, device, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
