"""The ``native`` backend of ``lrt_conv2d``: the compiled CPU kernels of
csrc/cpu/lrt_conv2d_cpu.cpp (``torch.ops.sparsevd.native_lrt_conv2d[_backward]``) and their eager
C++ autograd (csrc/cpu/autograd_cpu.cpp, ``native_lrt_conv2d_autograd``).

The convolutions run through oneDNN (at::convolution, at::convolution_backward), every
elementwise step in the fused passes and the weight pass shared with lrt_linear
(csrc/cpu/lrt_common_cpu.cpp), as :mod:`sparsevd.ops.lrt_linear.native` describes. The kernels
take symmetric padding: per-side padding (padding="same" with an even kernel) pads x explicitly
and crops ∂x (:func:`sparsevd.ops.conv_geometry.symmetric_padding`, ``crop_grad_x``; the eager
path lets F.pad's own backward crop). CPU tensors only; importing this module raises ImportError
when the compiled library or these ops are missing.
"""
from __future__ import annotations

import torch

from .. import library
from ..backend import register_impl
from ..conv_geometry import crop_grad_x, symmetric_padding

library.require_ops("native_lrt_conv2d", "native_lrt_conv2d_backward", "native_lrt_conv2d_autograd")
_ops = torch.ops.sparsevd


def native_lrt_conv2d(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                      clip_threshold=None):
    """(y, std) as :func:`sparsevd.ops.lrt_conv2d.naive.naive_lrt_conv2d`."""
    xp, pad, _ = symmetric_padding(x, padding)
    return _ops.native_lrt_conv2d(xp, weight, log_sigma2, bias, seed, stride, pad, dilation, groups,
                                  clip_threshold)


def native_lrt_conv2d_backward(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation,
                               groups, need_grad_x=True, clip_threshold=None):
    """(∂x, ∂θ, ∂log σ², ∂b) as :func:`sparsevd.ops.lrt_conv2d.naive.naive_lrt_conv2d_backward`."""
    xp, pad, sides = symmetric_padding(x, padding)
    gx, gw, gls2, gb = _ops.native_lrt_conv2d_backward(
        grad, xp, weight, log_sigma2, std, seed, stride, pad, dilation, groups, need_grad_x,
        clip_threshold,
    )
    if not need_grad_x:
        return x.new_empty((0,)), gw, gls2, gb
    if sides is not None:  # the gradient of the padded input, cropped to x
        gx = crop_grad_x(gx, x, sides)
    return gx, gw, gls2, gb


def native_lrt_conv2d_eager(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                            clip_threshold=None):
    """y with autograd: forward and backward in C++ (F.pad's own backward crops ∂x)."""
    xp, pad, _ = symmetric_padding(x, padding)
    return _ops.native_lrt_conv2d_autograd(xp, weight, log_sigma2, bias, seed, stride, pad, dilation,
                                           groups, clip_threshold)


register_impl("lrt_conv2d", "native", native_lrt_conv2d)
register_impl("lrt_conv2d_backward", "native", native_lrt_conv2d_backward)
register_impl("lrt_conv2d:eager", "native", native_lrt_conv2d_eager)
