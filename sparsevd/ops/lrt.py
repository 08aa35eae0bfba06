"""Custom ops ``sparsevd::lrt_linear`` and ``sparsevd::lrt_conv2d`` with their backward ops.

Each forward op returns ``(y, std)``: the LRT output and std = sqrt(s² + 1e-8), which the backward
op uses together with ξ regenerated from the seed (nothing else of size (M, N) is saved). The ops
dispatch at run time to the backend chosen by :func:`sparsevd.ops.backend.get_impl`.

When the layer's input needs no gradient (a network's first layer), autograd calls the backward
ops with ``need_grad_x=False``: the backends skip ∂x (the native and Triton kernels do not
compute it at all) and return an empty tensor in its place.

:func:`run_lrt_linear` and :func:`run_lrt_conv2d` (what :mod:`sparsevd.functional` calls) return y
with autograd: in eager mode on the native backend through its C++ autograd ops (the same kernels,
bit-identical results, no Python between forward and backward: ~0.1 ms less per layer and step),
else through the custom ops (torch.compile, dispatch modes, functorch, the other backends).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._args import padding_sides
from ..reference import conv_out_size
from .backend import eager_impl, get_impl


# --------------------------------------------------------------------------------------- linear
@torch.library.custom_op("sparsevd::lrt_linear", mutates_args=())
def lrt_linear(
    x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor], seed: Tensor,
    clip_threshold: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """LRT linear forward: x (*, K), weight and log_sigma2 (N, K), bias (N,) or None, seed (1,)
    int64 → (y (*, N) in x's dtype, std (*, N) in the compute dtype, fp32 or wider).
    ``clip_threshold``: train-time clipping, the weights with log α ≥ it enter neither the mean
    nor the variance (:func:`sparsevd.reference.clip_parameters`); None: no clipping."""
    _, impl = get_impl("lrt_linear", x.device)
    return impl(x, weight, log_sigma2, bias, seed, clip_threshold)


@lrt_linear.register_fake
def _(x, weight, log_sigma2, bias, seed, clip_threshold=None):
    shape = (*x.shape[:-1], weight.shape[0])
    std_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(shape, dtype=x.dtype), x.new_empty(shape, dtype=std_dtype)


@torch.library.custom_op("sparsevd::lrt_linear_backward", mutates_args=())
def lrt_linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, log_sigma2: Tensor, std: Tensor, seed: Tensor,
    need_grad_x: bool = True, clip_threshold: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (∂x, ∂θ, ∂log σ², ∂b) of the LRT linear layer (docs/design.md, "Backward"); with
    ``need_grad_x`` False (x needs no gradient, e.g. a network's first layer) ∂x is not computed
    and comes back as an empty (0,) tensor. With ``clip_threshold`` (the forward's), ∂θ and
    ∂log σ² are zero for the clipped weights."""
    _, impl = get_impl("lrt_linear_backward", grad.device)
    return impl(grad, x, weight, log_sigma2, std, seed, need_grad_x, clip_threshold)


@lrt_linear_backward.register_fake
def _(grad, x, weight, log_sigma2, std, seed, need_grad_x=True, clip_threshold=None):
    return (
        torch.empty_like(x) if need_grad_x else x.new_empty((0,)),
        torch.empty_like(weight),
        torch.empty_like(log_sigma2),
        weight.new_empty((weight.shape[0],)),
    )


def _lrt_linear_setup(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed, clip_threshold = inputs
    ctx.mark_non_differentiable(output[1])  # std: saved for backward, not differentiable
    ctx.set_materialize_grads(False)  # no zero tensor of y's size for std's (absent) gradient
    ctx.save_for_backward(x, weight, log_sigma2, output[1], seed)
    ctx.has_bias = bias is not None
    ctx.clip_threshold = clip_threshold


def _lrt_linear_bwd(ctx, grad_y, grad_std):
    if grad_y is None:
        return None, None, None, None, None, None
    x, weight, log_sigma2, std, seed = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    gx, gw, gls2, gb = lrt_linear_backward(grad_y.contiguous(), x, weight, log_sigma2, std, seed,
                                           need_x, ctx.clip_threshold)
    return (gx if need_x else None), gw, gls2, (gb if ctx.has_bias else None), None, None


lrt_linear.register_autograd(_lrt_linear_bwd, setup_context=_lrt_linear_setup)


def run_lrt_linear(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                   seed: Tensor, clip_threshold: Optional[float] = None) -> Tensor:
    """y of :func:`lrt_linear` with autograd, through the backend's eager autograd op when
    :func:`sparsevd.ops.backend.eager_impl` allows it, else through the custom op."""
    fast = eager_impl("lrt_linear", x.device, (x, weight, log_sigma2, bias, seed))
    if fast is not None:
        return fast(x, weight, log_sigma2, bias, seed, clip_threshold)
    return lrt_linear(x, weight, log_sigma2, bias, seed, clip_threshold)[0]


# --------------------------------------------------------------------------------------- conv2d
def conv_memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of the conv ops' outputs y and std: channels_last when x or θ is laid
    out channels_last (and not also contiguous), as cuDNN and oneDNN convolutions choose; else
    contiguous. ∂x comes back in x's layout (torch.empty_like)."""
    cl = torch.channels_last
    for t in (x, weight):
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=cl):
            return cl
    return torch.contiguous_format


def conv2d_out_shape(x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                     dilation: List[int]) -> Tuple[int, int, int, int]:
    """(N, C_out, H_out, W_out) of a conv op; ``padding`` is [p_h, p_w] or per side
    [top, bottom, left, right]."""
    t, b, l, r = padding_sides(padding)
    h = conv_out_size(x.shape[2], weight.shape[2], stride[0], t, dilation[0], b)
    w = conv_out_size(x.shape[3], weight.shape[3], stride[1], l, dilation[1], r)
    return x.shape[0], weight.shape[0], h, w


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
    """LRT conv2d forward: x (N, C_in, H, W) → (y (N, C_out, H_out, W_out), std, same shape).

    ``padding`` is [p_h, p_w] (symmetric) or [top, bottom, left, right] (what padding="same"
    resolves to for even kernels); y and std are laid out by :func:`conv_memory_format`;
    ``clip_threshold`` as in :func:`lrt_linear`."""
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
    """Gradients (∂x, ∂θ, ∂log σ², ∂b) of the LRT conv2d layer; with ``need_grad_x`` False (x
    needs no gradient, e.g. a network's first layer) ∂x is not computed and comes back as an
    empty (0,) tensor; ``clip_threshold`` as in :func:`lrt_linear_backward`."""
    _, impl = get_impl("lrt_conv2d_backward", grad.device)
    return impl(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups,
                need_grad_x, clip_threshold)


@lrt_conv2d_backward.register_fake
def _(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups, need_grad_x=True,
      clip_threshold=None):
    return (
        torch.empty_like(x) if need_grad_x else x.new_empty((0,)),
        torch.empty_like(weight),
        torch.empty_like(log_sigma2),
        weight.new_empty((weight.shape[0],)),
    )


def _lrt_conv2d_setup(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip_threshold = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, log_sigma2, output[1], seed)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.clip_threshold = clip_threshold


def _lrt_conv2d_bwd(ctx, grad_y, grad_std):
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


lrt_conv2d.register_autograd(_lrt_conv2d_bwd, setup_context=_lrt_conv2d_setup)


def run_lrt_conv2d(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                   seed: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                   groups: int, clip_threshold: Optional[float] = None) -> Tensor:
    """y of :func:`lrt_conv2d` with autograd, as :func:`run_lrt_linear` chooses the path."""
    fast = eager_impl("lrt_conv2d", x.device, (x, weight, log_sigma2, bias, seed))
    if fast is not None:
        return fast(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                    clip_threshold)
    return lrt_conv2d(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                      clip_threshold)[0]
