"""The custom ops ``sparsevd::lrt_linear`` and ``sparsevd::lrt_linear_backward``: schema (from the
signatures below), fake (meta) implementations, autograd, and :func:`run_lrt_linear`, the path
:mod:`sparsevd.functional` takes.

The forward op returns ``(y, std)``: the LRT output and std = sqrt(s² + 1e-8), which the backward
op uses together with ξ regenerated from the seed (nothing else of size (M, N) is saved). Both
dispatch at run time to the backend :func:`sparsevd.ops.backend.get_impl` chooses: ``reference``
(:mod:`.naive`), ``native`` (:mod:`.native`), ``triton`` (:mod:`.triton`), each module loaded on
first use.

When the layer's input needs no gradient (a network's first layer), autograd calls the backward
op with ``need_grad_x=False``: the backends skip ∂x (the native and Triton kernels do not compute
it at all) and return an empty tensor in its place.

:func:`run_lrt_linear` returns y with autograd: in eager mode on the native backend through its
C++ autograd op (the same kernels, bit-identical results, no Python between forward and
backward: ~0.1 ms less per layer and step), else through the custom op (torch.compile, dispatch
modes, functorch, the other backends).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import eager_impl, get_impl, no_autocast, register_family, register_impl
from ..lrt_common import backward_outputs_like
from .naive import naive_lrt_linear, naive_lrt_linear_backward

register_family("lrt_linear", ("lrt_linear", "lrt_linear_backward"))
register_impl("lrt_linear", "reference", no_autocast(naive_lrt_linear))
register_impl("lrt_linear_backward", "reference", no_autocast(naive_lrt_linear_backward))


@torch.library.custom_op("sparsevd::lrt_linear", mutates_args=())
def lrt_linear(
    x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor], seed: Tensor,
    clip_threshold: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """LRT linear forward: x (*, K), weight and log_sigma2 (N, K), bias (N,) or None, seed (1,)
    int64 → (y (*, N) in x's dtype, std (*, N) in the compute dtype, fp32 or wider).
    ``clip_threshold``: train-time clipping, the weights with log α ≥ it enter neither the mean
    nor the variance (:func:`sparsevd.ops.weights.clip_parameters`); None: no clipping."""
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
    """Gradients (∂x, ∂θ, ∂log σ², ∂b) of the LRT linear layer (docs/design.md, "Backward"): grad
    and std (*, N), x (*, K), weight and log_sigma2 (N, K) → ∂x (*, K), ∂θ and ∂log σ² (N, K), ∂b
    (N,). With ``need_grad_x`` False (x needs no gradient, e.g. a network's first layer) ∂x is not
    computed and comes back as an empty (0,) tensor. With ``clip_threshold`` (the forward's), ∂θ
    and ∂log σ² are zero for the clipped weights."""
    _, impl = get_impl("lrt_linear_backward", grad.device)
    return impl(grad, x, weight, log_sigma2, std, seed, need_grad_x, clip_threshold)


@lrt_linear_backward.register_fake
def _(grad, x, weight, log_sigma2, std, seed, need_grad_x=True, clip_threshold=None):
    return backward_outputs_like(x, weight, log_sigma2, need_grad_x)


def _setup_context(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed, clip_threshold = inputs
    ctx.mark_non_differentiable(output[1])  # std: saved for backward, not differentiable
    ctx.set_materialize_grads(False)  # no zero tensor of y's size for std's (absent) gradient
    ctx.save_for_backward(x, weight, log_sigma2, output[1], seed)
    ctx.has_bias = bias is not None
    ctx.clip_threshold = clip_threshold


def _backward(ctx, grad_y, grad_std):
    if grad_y is None:
        return None, None, None, None, None, None
    x, weight, log_sigma2, std, seed = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    gx, gw, gls2, gb = lrt_linear_backward(grad_y.contiguous(), x, weight, log_sigma2, std, seed,
                                           need_x, ctx.clip_threshold)
    return (gx if need_x else None), gw, gls2, (gb if ctx.has_bias else None), None, None


lrt_linear.register_autograd(_backward, setup_context=_setup_context)


def run_lrt_linear(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                   seed: Tensor, clip_threshold: Optional[float] = None) -> Tensor:
    """y of :func:`lrt_linear` with autograd, through the backend's eager autograd op when
    :func:`sparsevd.ops.backend.eager_impl` allows it, else through the custom op."""
    fast = eager_impl("lrt_linear", x.device, (x, weight, log_sigma2, bias, seed))
    if fast is not None:
        return fast(x, weight, log_sigma2, bias, seed, clip_threshold)
    return lrt_linear(x, weight, log_sigma2, bias, seed, clip_threshold)[0]
