"""Sparse-VD KL benchmark (eq. 14 summed over a model's layers) beside a device-to-device copy.

Models (fp32 parameters θ and log σ²):
  - ``0.27M``: LeNet-300-100's weights (784x300, 300x100, 100x10: 266,200 weights);
  - ``15M``: a VGG-16 conv stack (3x3 kernels, 3→64→64→128→128→256→256→256→512→...→512: 14.7M);
  - ``100M``: eight 4096x3072 layers (100.7M).
Modes: fwd (the KL with autograd recording, as in training: the fused op computes value and both
gradients here), bwd (the backward of that KL), full (both). Providers:
  - ``reference``: Σ over layers of the naive KL (sparsevd/ops/kl/naive.py), autograd backward;
  - ``reference_compiled``: torch.compile of that sum (default mode);
  - ``sparsevd``: sparsevd.functional.kl_sparse_vd_many (one torch.ops.sparsevd.kl_sparse_vd
    call: one kernel launch for all layers plus the sum of its partials), SPARSEVD_BACKEND=triton;
  - ``sparsevd_kept``: sparsevd.functional.kl_sparse_vd_kept (the same op with the per-layer count
    of the weights kept at evaluation, log α < 3, in the same launch: issue 23 item 7);
  - ``copy``: a device-to-device copy moving as many bytes as the fused op's full step
    (dst.copy_(src) of 2 floats per weight read and written), the bandwidth yardstick.
``gbps`` uses the byte floor of benchmarks/NOTES.md: fwd reads θ and log σ² and writes ∂θ and
∂log σ² (16 B/weight), bwd scales the gradients (read and write them, 16 B/weight), full 32 B/weight.
The reference providers get the same floors, so their GB/s compare with ours directly.

GPU only (triton.testing.do_bench, L2 flushed); without CUDA the script stops with a message,
unless ``--smoke`` (a tiny model on CPU, kernels in Triton's interpreter, nothing saved).

Usage: python -m benchmarks.bench_kl [--models 0.27M 15M 100M] [--modes fwd bwd full]
       [--providers reference reference_compiled sparsevd sparsevd_kept copy] [--no-save] [--smoke]
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import common

_VGG = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
MODELS: Dict[str, List[Tuple[int, ...]]] = {
    "0.27M": [(300, 784), (100, 300), (10, 100)],
    "15M": [(o, i, 3, 3) for i, o in zip(_VGG[:-1], _VGG[1:])],
    "100M": [(4096, 3072)] * 8,
}
SMOKE_MODEL = [(30, 20), (7,)]
PROVIDERS = ("reference", "reference_compiled", "sparsevd", "sparsevd_kept", "copy")
MODES = ("fwd", "bwd", "full")


def byte_floor(mode: str, n_weights: int, elem: int = 4) -> float:
    """fwd: read θ, log σ², write ∂θ, ∂log σ²; bwd: read and write both gradients."""
    return {"fwd": 4, "bwd": 4, "full": 8}[mode] * elem * n_weights


def _reference_kl(weights: Sequence[torch.Tensor], log_sigma2s: Sequence[torch.Tensor]) -> torch.Tensor:
    from sparsevd.ops.kl import naive_kl_sparse_vd

    return naive_kl_sparse_vd(list(weights), list(log_sigma2s), False)[0]


def bench_model(name: str, shapes, device: str, providers, modes) -> List[Dict]:
    import sparsevd.functional as SF

    env = common.environment(device)
    timer = common.grad_timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [(0.05 * torch.randn(s, device=device, generator=gen)).requires_grad_() for s in shapes]
    ls = [torch.empty(s, device=device).uniform_(-14.0, 2.0, generator=gen).requires_grad_() for s in shapes]
    leaves = ws + ls
    n = sum(w.numel() for w in ws)
    compiled = torch.compile(_reference_kl) if "reference_compiled" in providers else None
    fns = {
        "reference": lambda: _reference_kl(ws, ls),
        "reference_compiled": lambda: compiled(ws, ls),
        "sparsevd": lambda: SF.kl_sparse_vd_many(ws, ls),
        "sparsevd_kept": lambda: SF.kl_sparse_vd_kept(ws, ls, [3.0] * len(ws))[0],
    }
    old_check, SF.CHECK_NAN = SF.CHECK_NAN, False  # the NaN check syncs the host: not the kernel
    rows = []
    try:
        for provider in providers:
            for mode in modes:
                if provider == "copy":
                    src = torch.empty(2 * n * (2 if mode == "full" else 1), device=device)
                    dst = torch.empty_like(src)
                    fn, fn_leaves = (lambda s=src, d=dst: d.copy_(s)), []
                elif mode == "fwd":
                    fn, fn_leaves = fns[provider], leaves
                elif mode == "bwd":
                    kl = fns[provider]()
                    fn, fn_leaves = (lambda kl=kl: kl.backward(retain_graph=True)), leaves
                else:
                    fn, fn_leaves = (lambda p=provider: fns[p]().backward()), leaves
                times = timer(fn, fn_leaves)
                rows.append(common.make_row(
                    "kl", f"{name} ({n} weights, {len(shapes)} layers)", "float32", mode, provider,
                    times, env, nbytes=byte_floor(mode, n),
                    **({"compile_mode": "default"} if provider == "reference_compiled" else {}),
                ))
                common.print_rows(rows[-1:], baseline="copy")
    finally:
        SF.CHECK_NAN = old_check
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    common.add_triton_args(ap, MODES, PROVIDERS, smoke="a tiny model")
    args = common.parse_args(ap, argv)

    where = common.triton_device(args, "bench_kl", args.providers)
    if where is None:
        return 2
    device, save, providers = where
    models = {"smoke": SMOKE_MODEL} if device == "cpu" else {m: MODELS[m] for m in args.models}
    rows = []
    for name, shapes in models.items():
        rows += bench_model(name, shapes, device, providers, args.modes)
    print()
    common.print_rows(rows, baseline="copy")
    if save:
        print("saved to", common.save_rows(rows, device, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
