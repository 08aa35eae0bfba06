"""The per-weight math of sparse variational dropout, in plain PyTorch: the one home of its
constants and rules.

Each weight has a Gaussian posterior q(w) = N(θ, σ²) and a log-uniform prior; a layer stores θ
(``weight``) and log σ² (``log_sigma2``). Everything here is elementwise, differentiable by autograd
and works in any floating dtype on any device. The op families' math (``naive.py`` of
:mod:`sparsevd.ops.lrt_linear`, :mod:`sparsevd.ops.lrt_conv2d`, :mod:`sparsevd.ops.kl`), the layers,
``convert`` and ``deploy`` call these functions; :mod:`sparsevd.reference` re-exports them.

Source: D. Molchanov, A. Ashukha, D. Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369). Equation numbers refer to that paper.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._args import check_threshold

#: Constants of the KL approximation, eq. 14.
K1 = 0.63576
K2 = 1.87320
K3 = 1.48695
#: log α is clamped to [-LOG_ALPHA_CLAMP, LOG_ALPHA_CLAMP].
LOG_ALPHA_CLAMP = 10.0
#: Added to θ² inside log(θ² + EPS_THETA) (eq. 8 reparameterization).
EPS_THETA = 1e-8
#: Added to the LRT variance before the square root.
EPS_VAR = 1e-8


def log_alpha(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """log α = clamp(log σ² − log(θ² + 1e-8), −10, 10), elementwise.

    Args:
        weight: θ, any shape, floating dtype.
        log_sigma2: log σ², same shape and dtype as ``weight``.

    Returns:
        log α, same shape and dtype. α = σ²/θ² is the dropout odds of each weight
        (dropout rate p = α/(1+α)); additive-noise reparameterization, eq. 8.
    """
    return torch.clamp(
        log_sigma2 - torch.log(weight * weight + EPS_THETA), -LOG_ALPHA_CLAMP, LOG_ALPHA_CLAMP
    )


def log_alpha_backward(weight: torch.Tensor, log_sigma2: torch.Tensor,
                       grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂θ, ∂L/∂log σ²) from ``grad`` = ∂L/∂log α, elementwise: ∂log α/∂log σ² = 1 and
    ∂log α/∂θ = −2θ / (θ² + 1e-8) inside the clamp, both 0 where it is active (the raw log α,
    computed in the parameters' dtype, at or beyond ±10).

    Args:
        weight, log_sigma2: θ and log σ², the same shape and dtype.
        grad: ∂L/∂log α, their shape; the results are in its dtype.
    """
    raw = log_sigma2 - torch.log(weight * weight + EPS_THETA)
    inside = ((raw > -LOG_ALPHA_CLAMP) & (raw < LOG_ALPHA_CLAMP)).to(grad.dtype)
    g = grad * inside
    return g * (-2.0 * weight / (weight * weight + EPS_THETA)), g


def neg_kl_from_log_alpha(la: torch.Tensor) -> torch.Tensor:
    """−KL(q‖p) per weight from log α (eq. 14): k1·σ(k2 + k3·log α) − ½·log1p(e^{−log α}) − k1."""
    return K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1


def clip_mask(weight: torch.Tensor, log_sigma2: torch.Tensor,
              clip_threshold: Optional[float]) -> Optional[torch.Tensor]:
    """The train-time clipping mask m = [log α < clip_threshold] in θ's dtype (a constant of the
    step: no gradient flows through it), or None when ``clip_threshold`` is None."""
    if clip_threshold is None:
        return None
    with torch.no_grad():
        return eval_mask(weight, log_sigma2, clip_threshold).to(weight.dtype)


def clip_parameters(weight: torch.Tensor, log_sigma2: torch.Tensor,
                    clip_threshold: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(θ ⊙ m, σ² ⊙ m) with m = :func:`clip_mask`, or (θ, σ²) when ``clip_threshold`` is None:
    the parameters the LRT uses under train-time clipping."""
    sigma2 = torch.exp(log_sigma2)
    m = clip_mask(weight, log_sigma2, clip_threshold)
    if m is None:
        return weight, sigma2
    return weight * m, sigma2 * m


def eval_mask(weight: torch.Tensor, log_sigma2: torch.Tensor, threshold: float) -> torch.Tensor:
    """The weights kept at evaluation: log α < threshold (boolean, same shape as ``weight``).

    The one home of the pruning rule (paper, sec. 5: weights with log α > 3 are dropped); the
    layers, the report and ``deploy`` all call it.

    Raises:
        TypeError / ValueError: ``threshold`` is not a finite real number (a NaN threshold would
            silently drop every weight).
    """
    return log_alpha(weight, log_sigma2) < check_threshold(threshold)


def masked_weight(weight: torch.Tensor, log_sigma2: torch.Tensor, threshold: float) -> torch.Tensor:
    """θ ⊙ [log α < threshold]: the deterministic weight used at evaluation."""
    return weight * eval_mask(weight, log_sigma2, threshold).to(weight.dtype)


def clip_grad_weight(grad_weight: torch.Tensor, weight: torch.Tensor, log_sigma2: torch.Tensor,
                     clip_threshold: Optional[float]) -> torch.Tensor:
    """∂θ of the LRT under train-time clipping: zero for the dropped weights (θ enters as θ ⊙ m
    with the mask m a constant); ``grad_weight`` itself without clipping. ∂log σ² needs no such
    step: it carries the factor σ² ⊙ m already."""
    m = clip_mask(weight, log_sigma2, clip_threshold)
    return grad_weight if m is None else grad_weight * m.to(grad_weight.dtype)
