"""The custom ops ``sparsevd::lrt_conv2d`` and ``sparsevd::lrt_conv2d_backward``: schema (from the
signatures below), fake (meta) implementations, autograd, and :func:`run_lrt_conv2d`, the path
:mod:`sparsevd.functional` takes (1-D convolutions too: ``lrt_conv1d`` runs these ops over
(N, C, 1, L)).

As the linear family's ops (:mod:`sparsevd.ops.lrt_linear.op`): the forward returns ``(y, std)``,
the backward regenerates ξ from the seed and skips ∂x with ``need_grad_x=False``; both dispatch to
the backend :func:`sparsevd.ops.backend.get_impl` chooses (``reference``: :mod:`.naive`,
``native``: :mod:`.native`, ``triton``: :mod:`.triton`). ``padding`` is [p_h, p_w] or per side
[top, bottom, left, right] (what padding="same" resolves to for even kernels;
:mod:`sparsevd.ops.conv_geometry`); y and std are laid out channels_last when x or θ is
(:func:`sparsevd.ops.conv_geometry.conv_memory_format`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backend import eager_impl, get_impl, no_autocast, register_family, register_impl
from ..conv_geometry import conv2d_out_shape, conv_memory_format
from ..lrt_common import backward_outputs_like
from .naive import naive_lrt_conv2d, naive_lrt_conv2d_backward

register_family("lrt_conv2d", ("lrt_conv2d", "lrt_conv2d_backward"))
register_impl("lrt_conv2d", "reference", no_autocast(naive_lrt_conv2d))
register_impl("lrt_conv2d_backward", "reference", no_autocast(naive_lrt_conv2d_backward))


@torch.library.custom_op("sparsevd::lrt_conv2d", mutates_args=())
def lrt_conv2d(
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    bias: Optional[Tensor],
    seed: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    clip_threshold: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """LRT conv2d forward: x (N, C_in, H, W), weight and log_sigma2 (C_out, C_in / groups, kH, kW),
    bias (C_out,) or None, seed (1,) int64 → (y (N, C_out, H_out, W_out) in x's dtype, std of the
    same shape in promote(x, θ)).

    ``padding`` is [p_h, p_w] (symmetric) or [top, bottom, left, right]; y and std are laid out by
    :func:`sparsevd.ops.conv_geometry.conv_memory_format`; ``clip_threshold`` as in
    :func:`sparsevd.ops.lrt_linear.lrt_linear`."""
    _, impl = get_impl("lrt_conv2d", x.device)
    return impl(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                clip_threshold)


@lrt_conv2d.register_fake
def _(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip_threshold=None):
    shape = conv2d_out_shape(x, weight, stride, padding, dilation)
    std_dtype = torch.promote_types(x.dtype, weight.dtype)
    fmt = conv_memory_format(x, weight)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(shape, dtype=std_dtype, device=x.device, memory_format=fmt))


@torch.library.custom_op("sparsevd::lrt_conv2d_backward", mutates_args=())
def lrt_conv2d_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    std: Tensor,
    seed: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    need_grad_x: bool = True,
    clip_threshold: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (∂x in x's layout, ∂θ, ∂log σ² in θ's shape, ∂b (C_out,)) of the LRT conv2d
    layer; grad and std (N, C_out, H_out, W_out). With ``need_grad_x`` False (x needs no gradient,
    e.g. a network's first layer) ∂x is not computed and comes back as an empty (0,) tensor;
    ``clip_threshold`` as in :func:`sparsevd.ops.lrt_linear.lrt_linear_backward`."""
    _, impl = get_impl("lrt_conv2d_backward", grad.device)
    return impl(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups,
                need_grad_x, clip_threshold)


@lrt_conv2d_backward.register_fake
def _(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups, need_grad_x=True,
      clip_threshold=None):
    return backward_outputs_like(x, weight, log_sigma2, need_grad_x)


def _setup_context(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip_threshold = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, log_sigma2, output[1], seed)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.clip_threshold = clip_threshold


def _backward(ctx, grad_y, grad_std):
    if grad_y is None:
        return (None,) * 10
    x, weight, log_sigma2, std, seed = ctx.saved_tensors
    fmt = conv_memory_format(x, weight)  # the layout of y and std
    need_x = ctx.needs_input_grad[0]
    gx, gw, gls2, gb = lrt_conv2d_backward(
        grad_y.contiguous(memory_format=fmt), x, weight, log_sigma2, std, seed, *ctx.conv_args,
        need_x, ctx.clip_threshold,
    )
    return ((gx if need_x else None), gw, gls2, (gb if ctx.has_bias else None),
            None, None, None, None, None, None)


lrt_conv2d.register_autograd(_backward, setup_context=_setup_context)


def run_lrt_conv2d(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                   seed: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                   groups: int, clip_threshold: Optional[float] = None) -> Tensor:
    """y of :func:`lrt_conv2d` with autograd, as :func:`sparsevd.ops.lrt_linear.run_lrt_linear`
    chooses the path (the native backend's eager C++ autograd op, or the custom op)."""
    fast = eager_impl("lrt_conv2d", x.device, (x, weight, log_sigma2, bias, seed))
    if fast is not None:
        return fast(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                    clip_threshold)
    return lrt_conv2d(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                      clip_threshold)[0]
