"""The sparse-VD KL of many layers in plain PyTorch: the math of the family and the ``reference``
backend of ``sparsevd::kl_sparse_vd``.

:func:`naive_kl_sparse_vd` has the op's signature and return convention (Σ_layers KL in
promote(θ dtype, fp32), and with ``with_grad`` the analytic gradients w.r.t. every θ and log σ²);
its KL value is differentiable by autograd, which the tests use as the oracle of every backend's
analytic gradients. Per weight (eq. 14, :mod:`sparsevd.ops.weights`):
−KL ≈ k1·σ(k2 + k3·log α) − ½·log1p(e^(−log α)) − k1.
"""
from __future__ import annotations

from typing import List

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
