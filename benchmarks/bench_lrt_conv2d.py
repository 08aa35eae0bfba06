"""LRT convolution benchmark: the fused Triton op against dense and the naive reference (BENCHMARKS.md).

Shapes: VGG-like 3x3 convolutions, padding 1, stride 1, batch B = 128, C_in = C_out = C:
  - vgg64: 64 channels at 32x32, vgg128: 128 at 16x16, vgg256: 256 at 8x8, vgg512: 512 at 4x4;
each in fp32 and under bf16 autocast (bf16 activations, fp32 parameters).
Modes: fwd (forward with autograd recording, as in training), bwd (the backward of that forward),
full (forward + backward). Providers:
  - ``dense``: F.conv2d (nn.Conv2d's forward) on x, θ, b in the same dtype / autocast (cuDNN);
  - ``reference``: the naive formulation written out in torch ops (the authors': two convolutions
    and ~10 elementwise passes forward, autograd backward; the math of
    sparsevd/ops/lrt_conv2d/naive.py) with ξ = torch.randn_like;
  - ``reference_compiled``: torch.compile of that function (default mode);
  - ``sparsevd``: the fused op torch.ops.sparsevd.lrt_conv2d with a fresh seed per call (the seed
    draw is timed too), SPARSEVD_BACKEND=triton.
Each row carries ``tflops`` from the provider's essential FLOPs (dense: 2·M·C_out·K forward,
twice that backward, M = B·H_out·W_out, K = C_in·kH·kW; LRT: twice dense, the mean and the
variance products) and ``gbps`` from the byte floor of benchmarks/NOTES.md, "LRT convolution"
(the tensors each direction must read and write once).

fp32 precision: every provider computes in IEEE fp32 (torch.backends.cudnn.allow_tf32 and
torch.backends.cuda.matmul.allow_tf32 off; cuDNN would use TF32 for fp32 convolutions by default),
or with ``--tf32`` every provider uses TF32 (both flags on; sparsevd follows the matmul flag);
the rows' dtype says "float32" or "float32-tf32".

GPU only: timing by triton.testing.do_bench (CUDA events, L2 flushed, median / p20 / p80), leaf
gradients set to None between runs. Without CUDA the script stops with a message, unless
``--smoke``: a tiny shape on CPU (sparsevd then runs the kernels in Triton's interpreter), no
result file, to check the harness.

Usage: python -m benchmarks.bench_lrt_conv2d [--shapes vgg64 vgg128 vgg256 vgg512]
       [--dtypes fp32 bf16] [--modes fwd bwd full]
       [--providers dense reference reference_compiled sparsevd] [--tf32] [--quick] [--no-save]
       [--smoke]
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks import common

#: name: (B, C, H = W); 3x3 kernels, padding 1, C_in = C_out = C
SHAPES = {
    "vgg64": (128, 64, 32),
    "vgg128": (128, 128, 16),
    "vgg256": (128, 256, 8),
    "vgg512": (128, 512, 4),
}
DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, True)}
SMOKE_SHAPES = [(2, 8, 6)]
PROVIDERS = ("dense", "reference", "reference_compiled", "sparsevd")
MODES = ("fwd", "bwd", "full")
KERNEL = 3
PADDING = 1


def gemm_sizes(b: int, c: int, hw: int):
    """(M, K, N) of the implicit GEMM of a 3x3 'same' convolution: M = B·H·W output pixels,
    K = C_in·9, N = C_out."""
    return b * hw * hw, c * KERNEL * KERNEL, c


def flops(provider: str, mode: str, b: int, c: int, hw: int) -> float:
    """Essential FLOPs: 2MNK per convolution-as-GEMM; dense 1 forward + 2 backward (∂x, ∂θ), LRT
    twice that (the mean and the variance products)."""
    m, k, n = gemm_sizes(b, c, hw)
    per = {"fwd": 1, "bwd": 2, "full": 3}[mode] * 2.0 * m * n * k
    return per if provider == "dense" else 2.0 * per


def byte_floor(provider: str, mode: str, b: int, c: int, hw: int, act_bytes: int) -> float:
    """Bytes each direction must move at least (benchmarks/NOTES.md, "LRT convolution").

    fwd: read x, θ (and log σ², b) once; write y (and the fp32 std the backward needs).
    bwd: read g, x, θ (and log σ², std); write ∂x, ∂θ (and ∂log σ²), ∂b.
    Parameters are fp32 (4 bytes) under autocast too; x, y, g and ∂x take ``act_bytes``.
    """
    p = 4
    x = b * c * hw * hw  # elements of x, y, g, ∂x, std (C_in = C_out, 'same' padding)
    w = c * c * KERNEL * KERNEL
    if provider == "dense":
        fwd = act_bytes * (x + x) + p * (w + c)
        bwd = act_bytes * (x + x + x) + p * (w + w + c)
    else:
        fwd = act_bytes * (x + x) + 4 * x + p * (2 * w + c)
        bwd = act_bytes * (x + x + x) + 4 * x + p * (2 * w + 2 * w + c)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _reference_fn(x, w, ls2, b):
    """The naive LRT convolution (sparsevd/ops/lrt_conv2d/naive.py's math) in plain torch ops,
    under the caller's autocast as PyTorch runs it, with torch's own ξ."""
    mu = F.conv2d(x, w, b, 1, PADDING)
    return mu + torch.sqrt(F.conv2d(x * x, ls2.exp(), None, 1, PADDING) + 1e-8) * torch.randn_like(mu)


def _make_forward(provider: str, compiled: Dict[str, Callable]) -> Callable:
    if provider == "dense":
        return lambda x, w, ls2, b: F.conv2d(x, w, b, 1, PADDING)
    if provider == "reference":
        return _reference_fn
    if provider == "reference_compiled":
        if "ref" not in compiled:
            compiled["ref"] = torch.compile(_reference_fn)
        return compiled["ref"]
    if provider == "sparsevd":
        from sparsevd.ops.lrt_conv2d import lrt_conv2d
        from sparsevd.ops.noise import draw_seed

        return lambda x, w, ls2, b: lrt_conv2d(x, w, ls2, b, draw_seed(x.device), [1, 1],
                                               [PADDING, PADDING], [1, 1], 1)[0]
    raise ValueError(f"provider: unknown {provider!r}")


def bench_shape(b, c, hw, dtype, autocast, device, providers, modes, compiled) -> List[Dict]:
    dtype_name = ("autocast-" if autocast else "") + str(dtype).replace("torch.", "")
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        dtype_name += "-tf32"
    act_bytes = torch.empty((), dtype=dtype).element_size()
    return common.time_lrt_modes(
        "lrt_conv2d", f"B={b},C={c},H=W={hw},k=3,p=1", dtype_name, common.environment(device),
        providers, modes, lambda p: _make_forward(p, compiled),
        common.lrt_inputs((b, c, hw, hw), (c, c, KERNEL, KERNEL), (b, c, hw, hw), dtype, autocast, device),
        dtype if autocast else None, batch=b,
        nbytes=lambda p, mode: byte_floor(p, mode, b, c, hw, act_bytes),
        flops=lambda p, mode: flops(p, mode, b, c, hw))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--tf32", action="store_true",
                    help="fp32 rows with TF32 for every provider (default: IEEE fp32 for every provider)")
    common.add_triton_args(ap, MODES, PROVIDERS, smoke="a tiny shape")
    args = common.parse_args(ap, argv)

    where = common.triton_device(args, "bench_lrt_conv2d", args.providers)
    if where is None:
        return 2
    device, save, providers = where
    if device == "cpu":
        shapes, dtypes = SMOKE_SHAPES, [DTYPES["fp32"]]  # bf16 dots run on a GPU only
    else:
        shapes = [SHAPES[name] for name in args.shapes]
        dtypes = [DTYPES[name] for name in args.dtypes]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    rows, compiled = [], {}
    for b, c, hw in shapes:
        for dtype, autocast in dtypes:
            rows += bench_shape(b, c, hw, dtype, autocast, device, providers, args.modes, compiled)
    print()
    common.print_rows(rows, baseline="dense")
    if save:
        print("saved to", common.save_rows(rows, device, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
