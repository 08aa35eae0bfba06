"""The ``native`` backend of ``lrt_linear``: the compiled CPU kernels of
csrc/cpu/lrt_linear_cpu.cpp (``torch.ops.sparsevd.native_lrt_linear[_backward]``) and their eager
C++ autograd (csrc/cpu/autograd_cpu.cpp, ``native_lrt_linear_autograd``).

The products run through ATen's GEMM, every elementwise step (x², σ², std, ξ, the noise term,
g_s2, the 2x⊙(g_s2σ²) and σ²⊙(·) terms, ∂b) in fused vectorized passes with ξ generated inline
from the seed; σ² and, under train-time clipping, θ ⊙ m, the occupancy and the compaction or
sparse products come from the weight pass that lrt_linear and lrt_conv2d share
(csrc/cpu/lrt_common_cpu.cpp; benchmarks/NOTES.md, "Native CPU backend" and "native train-time
clip and compaction"). CPU tensors only; importing this module raises ImportError when the
compiled library or these ops are missing, which makes the backend unavailable for the family.

Autocast: a custom op's implementation still sees the caller's autocast state; the C++ ops switch
it off for their own ATen calls (products in fp32 from bf16 activations, as the naive math's
``no_autocast`` does in Python), so no autocast context is entered here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import library
from ..backend import register_impl

library.require_ops("native_lrt_linear", "native_lrt_linear_backward", "native_lrt_linear_autograd")
_ops = torch.ops.sparsevd


def native_lrt_linear(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                      seed: Tensor, clip_threshold: Optional[float] = None):
    """(y, std) as :func:`sparsevd.ops.lrt_linear.naive.naive_lrt_linear`."""
    return _ops.native_lrt_linear(x, weight, log_sigma2, bias, seed, clip_threshold)


def native_lrt_linear_backward(grad, x, weight, log_sigma2, std, seed, need_grad_x=True,
                               clip_threshold=None):
    """(∂x, ∂θ, ∂log σ², ∂b) as :func:`sparsevd.ops.lrt_linear.naive.naive_lrt_linear_backward`."""
    gx, gw, gls2, gb = _ops.native_lrt_linear_backward(grad, x, weight, log_sigma2, std, seed,
                                                      need_grad_x, clip_threshold)
    return (gx if need_grad_x else x.new_empty((0,))), gw, gls2, gb


def native_lrt_linear_eager(x, weight, log_sigma2, bias, seed, clip_threshold=None) -> Tensor:
    """y with autograd: forward and backward in C++, no Python in between."""
    return _ops.native_lrt_linear_autograd(x, weight, log_sigma2, bias, seed, clip_threshold)


register_impl("lrt_linear", "native", native_lrt_linear)
register_impl("lrt_linear_backward", "native", native_lrt_linear_backward)
register_impl("lrt_linear:eager", "native", native_lrt_linear_eager)
