"""The LRT convolution in plain PyTorch: the math of the family, the ``reference`` backend and the
tests' oracle.

:func:`naive_lrt_conv2d` has the signature and return convention of the op
``sparsevd::lrt_conv2d`` (:mod:`sparsevd.ops.lrt_conv2d.op`) and is differentiable by autograd,
which makes it the oracle of every backend's gradients; :func:`naive_lrt_conv2d_backward` is the
explicit backward that the reference backend runs for ``sparsevd::lrt_conv2d_backward`` (the
linear layer's, docs/design.md "Backward", with transposed convolutions). Both work in any
floating dtype and draw ξ with :func:`sparsevd.ops.noise.lrt_noise` at the row-major index of the
output element; plain torch under autocast, as the linear layer's naive math.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import weights as W
from ..conv_geometry import conv2d, conv_memory_format, crop_grad_x, symmetric_padding
from ..lrt_common import in_parameter_dtypes
from ..noise import lrt_noise


def naive_lrt_conv2d(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                     seed: Optional[Tensor], stride: List[int], padding: List[int],
                     dilation: List[int], groups: int, clip_threshold: Optional[float] = None, *,
                     noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """μ = conv(x, θ) + b, s² = conv(x ⊙ x, σ²), std = sqrt(s² + 1e-8), y = μ + std ⊙ ξ, per output
    pixel (paper, sec. 4.2, as in the authors' code), computed in promote(x, θ).

    Args:
        x: (N, C_in, H, W). weight, log_sigma2: (C_out, C_in / groups, kH, kW). bias: (C_out,) or
            None. seed: (1,) int64.
        stride, dilation: [s_h, s_w], [d_h, d_w]. padding: [p_h, p_w] or per side
            [top, bottom, left, right] (:mod:`sparsevd.ops.conv_geometry`). groups: as in F.conv2d.
        clip_threshold, noise: as in :func:`sparsevd.ops.lrt_linear.naive.naive_lrt_linear`
            (noise of y's shape).

    Returns:
        (y in x's dtype, std in promote(x, θ)), both (N, C_out, H_out, W_out), laid out by
        :func:`sparsevd.ops.conv_geometry.conv_memory_format`.
    """
    dt = torch.promote_types(x.dtype, weight.dtype)
    xc = x.to(dt)
    w, sigma2 = W.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    mu = conv2d(xc, w, None if bias is None else bias.to(dt), stride, padding, dilation, groups)
    s2 = conv2d(xc * xc, sigma2, None, stride, padding, dilation, groups)
    std = torch.sqrt(s2 + W.EPS_VAR)
    xi = lrt_noise(seed, mu.shape, device=mu.device) if noise is None else noise
    y = mu + std * xi.to(mu.dtype)
    fmt = conv_memory_format(x, weight)  # the layout the op promises (its fake impl)
    return y.to(x.dtype).contiguous(memory_format=fmt), std.contiguous(memory_format=fmt)


def naive_lrt_conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, log_sigma2: Tensor,
                              std: Tensor, seed: Tensor, stride: List[int], padding: List[int],
                              dilation: List[int], groups: int, need_grad_x: bool = True,
                              clip_threshold: Optional[float] = None
                              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂θ, ∂log σ², ∂b) of :func:`naive_lrt_conv2d`, computed in std's dtype with
    ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``: ∂x = convᵀ(g, θ) + 2x ⊙ convᵀ(g_s2, σ²),
    ∂θ = Σ g ⋆ x, ∂log σ² = σ² ⊙ Σ g_s2 ⋆ (x ⊙ x), ∂b = Σ_{n,h,w} g with g_s2 = g ⊙ ξ / (2 std);
    per-side padding runs on the padded input, whose gradient is cropped to x. ∂x is an empty
    (0,) tensor without ``need_grad_x``; ``clip_threshold`` as in the linear layer's backward."""
    dt = std.dtype
    g = grad.to(dt)
    xc, pad, sides = symmetric_padding(x.to(dt), padding)
    w, sigma2 = W.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    xi = lrt_noise(seed, std.shape, device=std.device).to(std.dtype)
    g_s2 = g * xi / (2.0 * std)
    args = (stride, pad, dilation, groups)
    grad_w = W.clip_grad_weight(torch.nn.grad.conv2d_weight(xc, w.shape, g, *args), weight,
                                log_sigma2, clip_threshold)
    grad_ls2 = sigma2 * torch.nn.grad.conv2d_weight(xc * xc, w.shape, g_s2, *args)
    grad_b = g.sum((0, 2, 3))
    if need_grad_x:
        grad_x = crop_grad_x(torch.nn.grad.conv2d_input(xc.shape, w, g, *args)
                             + 2.0 * xc * torch.nn.grad.conv2d_input(xc.shape, sigma2, g_s2, *args),
                             x, sides)
    else:
        grad_x = x.new_empty((0,))
    return in_parameter_dtypes(grad_x, grad_w, grad_ls2, grad_b, weight, log_sigma2)
