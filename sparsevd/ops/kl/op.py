"""The custom ops ``sparsevd::kl_sparse_vd`` (the sparse-VD KL of one or many layers, value and
gradients in one pass) and ``sparsevd::log_alpha``: schema (from the signatures below), fake
implementations, autograd, and :func:`run_kl_sparse_vd`, the path of
:func:`sparsevd.functional.kl_sparse_vd_many`. ``kl_sparse_vd`` dispatches to the backend
:func:`sparsevd.ops.backend.get_impl` chooses (``reference``: :mod:`.naive`, ``native``:
:mod:`.native`, ``triton``: :mod:`.triton`); ``log_alpha`` is plain torch
(:func:`sparsevd.ops.weights.log_alpha`) on every backend.

``kl_sparse_vd(weights, log_sigma2s, with_grad)`` returns ``(kl, grads_weight, grads_log_sigma2)``:
the fp32 (or fp64) sum over all layers of KL(q‖p) (eq. 14), and, when ``with_grad``, ∂KL/∂θ and
∂KL/∂log σ² per layer, computed in the same pass and scaled by the incoming gradient in backward.

``kl_sparse_vd_kept(weights, log_sigma2s, with_grad, thresholds)`` is the same op with a fourth,
non-differentiable output: ``kept``, int64 (num_layers,) on the parameters' device, the number of
weights of each layer kept at evaluation (log α < ``thresholds[i]``; θ or e^{log σ²} not finite
counts as kept: :func:`sparsevd.ops.kl.naive.naive_kept_mask`), counted by every backend in the KL's own
pass from the log α it computes anyway (issue 23 item 7: a training loop's compression at no extra
pass over the weights).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .. import weights as W
from ..backend import eager_impl, get_impl, no_autocast, register_family, register_impl
from .naive import naive_kl_sparse_vd, naive_kl_sparse_vd_kept

register_family("kl", ("kl_sparse_vd", "kl_sparse_vd_kept"))
register_impl("kl_sparse_vd", "reference", no_autocast(naive_kl_sparse_vd))
register_impl("kl_sparse_vd_kept", "reference", no_autocast(naive_kl_sparse_vd_kept))


@torch.library.custom_op("sparsevd::kl_sparse_vd", mutates_args=())
def kl_sparse_vd(
    weights: List[Tensor], log_sigma2s: List[Tensor], with_grad: bool
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Σ_layers KL and, when ``with_grad``, its gradients w.r.t. every θ and log σ²."""
    _, impl = get_impl("kl_sparse_vd", weights[0].device)
    return impl(weights, log_sigma2s, with_grad)


@kl_sparse_vd.register_fake
def _fake_kl(weights, log_sigma2s, with_grad):
    dt = torch.promote_types(weights[0].dtype, torch.float32)
    kl = weights[0].new_empty((), dtype=dt)
    if not with_grad:
        return kl, [], []
    return kl, [torch.empty_like(w) for w in weights], [torch.empty_like(s) for s in log_sigma2s]


@torch.library.custom_op("sparsevd::kl_sparse_vd_kept", mutates_args=())
def kl_sparse_vd_kept(
    weights: List[Tensor], log_sigma2s: List[Tensor], with_grad: bool, thresholds: List[float]
) -> Tuple[Tensor, List[Tensor], List[Tensor], Tensor]:
    """:func:`kl_sparse_vd`'s outputs and the per-layer kept counts (int64, (num_layers,)), one pass."""
    _, impl = get_impl("kl_sparse_vd_kept", weights[0].device)
    return impl(weights, log_sigma2s, with_grad, thresholds)


@kl_sparse_vd_kept.register_fake
def _(weights, log_sigma2s, with_grad, thresholds):
    kl, gws, gls = _fake_kl(weights, log_sigma2s, with_grad)
    return kl, gws, gls, weights[0].new_empty((len(weights),), dtype=torch.int64)


