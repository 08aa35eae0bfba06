"""The ``native`` backend: the compiled CPU kernels of ``csrc/cpu`` (``sparsevd._C``).

Each implementation has the signature and return convention of its counterpart in
:mod:`sparsevd.ops.reference_impl` and calls one ``torch.ops.sparsevd.native_*`` op: the products
through ATen's GEMM / oneDNN convolutions, every elementwise step (x², σ², std, ξ, the noise term,
g_s2, the 2x⊙(g_s2σ²) and σ²⊙(·) terms, ∂b) in fused vectorized passes with ξ generated inline
from the seed (csrc/cpu/lrt_cpu.cpp states the plan; benchmarks/NOTES.md, "Native CPU backend",
the measurements). CPU tensors only; importing this module raises ImportError when the compiled
library or its native ops are missing, which makes the backend unavailable (``auto`` then falls
back to the reference).

The KL op also reports, per layer and in the same pass, whether any θ or log σ² is NaN or ±inf:
the (num_layers,) bool tensor of the most recent call is :data:`last_nonfinite` (read it with
:func:`nonfinite_layers`), so a training loop can check for divergence without an extra pass or
a host sync per layer.

Train-time clipping (``clip_threshold``) runs inside the C++ ops: the σ² pass that forms
σ² = exp(log σ²) also forms θ ⊙ m, σ² ⊙ m (m = :func:`sparsevd.reference.clip_mask`) and the
occupancy of θ's rows and columns; when enough whole rows / columns are dead the products run on
the occupied block only ("compaction"); the backward multiplies ∂θ by m in its epilogue
(csrc/cpu/lrt_cpu.cpp, "σ² pass"; measurements in benchmarks/NOTES.md, "native train-time clip
and compaction").

Autocast: a custom op's implementation still sees the caller's autocast state; the C++ ops switch
it off for their own ATen calls (products in fp32 from bf16 activations, as the reference's
``_no_autocast`` does in Python), so no autocast context is entered here.

Extras for tests and benchmarks (``torch.ops.sparsevd``): ``native_isa()`` /
``native_set_isa("avx512" | "avx2" | "scalar" | "auto")`` (which kernels run, also settable with
``SPARSEVD_CPU_ISA``), ``native_set_products("auto" | "serial" | "concurrent")`` (also
``SPARSEVD_NATIVE_PRODUCTS``), ``native_sigma2_cache(enabled)`` and
``native_sigma2_cache_stats()`` (hits, misses, entries of the σ² cache),
``native_set_compact("auto" | "never" | "always" | "sparse")`` (what the clipped products run on:
the measured rule, the full weights, the occupied rows and columns whenever some are dead, or the
CSR of the kept weights (linear layers; conv2d then compacts); also ``SPARSEVD_NATIVE_COMPACT``) and ``native_clip_occupancy(weight, log_sigma2, clip_threshold)``
(the σ² pass's per-row and per-column counts of occupied weights, int64).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .._args import padding_sides
from . import library
from .backend import register_impl

_NATIVE_OPS = (
    "native_lrt_linear",
    "native_lrt_linear_backward",
    "native_lrt_conv2d",
    "native_lrt_conv2d_backward",
    "native_kl_sparse_vd",
    "native_clip_occupancy",
    "native_lrt_linear_autograd",
    "native_lrt_conv2d_autograd",
    "native_kl_sparse_vd_autograd",
)
if not library.available():  # registers torch.ops.sparsevd.native_* when built
    raise ImportError(f"sparsevd._C is not available: {library.unavailable_reason()}")
_missing = [name for name in _NATIVE_OPS if not library.has_op(name)]
if _missing:
    raise ImportError(
        f"sparsevd._C has no {', '.join(_missing)}: rebuild the extension "
        "(pip install --no-build-isolation -e .)"
    )

_ops = torch.ops.sparsevd

#: (num_layers,) bool tensor of the most recent ``kl_sparse_vd`` call on this backend: True where
#: that layer's θ or log σ² contains a NaN or ±inf. None before the first call.
last_nonfinite: Optional[torch.Tensor] = None


def nonfinite_layers() -> Optional[torch.Tensor]:
    """The per-layer non-finite flags of the most recent native KL call (see :data:`last_nonfinite`)."""
    return last_nonfinite


def lrt_linear_fwd(x, weight, log_sigma2, bias, seed, clip_threshold=None):
    return _ops.native_lrt_linear(x, weight, log_sigma2, bias, seed, clip_threshold)


def lrt_linear_bwd(grad, x, weight, log_sigma2, std, seed, need_grad_x=True, clip_threshold=None):
    gx, gw, gls2, gb = _ops.native_lrt_linear_backward(grad, x, weight, log_sigma2, std, seed,
                                                      need_grad_x, clip_threshold)
    return (gx if need_grad_x else x.new_empty((0,))), gw, gls2, gb


def _symmetric(x, padding):
    """(x, [p_h, p_w], sides): the kernels take symmetric padding; asymmetric per-side padding
    [top, bottom, left, right] (padding="same" with an even kernel) pads x explicitly instead."""
    t, b, l, r = padding_sides(padding)
    if (t, l) == (b, r):
        return x, [t, l], None
    return torch.nn.functional.pad(x, (l, r, t, b)), [0, 0], (t, b, l, r)


def lrt_conv2d_fwd(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                   clip_threshold=None):
    xp, pad, _ = _symmetric(x, padding)
    return _ops.native_lrt_conv2d(xp, weight, log_sigma2, bias, seed, stride, pad, dilation, groups,
                                  clip_threshold)


def lrt_conv2d_bwd(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups,
                   need_grad_x=True, clip_threshold=None):
    xp, pad, sides = _symmetric(x, padding)
    gx, gw, gls2, gb = _ops.native_lrt_conv2d_backward(
        grad, xp, weight, log_sigma2, std, seed, stride, pad, dilation, groups, need_grad_x,
        clip_threshold,
    )
    if not need_grad_x:
        return x.new_empty((0,)), gw, gls2, gb
    if sides is not None:  # the gradient of the padded input, cropped to x
        t, _, l, _ = sides
        gx = torch.empty_like(x).copy_(gx[:, :, t:t + x.shape[2], l:l + x.shape[3]])
    return gx, gw, gls2, gb


def kl_fwd(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool):
    global last_nonfinite
    kl, grads_w, grads_ls2, flags = _ops.native_kl_sparse_vd(weights, log_sigma2s, with_grad)
    last_nonfinite = flags
    return kl, list(grads_w), list(grads_ls2)


# Eager autograd (csrc/cpu/autograd_cpu.cpp): forward and backward in C++, no Python in between.
def lrt_linear_eager(x, weight, log_sigma2, bias, seed, clip_threshold=None):
    return _ops.native_lrt_linear_autograd(x, weight, log_sigma2, bias, seed, clip_threshold)


def lrt_conv2d_eager(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                     clip_threshold=None):
    xp, pad, _ = _symmetric(x, padding)  # F.pad's own backward crops ∂x back to x
    return _ops.native_lrt_conv2d_autograd(xp, weight, log_sigma2, bias, seed, stride, pad, dilation,
                                           groups, clip_threshold)


def kl_eager(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor]):
    """The KL (0-dim) with autograd; the gradients are computed in the same pass when grad mode is
    on and some parameter requires grad."""
    global last_nonfinite
    kl, last_nonfinite = _ops.native_kl_sparse_vd_autograd(weights, log_sigma2s)
    return kl


register_impl("lrt_linear", "native", lrt_linear_fwd)
register_impl("lrt_linear_backward", "native", lrt_linear_bwd)
register_impl("lrt_conv2d", "native", lrt_conv2d_fwd)
register_impl("lrt_conv2d_backward", "native", lrt_conv2d_bwd)
register_impl("kl_sparse_vd", "native", kl_fwd)
register_impl("lrt_linear:eager", "native", lrt_linear_eager)
register_impl("lrt_conv2d:eager", "native", lrt_conv2d_eager)
register_impl("kl_sparse_vd:eager", "native", kl_eager)
