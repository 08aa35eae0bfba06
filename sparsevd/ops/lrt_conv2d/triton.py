"""The ``triton`` backend of ``lrt_conv2d`` and ``lrt_conv2d_backward``: launchers and autotuning
of the kernels in :mod:`sparsevd.triton_kernels.lrt_conv2d`.

Same signatures and return conventions as :mod:`sparsevd.ops.lrt_conv2d.naive`: y in x's dtype and
std in promote(x, θ), both in the layout of :func:`sparsevd.ops.conv_geometry.conv_memory_format`
(channels_last when x or θ is); ∂x in x's layout, ∂θ, ∂log σ², ∂b in the parameters' dtype.
The launchers trust their arguments (:mod:`sparsevd.functional` checked them); ``padding`` is
[p_h, p_w] or per side [top, bottom, left, right]. Imported by :mod:`sparsevd.ops.backend` on
first use of the triton backend.

Kernel choice: C_in/groups = 1 with groups > 1 (depthwise, any channel multiplier) runs the
direct kernels (elementwise per tap); everything else, general groups included, the implicit-GEMM
kernels, one grid axis per group.

Kernel launches per call (docs/design.md, "Backends"):

- ``lrt_conv2d``: 1; none for an empty output.
- ``lrt_conv2d_backward``: 2 (g_s2 = g ξ / (2 std) elementwise, then ∂x and ∂θ, ∂log σ², ∂b in
  one launch of two kinds of programs), 3 when the weight-gradient reduction over the output
  pixels is split (:func:`split_m`: too few weight tiles to fill the GPU), whose partial sums a
  third kernel adds; none for an empty batch.

Precision as :mod:`sparsevd.ops.lrt_linear.triton` (IEEE fp32 dots unless TF32 is allowed or
``SPARSEVD_FP32_PRECISION`` says otherwise; fp64 in fp64; bf16/fp16 autocast with fp32
parameters: the mean dots in x's dtype, the variance dots in bf16 for bf16 and on fp32 for fp16).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from sparsevd.triton_kernels import lrt_conv2d as KC

from ..backend import interpreter_enabled, register_impl
from ..conv_geometry import conv2d_out_shape, conv_memory_format, padding_sides
from ..triton_common import acc_dtype, autotune_enabled, dot_kind, m_key, precision, tile_configs

# ------------------------------------------------------------------------------------ autotuning
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the implicit-GEMM kernels per kind of dot
#: (sparsevd.ops.triton_common.dot_kind), from Triton 3.9's bundled ptxas for sm_90a (no GPU
#: needed; benchmarks/NOTES.md, "LRT convolution"): no register spill, shared memory under 227 KB;
#: the first of each list is what SPARSEVD_TRITON_AUTOTUNE=0 runs.
#: Forward: BLOCK_N over output channels, BLOCK_K over (ci, kh, kw). Backward: ∂x tiles are
#: [BLOCK_M input pixels, BLOCK_K input channels] reducing over BLOCK_N of (co, kh, kw); ∂θ tiles
#: [BLOCK_N, BLOCK_K] reducing over BLOCK_M output pixels.
TILES = {
    ("fwd", "tc"): [(64, 64, 32, 8, 3), (128, 64, 32, 8, 3), (32, 64, 32, 4, 2)],
    ("fwd", "tc32"): [(64, 64, 32, 8, 3), (128, 64, 16, 8, 3)],
    ("fwd", "ieee"): [(64, 64, 8, 8, 2), (32, 64, 8, 4, 2)],
    ("fwd", "fp64"): [(32, 32, 16, 4, 2), (16, 32, 32, 4, 2)],
    # Both kinds of programs in one kernel: the registers and shared memory of the larger.
    ("bwd", "tc"): [(64, 64, 32, 8, 2), (64, 64, 32, 8, 3)],
    ("bwd", "tc32"): [(64, 64, 16, 8, 2), (64, 64, 16, 8, 3)],
    ("bwd", "ieee"): [(32, 32, 8, 4, 2), (16, 32, 16, 4, 2), (64, 32, 8, 8, 2)],
    ("bwd", "fp64"): [(32, 32, 16, 4, 2), (16, 32, 32, 4, 2)],
}
#: (BLOCK_M, BLOCK_C, num_warps) of the direct (depthwise) kernels: [pixels, channels] tiles of
#: 8-16 elements per thread (32 spill: the Philox of ξ in the forward epilogue and the four
#: accumulators of the backward need ~8 registers per element).
DIRECT_TILES = {
    "fwd": [(64, 16, 4), (64, 32, 4), (128, 16, 4), (128, 32, 8)],
    "bwd": [(64, 16, 4), (128, 16, 8), (64, 32, 4), (128, 32, 8), (256, 16, 8)],
}
#: Under TRITON_INTERPRET=1 the launchers fit each tile to the problem: powers of two, at least
#: 16 where a dot needs it, at most these (BLOCK_M, BLOCK_N, BLOCK_K) / (BLOCK_M, BLOCK_C) /
#: (BLOCK_P, BLOCK_C); the backward runs its two kinds of programs as two launches there, each
#: with its own tiles. The interpreter's time grows with the number of programs and loop steps
#: (Python overhead per operation, ~0.1-0.3 ms, most of it in type checks and in its int32
#: overflow check of every integer add, sub and mul) and with the elements of each tile (numpy,
#: and Philox for ξ), so a tile much larger than the problem costs as much as one too small.
#: FIT_INTERPRETER_TILES = False runs the autotuned kernels' single config instead (tests that
#: force small tiles).
INTERPRETER_TILES = (512, 64, 512, 4, 1)
INTERPRETER_BWD_DX_TILES = (512, 256, 64)  # [pixels, input channels], reduction step over (co, taps)
INTERPRETER_BWD_DW_TILES = (512, 64, 512)  # reduction step over pixels, [output channels, k]
INTERPRETER_DIRECT_TILES = (1024, 32, 4)
INTERPRETER_GS2_TILES = (1024, 64, 4)
FIT_INTERPRETER_TILES = True
#: g_s2 kernel: [BLOCK_P pixels, BLOCK_C channels] per program, num_warps.
GS2_TILES = (64, 32, 8)
#: Reduce kernel: elements per program.
REDUCE_BLOCK = 1024


def gemm_configs(kernel: str) -> List[triton.Config]:
    """Autotuning candidates of the "fwd" or "bwd" implicit-GEMM kernel: one config when
    interpreting (used when FIT_INTERPRETER_TILES is off), else the union of :data:`TILES` for
    it, narrowed per call by the pruner."""
    return tile_configs(TILES, kernel, INTERPRETER_TILES)


def direct_configs(kernel: str) -> List[triton.Config]:
    """Autotuning candidates of the direct kernels (one when interpreting)."""
    tiles = [INTERPRETER_DIRECT_TILES] if interpreter_enabled() else DIRECT_TILES[kernel]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w) for bm, bc, w in tiles]


def _fit(size: int, cap: int, low: int = 16) -> int:
    return max(low, min(cap, triton.next_power_of_2(max(int(size), 1))))


def _fitted() -> bool:
    return interpreter_enabled() and FIT_INTERPRETER_TILES


def _tile(c: triton.Config) -> Tuple[int, ...]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def _gemm_pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        kind = dot_kind(named_args["x_ptr"].dtype, kwargs["PRECISION"], kwargs["ACC_F64"])
        want = set(TILES[(kernel, kind)])
        kept = [c for c in configs if _tile(c) in want]
        return kept if autotune_enabled() else kept[:1]
    return prune


def _direct_pruner(configs, named_args, **kwargs):
    return configs if autotune_enabled() or len(configs) <= 1 else configs[:1]


def autotuned_gemm(kernel, name: str, configs: Optional[List[triton.Config]] = None):
    """An implicit-GEMM kernel wrapped in triton.autotune over :func:`gemm_configs` (or
    ``configs``), keyed on the GEMM sizes (M rounded up to a power of two), the dot precision, the
    reduction order and the tensor dtypes."""
    if name == "fwd":
        key = ["M_KEY", "COUT_G", "K", "PRECISION", "HAS_BIAS", "TAPS_OUTER", "CLIP"]
    else:
        key = ["M_KEY", "COUT_G", "CIN_G", "K", "PRECISION", "WITH_DX", "TAPS_OUTER_X", "TAPS_OUTER_G",
               "CLIP"]
    return triton.autotune(
        configs=configs if configs is not None else gemm_configs(name), key=key,
        prune_configs_by={"early_config_prune": _gemm_pruner(name)}, cache_results=True,
    )(kernel)


def autotuned_direct(kernel, name: str, configs: Optional[List[triton.Config]] = None):
    """A direct (depthwise) kernel wrapped in triton.autotune over :func:`direct_configs`."""
    return triton.autotune(
        configs=configs if configs is not None else direct_configs(name),
        key=["M_KEY", "C_OUT", "COUT_G", "KH", "KW", "CLIP"] + (["WITH_DX"] if name == "bwd" else []),
        prune_configs_by={"early_config_prune": _direct_pruner}, cache_results=True,
    )(kernel)


_fwd_kernel = autotuned_gemm(KC.lrt_conv2d_fwd_kernel, "fwd")
_bwd_kernel = autotuned_gemm(KC.lrt_conv2d_bwd_kernel, "bwd")
_direct_fwd_kernel = autotuned_direct(KC.lrt_conv2d_direct_fwd_kernel, "fwd")
_direct_bwd_kernel = autotuned_direct(KC.lrt_conv2d_direct_bwd_kernel, "bwd")


# ----------------------------------------------------------------------------- split of ∂θ's M
#: A chunk of the weight gradient's reduction over the M output pixels is a multiple of this
#: (every BLOCK_M divides it) and at least MIN_CHUNK_M rows, so a split never costs more partial
#: sums than rows it saves.
CHUNK_ALIGN = 256
MIN_CHUNK_M = 2048
#: Programs per SM the weight-gradient programs should reach before the reduction is split.
PROGRAMS_PER_SM = 2
#: Stands in for the SM count under the interpreter (0: no split unless a test asks for one).
INTERPRETER_SMS = 0


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def split_m(m: int, weight_tiles: int, device: torch.device) -> Tuple[int, int]:
    """(n_split, chunk_m) of the weight-gradient reduction over ``m`` output pixels, given the
    number of weight tiles (each a program per split): split while the programs do not fill
    PROGRAMS_PER_SM × SMs, in chunks of at least MIN_CHUNK_M rows (multiples of CHUNK_ALIGN)."""
    want = PROGRAMS_PER_SM * _sm_count(device)
    if weight_tiles >= want or m <= MIN_CHUNK_M:
        return 1, max(m, 1)
    n = min(triton.cdiv(want, max(weight_tiles, 1)), triton.cdiv(m, MIN_CHUNK_M))
    chunk = triton.cdiv(triton.cdiv(m, n), CHUNK_ALIGN) * CHUNK_ALIGN
    return triton.cdiv(m, chunk), chunk


# -------------------------------------------------------------------------------------- helpers
_I32 = 2**31 - 1


def _check_index_range(x: torch.Tensor, m: int) -> None:
    n, c, h, w = x.shape
    if n * h * w > _I32 or m > _I32:
        raise ValueError(
            f"x: the triton backend indexes pixels in int32; N·H·W = {n * h * w} and "
            f"N·H_out·W_out = {m} must stay below 2³¹ (split the batch)"
        )


def _taps_outer(t: torch.Tensor) -> bool:
    """Whether the reduction index should run taps-outer (kh, kw, c): channels_last tensors have
    their channels contiguous."""
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1


def _direct(weight: torch.Tensor, groups: int) -> bool:
    return groups > 1 and weight.shape[1] == 1


def _conv_geometry(stride, padding, dilation):
    top, _, left, _ = padding_sides(padding)
    return (int(stride[0]), int(stride[1]), top, left, int(dilation[0]), int(dilation[1]))


def _clip_args(clip_threshold: Optional[float]):
    return (float(clip_threshold) if clip_threshold is not None else 0.0), clip_threshold is not None


# ---------------------------------------------------------------------------------- forward
def triton_lrt_conv2d(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                   clip_threshold: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """y = conv(x, θ) + b + sqrt(conv(x⊙x, σ²) + 1e-8)⊙ξ in one kernel; returns (y in x's dtype,
    std in promote(x, θ)), both (N, C_out, H_out, W_out) in the layout of
    :func:`~sparsevd.ops.conv_geometry.conv_memory_format`. An empty output launches nothing.

    ``clip_threshold``: drop the weights with log α ≥ it from the mean and the variance, in
    registers (train-time clipping)."""
    shape = conv2d_out_shape(x, weight, stride, padding, dilation)
    fmt = conv_memory_format(x, weight)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    std = torch.empty(shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device,
                      memory_format=fmt)
    nb, c_out, h_out, w_out = shape
    m = nb * h_out * w_out
    if m == 0 or c_out == 0:
        return y, std
    _check_index_range(x, m)
    sh, sw, ph, pw, dh, dw = _conv_geometry(stride, padding, dilation)
    kh, kw = weight.shape[2], weight.shape[3]
    cin_g, cout_g = weight.shape[1], c_out // groups
    clip, has_clip = _clip_args(clip_threshold)
    acc_f64 = acc_dtype(x, weight) == torch.float64
    b_arg = bias if bias is not None else weight
    if _direct(weight, groups):
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_C"]))  # noqa: E731
        kernel, meta = _direct_fwd_kernel, {}
        if _fitted():
            cap_m, cap_c, warps = INTERPRETER_DIRECT_TILES
            kernel = KC.lrt_conv2d_direct_fwd_kernel
            meta = dict(BLOCK_M=_fit(m, cap_m), BLOCK_C=_fit(c_out, cap_c, 4), num_warps=warps)
        kernel[grid](
            x, weight, log_sigma2, b_arg, seed, y, std,
            m, c_out, cout_g, x.shape[2], x.shape[3], h_out, w_out, kh, kw,
            sh, sw, ph, pw, dh, dw,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
            log_sigma2.stride(0), log_sigma2.stride(2), log_sigma2.stride(3),
            bias.stride(0) if bias is not None else 0,
            *y.stride(), clip, m_key(m),
            HAS_BIAS=bias is not None, ACC_F64=acc_f64, CLIP=has_clip, **meta,
        )
        return y, std
    k = cin_g * kh * kw
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)
    kernel, meta = _fwd_kernel, {}
    if _fitted():
        cap_m, cap_n, cap_k, warps, _ = INTERPRETER_TILES
        kernel = KC.lrt_conv2d_fwd_kernel
        meta = dict(BLOCK_M=_fit(m, cap_m), BLOCK_N=_fit(cout_g, cap_n), BLOCK_K=_fit(k, cap_k),
                    GROUP_M=8, num_warps=warps)
    kernel[grid](
        x, weight, log_sigma2, b_arg, seed, y, std,
        m, c_out, cin_g, cout_g, k, x.shape[2], x.shape[3], h_out, w_out, kh, kw,
        sh, sw, ph, pw, dh, dw,
        *x.stride(), *weight.stride(), *log_sigma2.stride(),
        bias.stride(0) if bias is not None else 0,
        *y.stride(), clip, m_key(m),
        HAS_BIAS=bias is not None, ACC_F64=acc_f64, VAR_LOWP=x.dtype == torch.bfloat16,
        TAPS_OUTER=_taps_outer(x), CLIP=has_clip, PRECISION=precision(x), **meta,
    )
    return y, std


# --------------------------------------------------------------------------------- backward
def _gs2(g: torch.Tensor, std: torch.Tensor, seed: torch.Tensor, dtype: torch.dtype,
         acc_f64: bool) -> torch.Tensor:
    """g_s2 = g ξ / (2 std) with g's strides, one launch."""
    gs2 = torch.empty_like(g, dtype=dtype)
    assert gs2.stride() == g.stride()
    nb, c, h, w = g.shape
    p = nb * h * w
    bp, bc, warps = GS2_TILES
    if interpreter_enabled():
        bp, bc, warps = INTERPRETER_GS2_TILES
        bp, bc = _fit(p, bp), _fit(c, bc, 4)
    KC.lrt_conv2d_bwd_gs2_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        g, std, seed, gs2, p, c, h * w, w, *g.stride(), *std.stride(),
        ACC_F64=acc_f64, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps,
    )
    return gs2