def _kl_setup(ctx, inputs, output):
    grads_w, grads_ls2 = output[1], output[2]
    # The gradient outputs never receive gradients: do not materialize zero tensors of every
    # parameter's size for them in backward.
    ctx.set_materialize_grads(False)
    ctx.num_layers = len(inputs[0])
    ctx.num_flags = len(inputs) - 2  # with_grad (and thresholds)
    ctx.n = len(grads_w)  # 0 when called with with_grad=False
    ctx.save_for_backward(*grads_w, *grads_ls2)


def _kl_bwd(ctx, grad_kl, _grads_w=None, _grads_ls2=None, _kept=None):
    """∂/∂(weights, log_sigma2s): the forward's gradients times ``grad_kl``; None for the flag
    arguments (``with_grad``, and ``thresholds`` of kl_sparse_vd_kept)."""
    flags = (None,) * ctx.num_flags
    if grad_kl is None:  # only possible without materialized gradients: nothing flows back
        return ([None] * ctx.num_layers, [None] * ctx.num_layers, *flags)
    if ctx.n == 0:
        raise RuntimeError(
            "sparsevd.kl_sparse_vd was called with with_grad=False; call it with with_grad=True "
            "to differentiate the KL"
        )
    # One multi-tensor launch (per dtype and device) instead of one multiply per tensor; a 0-dim
    # grad_kl keeps each gradient in its parameter's dtype.
    scaled = torch._foreach_mul(list(ctx.saved_tensors), grad_kl)
    return (list(scaled[: ctx.n]), list(scaled[ctx.n:]), *flags)


kl_sparse_vd.register_autograd(_kl_bwd, setup_context=_kl_setup)
kl_sparse_vd_kept.register_autograd(_kl_bwd, setup_context=_kl_setup)


def run_kl_sparse_vd(weights: List[Tensor], log_sigma2s: List[Tensor]) -> Tensor:
    """The KL of :func:`kl_sparse_vd` (0-dim) with autograd: in eager mode on the native backend
    through its C++ autograd op, else through the custom op. Either way the gradients are computed
    in the forward's pass when grad mode is on and some parameter requires grad (the C++ op decides
    this itself: csrc/cpu/autograd_cpu.cpp, ``kl_sparse_vd_autograd``), and the backward returns
    them as they are when the incoming gradient is 1."""
    fast = eager_impl("kl_sparse_vd", weights[0].device, (*weights, *log_sigma2s))
    if fast is not None:
        return fast(weights, log_sigma2s)
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *log_sigma2s))
    return kl_sparse_vd(weights, log_sigma2s, with_grad)[0]


def run_kl_sparse_vd_kept(weights: List[Tensor], log_sigma2s: List[Tensor],
                          thresholds: List[float]) -> Tuple[Tensor, Tensor]:
    """(KL, kept): :func:`run_kl_sparse_vd`'s KL (the same value and gradients) and the per-layer
    kept counts of :func:`kl_sparse_vd_kept` (int64, (num_layers,), no gradient), one pass."""
    thresholds = [float(t) for t in thresholds]
    fast = eager_impl("kl_sparse_vd_kept", weights[0].device, (*weights, *log_sigma2s))
    if fast is not None:
        return fast(weights, log_sigma2s, thresholds)
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *log_sigma2s))
    kl, _, _, kept = kl_sparse_vd_kept(weights, log_sigma2s, with_grad, thresholds)
    return kl, kept


@torch.library.custom_op("sparsevd::log_alpha", mutates_args=())
def log_alpha(weight: Tensor, log_sigma2: Tensor) -> Tensor:
    """log α = clamp(log σ² − log(θ² + 1e-8), −10, 10), elementwise (eq. 8)."""
    return W.log_alpha(weight, log_sigma2)


@log_alpha.register_fake
def _(weight, log_sigma2):
    return torch.empty_like(weight)


def _la_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _la_bwd(ctx, grad):
    weight, log_sigma2 = ctx.saved_tensors
    return W.log_alpha_backward(weight, log_sigma2, grad)


log_alpha.register_autograd(_la_bwd, setup_context=_la_setup)
