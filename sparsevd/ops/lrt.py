"""Custom ops ``sparsevd::lrt_linear`` and ``sparsevd::lrt_conv2d`` with their backward ops.

Each forward op returns ``(y, std)``: the LRT output and std = sqrt(s² + 1e-8), which the backward
op uses together with ξ regenerated from the seed (nothing else of size (M, N) is saved). The ops
dispatch at run time to the backend chosen by :func:`sparsevd.ops.backend.get_impl`.

When the layer's input needs no gradient (a network's first layer), autograd calls the
``*_backward_params`` variant, which returns (∂θ, ∂log σ², ∂b) only: a backend that registers it
(``native``) skips the two products of ∂x, the others run their full backward and drop ∂x.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..reference import conv_out_size
from .backend import find_impl, get_impl


# --------------------------------------------------------------------------------------- linear
@torch.library.custom_op("sparsevd::lrt_linear", mutates_args=())
def lrt_linear(
    x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor], seed: Tensor
) -> Tuple[Tensor, Tensor]:
    """LRT linear forward: x (*, K), weight and log_sigma2 (N, K), bias (N,) or None, seed (1,)
    int64 → (y (*, N) in x's dtype, std (*, N) in the compute dtype, fp32 or wider)."""
    _, impl = get_impl("lrt_linear", x.device)
    return impl(x, weight, log_sigma2, bias, seed)


@lrt_linear.register_fake
def _(x, weight, log_sigma2, bias, seed):
    shape = (*x.shape[:-1], weight.shape[0])
    std_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(shape, dtype=x.dtype), x.new_empty(shape, dtype=std_dtype)


@torch.library.custom_op("sparsevd::lrt_linear_backward", mutates_args=())
def lrt_linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, log_sigma2: Tensor, std: Tensor, seed: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (∂x, ∂θ, ∂log σ², ∂b) of the LRT linear layer (docs/design.md, "Backward")."""
    _, impl = get_impl("lrt_linear_backward", grad.device)
    return impl(grad, x, weight, log_sigma2, std, seed)


@lrt_linear_backward.register_fake
def _(grad, x, weight, log_sigma2, std, seed):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(log_sigma2),
        weight.new_empty((weight.shape[0],)),
    )


@torch.library.custom_op("sparsevd::lrt_linear_backward_params", mutates_args=())
def lrt_linear_backward_params(
    grad: Tensor, x: Tensor, weight: Tensor, log_sigma2: Tensor, std: Tensor, seed: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """(∂θ, ∂log σ², ∂b) of the LRT linear layer, for an input that needs no gradient."""
    backend, impl = get_impl("lrt_linear_backward", grad.device)
    params = find_impl("lrt_linear_backward_params", backend)
    if params is not None:
        return params(grad, x, weight, log_sigma2, std, seed)
    return tuple(impl(grad, x, weight, log_sigma2, std, seed)[1:])


@lrt_linear_backward_params.register_fake
def _(grad, x, weight, log_sigma2, std, seed):
    return torch.empty_like(weight), torch.empty_like(log_sigma2), weight.new_empty((weight.shape[0],))


def _lrt_linear_setup(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed = inputs
    ctx.mark_non_differentiable(output[1])  # std: saved for backward, not differentiable
    ctx.set_materialize_grads(False)  # no zero tensor of y's size for std's (absent) gradient
    ctx.save_for_backward(x, weight, log_sigma2, output[1], seed)
    ctx.has_bias = bias is not None


def _lrt_linear_bwd(ctx, grad_y, grad_std):
    if grad_y is None:
        return None, None, None, None, None
    x, weight, log_sigma2, std, seed = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        gx, gw, gls2, gb = lrt_linear_backward(grad_y.contiguous(), x, weight, log_sigma2, std, seed)
    else:
        gx = None
        gw, gls2, gb = lrt_linear_backward_params(grad_y.contiguous(), x, weight, log_sigma2, std, seed)
    return gx, gw, gls2, (gb if ctx.has_bias else None), None


lrt_linear.register_autograd(_lrt_linear_bwd, setup_context=_lrt_linear_setup)


# --------------------------------------------------------------------------------------- conv2d
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
) -> Tuple[Tensor, Tensor]:
    """LRT conv2d forward: x (N, C_in, H, W) → (y (N, C_out, H_out, W_out), std, same shape)."""
    _, impl = get_impl("lrt_conv2d", x.device)
    return impl(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups)


@lrt_conv2d.register_fake
def _(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups):
    kh, kw = weight.shape[2], weight.shape[3]
    h = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    shape = (x.shape[0], weight.shape[0], h, w)
    std_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(shape, dtype=x.dtype), x.new_empty(shape, dtype=std_dtype)


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (∂x, ∂θ, ∂log σ², ∂b) of the LRT conv2d layer."""
    _, impl = get_impl("lrt_conv2d_backward", grad.device)
    return impl(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups)


@lrt_conv2d_backward.register_fake
def _(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(log_sigma2),
        weight.new_empty((weight.shape[0],)),
    )


@torch.library.custom_op("sparsevd::lrt_conv2d_backward_params", mutates_args=())
def lrt_conv2d_backward_params(
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
) -> Tuple[Tensor, Tensor, Tensor]:
    """(∂θ, ∂log σ², ∂b) of the LRT conv2d layer, for an input that needs no gradient."""
    args = (grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups)
    backend, impl = get_impl("lrt_conv2d_backward", grad.device)
    params = find_impl("lrt_conv2d_backward_params", backend)
    if params is not None:
        return params(*args)
    return tuple(impl(*args)[1:])


@lrt_conv2d_backward_params.register_fake
def _(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups):
    return torch.empty_like(weight), torch.empty_like(log_sigma2), weight.new_empty((weight.shape[0],))


def _lrt_conv2d_setup(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, log_sigma2, output[1], seed)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)


def _lrt_conv2d_bwd(ctx, grad_y, grad_std):
    if grad_y is None:
        return (None,) * 9
    x, weight, log_sigma2, std, seed = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        gx, gw, gls2, gb = lrt_conv2d_backward(
            grad_y.contiguous(), x, weight, log_sigma2, std, seed, *ctx.conv_args
        )
    else:
        gx = None
        gw, gls2, gb = lrt_conv2d_backward_params(
            grad_y.contiguous(), x, weight, log_sigma2, std, seed, *ctx.conv_args
        )
    return gx, gw, gls2, (gb if ctx.has_bias else None), None, None, None, None, None


lrt_conv2d.register_autograd(_lrt_conv2d_bwd, setup_context=_lrt_conv2d_setup)