def triton_lrt_conv2d_backward(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups,
                   need_grad_x: bool = True, clip_threshold: Optional[float] = None):
    """(∂x, ∂θ, ∂log σ², ∂b) of the LRT convolution in two launches (three with a split weight
    gradient; see the module docstring); ξ regenerated from ``seed``. Without ``need_grad_x``
    the launch has no ∂x programs and ∂x comes back empty, (0,). An empty batch launches nothing
    (∂x zero, the parameter gradients zero)."""
    nb, c_out, h_out, w_out = std.shape
    acc = acc_dtype(x, weight)
    acc_f64 = acc == torch.float64
    gx = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
    gw = torch.empty_like(weight)
    gl = torch.empty_like(log_sigma2)
    gb = weight.new_empty((c_out,))
    m = nb * h_out * w_out
    cin_g, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    k = cin_g * kh * kw
    if m == 0 or c_out == 0 or k == 0 or x.shape[1] == 0:
        gx.zero_()
        gw.zero_()
        gl.zero_()
        gb.copy_(grad.to(acc).sum((0, 2, 3)))
        return gx, gw, gl, gb
    _check_index_range(x, m)
    fmt = conv_memory_format(x, weight)
    g = grad.contiguous(memory_format=fmt)  # dense, so that g_s2 (empty_like) shares its strides
    gs2 = _gs2(g, std, seed, torch.bfloat16 if x.dtype == torch.bfloat16 else acc, acc_f64)

    sh, sw, ph, pw, dh, dw = _conv_geometry(stride, padding, dilation)
    cout_g = c_out // groups
    clip, has_clip = _clip_args(clip_threshold)
    h, w = x.shape[2], x.shape[3]
    direct = _direct(weight, groups)
    gx_strides = gx.stride() if need_grad_x else (0, 0, 0, 0)
    if direct:
        tiles_w = triton.cdiv(c_out, 64) * kh * kw
    else:
        tiles_w = groups * triton.cdiv(cout_g, 64) * triton.cdiv(k, 64)
    n_split, chunk = split_m(m, tiles_w, x.device)
    if n_split > 1:
        pw_ = torch.empty((n_split, *weight.shape), dtype=acc, device=x.device)
        pl_ = torch.empty_like(pw_)
        pb_ = torch.empty((n_split, c_out), dtype=acc, device=x.device)
    else:
        pw_, pl_, pb_ = gw.unsqueeze(0), gl.unsqueeze(0), gb.unsqueeze(0)
    if direct:
        n_dx = lambda meta: triton.cdiv(nb * h * w, meta["BLOCK_M"]) * triton.cdiv(x.shape[1], meta["BLOCK_C"])  # noqa: E731
        n_dw = lambda meta: n_split * kh * kw * triton.cdiv(c_out, meta["BLOCK_C"])  # noqa: E731
        args = (
            g, gs2, x, weight, log_sigma2, gx, pw_, pl_, pb_,
            nb, m, x.shape[1], c_out, cout_g, h, w, h_out, w_out, kh, kw,
            sh, sw, ph, pw, dh, dw,
            *g.stride(), *x.stride(), *gx_strides,
            weight.stride(0), weight.stride(2), weight.stride(3),
            log_sigma2.stride(0), log_sigma2.stride(2), log_sigma2.stride(3),
            pw_.stride(0), pw_.stride(1), pw_.stride(3), pw_.stride(4),
            pl_.stride(0), pl_.stride(1), pl_.stride(3), pl_.stride(4),
            *pb_.stride(), chunk, n_split, clip, m_key(m),
        )
        flags = dict(ACC_F64=acc_f64, CLIP=has_clip)
        if _fitted():
            # The interpreter: the two kinds of programs as two launches of the same kernel, each
            # with tiles fitted to its own problem (a launch of only the first n_dx programs runs
            # no weight-gradient program; WITH_DX=False runs only those).
            cap_m, cap_c, warps = INTERPRETER_DIRECT_TILES
            kernel = KC.lrt_conv2d_direct_bwd_kernel
            if need_grad_x:
                meta = dict(BLOCK_M=_fit(nb * h * w, cap_m), BLOCK_C=_fit(x.shape[1], cap_c, 4))
                kernel[(n_dx(meta),)](*args, WITH_DX=True, **flags, **meta, num_warps=warps)
            meta = dict(BLOCK_M=_fit(min(m, chunk), cap_m), BLOCK_C=_fit(c_out, cap_c, 4))
            kernel[(n_dw(meta),)](*args, WITH_DX=False, **flags, **meta, num_warps=warps)
        else:
            grid = lambda meta: (need_grad_x * n_dx(meta) + n_dw(meta),)  # noqa: E731
            _direct_bwd_kernel[grid](*args, WITH_DX=need_grad_x, **flags)
    else:
        hp, wp = triton.cdiv(h, sh), triton.cdiv(w, sw)
        n_dx = lambda meta: (  # noqa: E731
            sh * sw * triton.cdiv(nb * hp * wp, meta["BLOCK_M"]) * triton.cdiv(cin_g, meta["BLOCK_K"]))
        n_dw = lambda meta: (  # noqa: E731
            n_split * triton.cdiv(cout_g, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]))
        args = (
            g, gs2, x, weight, log_sigma2, gx, pw_, pl_, pb_,
            nb, m, cin_g, cout_g, k, h, w, h_out, w_out, kh, kw,
            sh, sw, ph, pw, dh, dw,
            *g.stride(), *x.stride(), *gx_strides, *weight.stride(), *log_sigma2.stride(),
            *pw_.stride(), *pl_.stride(), *pb_.stride(), chunk, n_split, clip, m_key(m),
        )
        flags = dict(ACC_F64=acc_f64, TAPS_OUTER_X=_taps_outer(x), TAPS_OUTER_G=_taps_outer(g),
                     CLIP=has_clip, PRECISION=precision(x))
        if _fitted():  # the interpreter: two launches with fitted tiles, as for the direct kernel
            kernel = KC.lrt_conv2d_bwd_kernel
            if need_grad_x:
                cap_m, cap_n, cap_k = INTERPRETER_BWD_DX_TILES
                meta = dict(BLOCK_M=_fit(nb * hp * wp, cap_m), BLOCK_N=_fit(cout_g * kh * kw, cap_n),
                            BLOCK_K=_fit(cin_g, cap_k), GROUP_M=8)
                kernel[(n_dx(meta), groups)](*args, WITH_DX=True, **flags, **meta, num_warps=4)
            cap_m, cap_n, cap_k = INTERPRETER_BWD_DW_TILES
            meta = dict(BLOCK_M=_fit(min(m, chunk), cap_m), BLOCK_N=_fit(cout_g, cap_n),
                        BLOCK_K=_fit(k, cap_k), GROUP_M=8)
            kernel[(n_dw(meta), groups)](*args, WITH_DX=False, **flags, **meta, num_warps=4)
        else:
            grid = lambda meta: (need_grad_x * n_dx(meta) + n_dw(meta), groups)  # noqa: E731
            _bwd_kernel[grid](*args, WITH_DX=need_grad_x, **flags)
    if n_split > 1:
        numel_w = weight.numel()
        KC.lrt_conv2d_bwd_reduce_kernel[(triton.cdiv(numel_w, REDUCE_BLOCK) + triton.cdiv(c_out, REDUCE_BLOCK),)](
            pw_, pl_, pb_, gw, gl, gb, numel_w, c_out, n_split, cin_g, kh, kw,
            *gw.stride(), *gl.stride(), gb.stride(0),
            ACC_F64=acc_f64, BLOCK=REDUCE_BLOCK, num_warps=4,
        )
    return gx, gw, gl, gb


register_impl("lrt_conv2d", "triton", triton_lrt_conv2d)
register_impl("lrt_conv2d_backward", "triton", triton_lrt_conv2d_backward)
