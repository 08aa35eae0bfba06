"""The sparse-VD KL of many layers in plain PyTorch: the math of the family and the ``reference``
backend of ``sparsevd::kl_sparse_vd``.

:func:`naive_kl_sparse_vd` has the op's signature and return convention (Σ_layers KL in
promote(θ dtype, fp32), and with ``with_grad`` the analytic gradients w.r.t. every θ and log σ²);
its KL value is differentiable by autograd, which the tests use as the oracle of every backend's
analytic gradients. Per weight (eq. 14, :mod:`sparsevd.ops.weights`):
−KL ≈ k1·σ(k2 + k3·log α) − ½·log1p(e^(−log α)) − k1.

:func:`naive_kept_count` is the count that ``sparsevd::kl_sparse_vd_kept`` adds to the KL (the
weights kept at evaluation, per layer), and :func:`naive_kl_sparse_vd_kept` that op's reference.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .. import weights as W


def _kl_terms(weight: torch.Tensor, log_sigma2: torch.Tensor):
    """KL (fp32 or wider scalar) and its analytic gradients w.r.t. θ and log σ²."""
    dt = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(dt)
    ls2 = log_sigma2.to(dt)
    la = W.log_alpha(w, ls2)
    kl = -W.neg_kl_from_log_alpha(la).sum()
    # d KL / d log α = -(k1 k3 σ'(k2 + k3 la) + ½ σ(-la)); the chain rule through log α (zero
    # where the clamp is active) is weights.log_alpha_backward.
    z = W.K2 + W.K3 * la
    # σ'(z) = σ(z)·σ(−z): no cancellation in 1 − σ(z) near log α = 10.
    dla = -(W.K1 * W.K3 * torch.sigmoid(z) * torch.sigmoid(-z) + 0.5 * torch.sigmoid(-la))
    grad_w, grad_ls2 = W.log_alpha_backward(w, ls2, dla)
    return kl, grad_w, grad_ls2


def naive_kl_sparse_vd(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool):
    """(Σ_layers KL (0-dim, promote(weights[0].dtype, fp32)), [∂KL/∂θ], [∂KL/∂log σ²]) of the layers
    (θ, log σ²) = (weights[i], log_sigma2s[i]), any shapes; the gradients in each parameter's
    dtype and shape, [] without ``with_grad``."""
    out_dtype = torch.promote_types(weights[0].dtype, torch.float32)  # as the fake impl says
    total = None
    grads_w, grads_ls2 = [], []
    for w, ls2 in zip(weights, log_sigma2s):
        kl, gw, gl = _kl_terms(w, ls2)
        kl = kl.to(out_dtype)
        total = kl if total is None else total + kl
        if with_grad:
            grads_w.append(gw.to(w.dtype))
            grads_ls2.append(gl.to(ls2.dtype))
    return total, grads_w, grads_ls2


#: log of the largest finite fp32 / fp64: log σ² at or above it counts as kept (e^{log σ²} = inf).
LOG_MAX = {torch.float32: 88.72283935546875, torch.float64: 709.782712893384}


def naive_kept_mask(weight: torch.Tensor, log_sigma2: torch.Tensor, threshold: float) -> torch.Tensor:
    """The weights the KL op counts as kept (bool, θ's shape): log α < ``threshold``
    (:func:`sparsevd.ops.weights.eval_mask`'s rule), or θ not finite, or log σ² NaN or at least
    :data:`LOG_MAX` (e^{log σ²} not finite): not known to be dropped, the rule of
    :func:`sparsevd.functional.kept_count`. Computed in promote(θ dtype, fp32), as the KL."""
    dt = torch.promote_types(weight.dtype, torch.float32)
    w, ls2 = weight.detach().to(dt), log_sigma2.detach().to(dt)
    return (W.log_alpha(w, ls2) < threshold) | ~torch.isfinite(w) | ~(ls2 < LOG_MAX[dt])


def naive_kept_count(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor],
                     thresholds: Sequence[float]) -> torch.Tensor:
    """(num_layers,) int64 on θ's device: :func:`naive_kept_mask` summed per layer."""
    device = weights[0].device if weights else None
    counts = [naive_kept_mask(w, s, t).sum() for w, s, t in zip(weights, log_sigma2s, thresholds)]
    return torch.stack(counts).to(torch.int64) if counts else torch.zeros(0, dtype=torch.int64, device=device)


def naive_kl_sparse_vd_kept(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool,
                            thresholds: List[float]):
    """:func:`naive_kl_sparse_vd`'s (KL, [∂KL/∂θ], [∂KL/∂log σ²]) and :func:`naive_kept_count`."""
    return (*naive_kl_sparse_vd(weights, log_sigma2s, with_grad),
            naive_kept_count(weights, log_sigma2s, thresholds))
