"""The LRT linear layer in plain PyTorch: the math of the family, the ``reference`` backend and the
tests' oracle.

:func:`naive_lrt_linear` has the signature and return convention of the op
``sparsevd::lrt_linear`` (:mod:`sparsevd.ops.lrt_linear.op`) and is differentiable by autograd,
which makes it the oracle of every backend's gradients; :func:`naive_lrt_linear_backward` is the
explicit backward (docs/design.md, "Backward") that the reference backend runs for
``sparsevd::lrt_linear_backward``. Both work in any floating dtype (fp64 for gradcheck) and draw
ξ with :func:`sparsevd.ops.noise.lrt_noise`. They are plain torch: under ``torch.autocast`` their
products run in the autocast dtype (PyTorch's own low-precision version of the math, the baseline
of the tests' precision rule); the reference backend runs them with autocast off
(:func:`sparsevd.ops.backend.no_autocast`), in the wider of x's and θ's dtypes.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import weights as W
from ..lrt_common import in_parameter_dtypes
from ..noise import lrt_noise


def naive_lrt_linear(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                     seed: Optional[Tensor], clip_threshold: Optional[float] = None, *,
                     noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """μ = x θᵀ + b, s² = (x ⊙ x)(σ²)ᵀ, std = sqrt(s² + 1e-8), y = μ + std ⊙ ξ (paper, sec. 4.2),
    computed in promote(x, θ) (fp32 for bf16 activations under autocast).

    Args:
        x: (*, in_features). weight, log_sigma2: (out_features, in_features). bias:
            (out_features,) or None. seed: (1,) int64, ξ's seed.
        clip_threshold: train-time clipping, θ and σ² masked by
            :func:`sparsevd.ops.weights.clip_parameters`; None: none.
        noise: ξ (*, out_features) to use instead of the one drawn from ``seed`` (which may then be
            None): the tests compare a backend with this math on the backend's own ξ.

    Returns:
        (y (*, out_features) in x's dtype, std (*, out_features) in promote(x, θ)).
    """
    dt = torch.promote_types(x.dtype, weight.dtype)
    xc = x.to(dt)
    w, sigma2 = W.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    mu = F.linear(xc, w, None if bias is None else bias.to(dt))
    s2 = F.linear(xc * xc, sigma2)
    std = torch.sqrt(s2 + W.EPS_VAR)
    xi = lrt_noise(seed, mu.shape, device=mu.device) if noise is None else noise
    y = mu + std * xi.to(mu.dtype)
    return y.to(x.dtype), std


def naive_lrt_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, log_sigma2: Tensor,
                              std: Tensor, seed: Tensor, need_grad_x: bool = True,
                              clip_threshold: Optional[float] = None
                              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂θ, ∂log σ², ∂b) of :func:`naive_lrt_linear` with g = ``grad`` (*, out_features) and
    g_s2 = g ⊙ ξ / (2 std): ∂x = g θ + 2x ⊙ (g_s2 σ²), ∂θ = gᵀ x, ∂log σ² = σ² ⊙ (g_s2ᵀ (x ⊙ x)),
    ∂b = Σ_rows g, computed in std's dtype. ∂x is an empty (0,) tensor without ``need_grad_x``;
    with ``clip_threshold`` (the forward's) ∂θ and ∂log σ² are zero for the dropped weights."""
    dt = std.dtype
    m = math.prod(grad.shape[:-1])  # rows; explicit, as -1 is ambiguous for empty shapes
    g = grad.to(dt).reshape(m, weight.shape[0])
    x2 = x.to(dt).reshape(m, weight.shape[1])
    std2 = std.reshape(m, weight.shape[0])
    xi = lrt_noise(seed, std2.shape, device=std2.device).to(std2.dtype)
    w, sigma2 = W.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    g_s2 = g * xi / (2.0 * std2)
    grad_w = W.clip_grad_weight(g.t() @ x2, weight, log_sigma2, clip_threshold)
    grad_ls2 = sigma2 * (g_s2.t() @ (x2 * x2))
    grad_b = g.sum(0)
    if need_grad_x:
        grad_x = (g @ w + 2.0 * x2 * (g_s2 @ sigma2)).reshape(x.shape).to(x.dtype)
    else:
        grad_x = x.new_empty((0,))
    return in_parameter_dtypes(grad_x, grad_w, grad_ls2, grad_b, weight, log_sigma2)
