"""The ``triton`` backend of ``lrt_linear``: launchers and autotuning of the kernels in
:mod:`sparsevd.triton_kernels.lrt_linear`.

Registers ``lrt_linear`` and ``lrt_linear_backward`` with the signatures and return conventions of
:mod:`sparsevd.ops.lrt_linear.naive`. The launchers trust their arguments: :mod:`sparsevd.functional`,
the checked entry point, validated them (dtype, device, shape). Imported by
:mod:`sparsevd.ops.backend` when the triton backend is requested (or, under ``auto``, for CUDA
tensors); an ImportError here (no triton) makes the backend unavailable.

Kernel launches per call (docs/design.md, "Backends"):

- ``lrt_linear``: 1 (μ, s², ξ, y and std in one kernel); none for an empty batch.
- ``lrt_linear_backward``: 2 (g_s2 = g ξ / (2 std) elementwise, then ∂x and ∂θ, ∂log σ², ∂b in one
  launch of two kinds of programs).

Train-time clipping (``clip_threshold``) adds no launch and no pass over the weights: the kernels
form the mask in registers and skip the products of all-dropped weight tiles
(:mod:`sparsevd.triton_kernels.lrt_linear`; ``SPARSEVD_TRITON_CLIP_SKIP=0`` turns the skipping
off, with bit-identical results; :func:`count_skipped_tiles` counts what was skipped).

Precision (:mod:`sparsevd.ops.triton_common`): fp32 inputs use IEEE fp32 dots, or TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is True (``SPARSEVD_FP32_PRECISION=ieee|tf32|tf32x3``
overrides); fp64 inputs compute in fp64 (for gradcheck); under autocast (bf16/fp16 x, fp32
parameters) the mean products take x's dtype as dot input, like nn.Linear under autocast, the
variance products bf16 for bf16 and TF32 for fp16 (σ² ≈ e⁻¹⁰ would underflow fp16), with fp32
accumulation, fp32 std and fp32 parameter gradients.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import List, Optional, Tuple

import torch
import triton

from sparsevd.triton_kernels import lrt_linear as K

from ..backend import register_impl
from ..triton_common import (acc_dtype, autotune_enabled, dot_kind, elementwise_block, m_key, precision,
                             tile_configs)


# ------------------------------------------------------------------------------------ autotuning
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel and kind of dot, checked with
#: Triton 3.9's bundled ptxas for sm_90a (no GPU needed; see benchmarks/NOTES.md): no register
#: spill (or under 400 bytes where marked), shared memory under 227 KB. "tc": tensor-core dots
#: (tf32, tf32x3, bf16, fp16); "ieee": fp32 FMA dots, which keep a whole K slice of both operands
#: in registers, hence the short BLOCK_K; "fp64": gradcheck-sized tiles.
TILES = {
    ("fwd", "tc"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (128, 64, 64, 8, 2),
                    (64, 64, 64, 8, 3), (32, 64, 64, 4, 2), (16, 64, 64, 4, 2)],
    ("fwd", "tc32"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (128, 64, 64, 8, 2),
                      (64, 64, 64, 8, 3), (32, 64, 64, 4, 2), (16, 64, 64, 4, 2)],
    ("fwd", "ieee"): [(64, 64, 8, 8, 3), (64, 64, 16, 8, 2), (128, 64, 8, 8, 2), (32, 64, 8, 4, 2),
                      (16, 64, 16, 4, 2)],
    ("fwd", "fp64"): [(32, 32, 16, 4, 2), (16, 32, 32, 4, 2)],
    # The backward allocates shared memory for both kinds of programs, and fp32 operands take twice
    # the bf16 bytes: fewer large tiles for tf32.
    ("bwd", "tc"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 2), (64, 64, 32, 8, 3),
                    (128, 64, 64, 8, 2), (64, 64, 64, 8, 3), (32, 64, 64, 4, 2), (16, 64, 64, 4, 2)],
    ("bwd", "tc32"): [(64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (128, 64, 64, 8, 2), (32, 64, 64, 4, 2),
                      (16, 64, 64, 4, 2)],
    ("bwd", "ieee"): [(32, 32, 16, 4, 2), (64, 64, 8, 8, 3), (16, 64, 16, 4, 2)],  # 2nd, 3rd: < 400 B spill
    ("bwd", "fp64"): [(32, 32, 16, 4, 2), (16, 32, 32, 4, 2)],
}
#: The one configuration used under TRITON_INTERPRET=1, where the time grows with the number of
#: programs and loop steps (Python overhead per operation) and hardly with the tile size.
INTERPRETER_TILES = (32, 256, 512, 4, 1)


def matmul_configs(kernel: str) -> List[triton.Config]:
    """The autotuning candidates of the "fwd" or "bwd" LRT kernel: a single configuration when
    interpreting (TRITON_INTERPRET=1), otherwise the union of :data:`TILES` for that kernel,
    narrowed per call by :func:`_pruner`."""
    return tile_configs(TILES, kernel, INTERPRETER_TILES)


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        kind = dot_kind(named_args["x_ptr"].dtype, kwargs["PRECISION"], kwargs["ACC_F64"])
        tiles = TILES[(kernel, kind)]
        if named_args["M_KEY"] <= 32:  # small batches: small row tiles only
            tiles = [t for t in tiles if t[0] <= 32] or tiles
        want = {t for t in tiles}
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in want]
        return kept if autotune_enabled() else kept[:1]
    return prune


def _autotuned(kernel, name: str, configs: Optional[List[triton.Config]] = None):
    """``kernel`` wrapped in triton.autotune over :func:`matmul_configs` (or ``configs``), keyed on
    the problem size (M rounded up to a power of two), the dot precision and the tensor dtypes;
    tuning results are cached on disk."""
    key = ["M_KEY", "N", "K", "PRECISION", "CLIP"] + (["HAS_BIAS"] if name == "fwd" else [])
    return triton.autotune(
        configs=configs if configs is not None else matmul_configs(name), key=key,
        prune_configs_by={"early_config_prune": _pruner(name)}, cache_results=True,
    )(kernel)


_fwd_kernel = _autotuned(K.lrt_linear_fwd_kernel, "fwd")
_bwd_kernel = _autotuned(K.lrt_linear_bwd_kernel, "bwd")


# -------------------------------------------------------------------------------------- helpers
def _rows(t: torch.Tensor) -> Optional[Tuple[torch.Tensor, int, int, int, int]]:
    """(tensor, D1, stride_0, stride_1, stride_k) describing t (*, K) as M rows with at most two
    leading dims (row m at (m // D1)·stride_0 + (m % D1)·stride_1), or None if t has more leading
    dims that do not flatten without a copy."""
    if t.dim() == 1:
        return t, 1, 0, 0, t.stride(0)
    if t.dim() == 2:
        return t, max(t.shape[0], 1), 0, t.stride(0), t.stride(1)
    if t.dim() == 3:
        return t, max(t.shape[1], 1), t.stride(0), t.stride(1), t.stride(2)
    try:
        return _rows(t.view(-1, t.shape[-1]))
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------------- lrt_linear
#: ``SPARSEVD_TRITON_CLIP_SKIP=0`` runs the clipped kernels without dead-tile skipping (the
#: results are bit for bit the same: the tests compare both paths).
CLIP_SKIP_ENV = "SPARSEVD_TRITON_CLIP_SKIP"
_skip_counter: Optional[torch.Tensor] = None  # set inside count_skipped_tiles()


def clip_skip_enabled() -> bool:
    """False when ``SPARSEVD_TRITON_CLIP_SKIP=0``, True when it is 1 or unset (read at each
    clipped call); any other value raises a ValueError naming the variable."""
    value = os.environ.get(CLIP_SKIP_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{CLIP_SKIP_ENV}={value!r}: expected 0 (no dead-tile skipping) or 1")
    return value == "1"


@contextlib.contextmanager
def count_skipped_tiles(device):
    """Within the block, the clipped lrt_linear launches add the weight tiles they skipped to
    the yielded int64 tensor (3,) on ``device``: [forward K steps, ∂x N steps, dead ∂θ tiles]
    (one atomic per skipped tile: for tests and benchmarks/NOTES.md, not for speed). Exact with
    one tile config (the interpreter, or ``SPARSEVD_TRITON_AUTOTUNE=0``); the autotuner's timing
    runs of a new problem size would add their skips too."""
    global _skip_counter
    old = _skip_counter
    _skip_counter = torch.zeros(3, dtype=torch.int64, device=device)
    try:
        yield _skip_counter
    finally:
        _skip_counter = old


def _clip_args(clip_threshold: Optional[float], seed: torch.Tensor) -> Tuple[float, torch.Tensor, dict]:
    """Kernel arguments of train-time clipping: (threshold, an fp64 scalar that the kernels
    round to their compute dtype; the skip counter, or the seed as a never-written placeholder;
    the constexpr flags)."""
    clip = clip_threshold is not None
    count = clip and _skip_counter is not None
    flags = dict(CLIP=clip, SKIP_DEAD=clip and clip_skip_enabled(), COUNT_SKIPS=count)
    return (float(clip_threshold) if clip else 0.0), (_skip_counter if count else seed), flags


def triton_lrt_linear(x, weight, log_sigma2, bias, seed, clip_threshold=None):
    """y = x θᵀ + b + sqrt((x⊙x)(σ²)ᵀ + 1e-8)⊙ξ in one kernel; returns (y in x's dtype, std in
    promote(x, weight) dtype), both (*, N). An empty batch launches nothing. ``clip_threshold``:
    the weights with log α ≥ it enter neither the mean nor the variance (mask in registers)."""
    n, k = weight.shape
    lead = tuple(x.shape[:-1])
    y = x.new_empty((*lead, n))
    std = x.new_empty((*lead, n), dtype=torch.promote_types(x.dtype, weight.dtype))
    m = y.numel() // n if n else 0
    if m == 0 or n == 0:
        return y, std
    rows = _rows(x)
    if rows is None:
        rows = _rows(x.reshape(-1, k))
    xr, d1, s0, s1, sk = rows
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    thr, cnt, clip_flags = _clip_args(clip_threshold, seed)
    _fwd_kernel[grid](
        xr, weight, log_sigma2, bias if bias is not None else weight, seed, y, std,
        m, n, k, d1, s0, s1, sk,
        weight.stride(0), weight.stride(1), log_sigma2.stride(0), log_sigma2.stride(1),
        bias.stride(0) if bias is not None else 0,
        thr, cnt, m_key(m),
        HAS_BIAS=bias is not None, ACC_F64=acc_dtype(x, weight) == torch.float64,
        VAR_LOWP=x.dtype == torch.bfloat16, PRECISION=precision(x),
        **clip_flags,
    )
    return y, std


def triton_lrt_linear_backward(grad, x, weight, log_sigma2, std, seed, need_grad_x=True, clip_threshold=None):
    """(∂x, ∂θ, ∂log σ², ∂b) of the LRT linear layer in two kernels (see module docstring);
    without ``need_grad_x`` the ∂x programs are not launched and ∂x is an empty (0,) tensor.
    ``clip_threshold`` (the forward's): ∂θ = ∂log σ² = 0 for the dropped weights, which enter ∂x
    as zeros."""
    n, k = weight.shape
    acc = acc_dtype(x, weight)
    m = math.prod(grad.shape[:-1])
    g = grad.reshape(m, n).contiguous()
    sd = std.reshape(m, n).contiguous()
    gx = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
    gw = torch.empty_like(weight)
    gl = torch.empty_like(log_sigma2)
    gb = weight.new_empty((n,))
    if m == 0 or n == 0 or k == 0:  # nothing to reduce over, or nothing to write: no launch
        gx.zero_()  # (empty without need_grad_x)
        gw.zero_()
        gl.zero_()
        gb.copy_(g.to(acc).sum(0))
        return gx, gw, gl, gb

    gs2 = g.new_empty((m, n), dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else acc)
    block, warps = elementwise_block(acc)
    K.lrt_linear_bwd_gs2_kernel[(triton.cdiv(m * n, block),)](
        g, sd, seed, gs2, m * n, ACC_F64=acc == torch.float64, BLOCK=block, num_warps=warps,
    )

    rows = _rows(x)
    if rows is None:
        rows = _rows(x.reshape(-1, k))
    xr, d1, s0, s1, sk = rows
    if need_grad_x:
        gx_rows = _rows(gx)
        gx_out = gx if gx_rows is not None else torch.empty((m, k), dtype=x.dtype, device=x.device)
        _, _, gs0, gs1, gsk = gx_rows if gx_rows is not None else _rows(gx_out)
    else:  # no ∂x programs: the pointer is never written
        gx_out, gs0, gs1, gsk = x, 0, 0, 0
    grid = lambda meta: (  # noqa: E731
        (need_grad_x * triton.cdiv(m, meta["BLOCK_M"]) + triton.cdiv(n, meta["BLOCK_N"]))
        * triton.cdiv(k, meta["BLOCK_K"]),
    )
    thr, cnt, clip_flags = _clip_args(clip_threshold, seed)
    _bwd_kernel[grid](
        g, gs2, xr, weight, log_sigma2, gx_out, gw, gl, gb,
        m, n, k, d1, s0, s1, sk, gs0, gs1, gsk,
        weight.stride(0), weight.stride(1), log_sigma2.stride(0), log_sigma2.stride(1),
        gw.stride(0), gw.stride(1), gl.stride(0), gl.stride(1),
        thr, cnt, m_key(m),
        ACC_F64=acc == torch.float64, PRECISION=precision(x), WITH_DX=need_grad_x,
        **clip_flags,
    )
    if need_grad_x and gx_out is not gx:
        gx.copy_(gx_out.view(gx.shape))
    return gx, gw, gl, gb


register_impl("lrt_linear", "triton", triton_lrt_linear)
register_impl("lrt_linear_backward", "triton", triton_lrt_linear_backward)
