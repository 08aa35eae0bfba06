"""The sparse variational dropout math in plain PyTorch.

This module is the specification of the package: the CPU training path, the oracle of the tests and
the ``reference`` baseline of the benchmarks. Every function is differentiable by autograd and
works in any floating dtype on any device.

Source: D. Molchanov, A. Ashukha, D. Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369). Equation numbers refer to that paper.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._args import IntOrPair, Padding, as_pair, check_threshold, conv_padding

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


def neg_kl_from_log_alpha(la: torch.Tensor) -> torch.Tensor:
    """−KL(q‖p) per weight from log α (eq. 14): k1·σ(k2 + k3·log α) − ½·log1p(e^{−log α}) − k1."""
    return K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1


def kl_sparse_vd(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """KL(q(w|θ,σ²) ‖ p(w)) of sparse VD with the log-uniform prior, summed over all weights.

    Uses the approximation of eq. 14 on log α = clamp(log σ² − log(θ² + 1e-8), −10, 10).

    Args:
        weight: θ, any shape, floating dtype.
        log_sigma2: log σ², same shape as ``weight``.

    Returns:
        A 0-dim tensor in the dtype of ``weight``: the KL in nats, ≥ 0 (it tends to 0 as
        log α → +∞ and grows as log α → −∞).
    """
    return -neg_kl_from_log_alpha(log_alpha(weight, log_sigma2)).sum()


def lrt_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: Optional[torch.Tensor],
    noise: torch.Tensor,
    clip_threshold: Optional[float] = None,
) -> torch.Tensor:
    """Linear layer with the local reparameterization trick (Kingma et al. 2015; paper, sec. 4.2).

    μ = x θᵀ + b,  s² = (x ⊙ x)(σ²)ᵀ,  y = μ + sqrt(s² + 1e-8) ⊙ ξ. The bias never enters s².
    With ``clip_threshold`` (train-time clipping, as in the authors' code): θ and σ² are
    multiplied by the mask m = [log α < clip_threshold] (:func:`clip_parameters`), so the dropped
    weights enter neither the mean nor the variance, and their LRT gradients are zero.

    Args:
        x: (*, in_features).
        weight: θ, (out_features, in_features).
        log_sigma2: log σ², (out_features, in_features).
        bias: (out_features,) or None.
        noise: ξ, (*, out_features), standard normal.
        clip_threshold: None (no clipping) or the log α threshold.

    Returns:
        y, (*, out_features), dtype of ``x``.
    """
    weight, sigma2 = clip_parameters(weight, log_sigma2, clip_threshold)
    mu = F.linear(x, weight, bias)
    s2 = F.linear(x * x, sigma2)
    return mu + torch.sqrt(s2 + EPS_VAR) * noise


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


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                  padding_end: Optional[int] = None) -> int:
    """Output length of a convolution along one dimension (as ``torch.nn.functional.conv2d``):
    ⌊(size + p_begin + p_end − dilation·(kernel − 1) − 1) / stride⌋ + 1, with p_begin = padding
    and p_end = padding_end (default: padding, symmetric)."""
    end = padding if padding_end is None else padding_end
    return (size + padding + end - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride,
           sides: Sequence[int], dilation, groups: int) -> torch.Tensor:
    """``F.conv2d`` with per-side zero padding ``sides`` = (top, bottom, left, right): symmetric
    padding goes to F.conv2d, asymmetric padding (padding="same" with an even kernel) pads x
    first, as torch does for "same"."""
    t, b, l, r = sides
    if (t, l) == (b, r):
        return F.conv2d(x, weight, bias, stride, (t, l), dilation, groups)
    return F.conv2d(F.pad(x, (l, r, t, b)), weight, bias, stride, 0, dilation, groups)


def conv_sides(padding, weight: torch.Tensor, stride, dilation) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of ``padding``: an int, a pair, "same", "valid", or already
    four per-side ints."""
    if isinstance(padding, (list, tuple)) and len(padding) == 4:
        return tuple(int(p) for p in padding)  # type: ignore[return-value]
    return conv_padding(padding, tuple(weight.shape[2:]), stride, dilation)


def lrt_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: Optional[torch.Tensor],
    noise: torch.Tensor,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    clip_threshold: Optional[float] = None,
) -> torch.Tensor:
    """2-D convolution with the local reparameterization trick.

    μ = conv(x, θ) + b,  s² = conv(x ⊙ x, σ²),  y = μ + sqrt(s² + 1e-8) ⊙ ξ; the bias never
    enters s² (paper, sec. 4.2, applied per output pixel as in the authors' code). With
    ``clip_threshold``, θ and σ² are masked as in :func:`lrt_linear`.

    Args:
        x: (N, C_in, H, W).
        weight: θ, (C_out, C_in / groups, kH, kW).
        log_sigma2: log σ², same shape as ``weight``.
        bias: (C_out,) or None.
        noise: ξ, (N, C_out, H_out, W_out), standard normal.
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d`` (padding an int,
            a pair, "same", "valid", or four per-side ints (top, bottom, left, right)).

    Returns:
        y, (N, C_out, H_out, W_out).
    """
    stride, dilation = as_pair(stride, "stride", 1), as_pair(dilation, "dilation", 1)
    sides = conv_sides(padding, weight, stride, dilation)
    weight, sigma2 = clip_parameters(weight, log_sigma2, clip_threshold)
    mu = conv2d(x, weight, bias, stride, sides, dilation, groups)
    s2 = conv2d(x * x, sigma2, None, stride, sides, dilation, groups)
    return mu + torch.sqrt(s2 + EPS_VAR) * noise


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
