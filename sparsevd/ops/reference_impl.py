"""The ``reference`` backend of the ops: the math of :mod:`sparsevd.reference`, forward and an
explicit backward (docs/design.md, "Backward"), with ξ from :mod:`sparsevd.ops.noise`.

Every implementation here has the signature of its op in :mod:`sparsevd.ops.lrt` /
:mod:`sparsevd.ops.kl` and works in any floating dtype (fp64 for gradcheck).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference as R
from .._args import padding_sides
from .backend import register_impl
from .lrt import conv_memory_format
from .noise import lrt_noise


def _no_autocast(fn):
    """Run ``fn`` with autocast off: a custom op's implementation still sees the caller's autocast
    state, which would recast the fp32 math below to the autocast dtype."""

    @functools.wraps(fn)
    def wrapper(*args):
        first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args)

    return wrapper


def _noise(seed: torch.Tensor, shape, like: torch.Tensor) -> torch.Tensor:
    return lrt_noise(seed, shape, device=like.device).to(like.dtype)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Under autocast the op receives low-precision activations and fp32 parameters: the reference
    # computes in the wider of the two and returns the activation dtype.
    return torch.promote_types(x.dtype, weight.dtype)


def _clipped(grad_w, weight, log_sigma2, clip_threshold):
    """∂θ under train-time clipping: the LRT gradient of a dropped weight is zero (θ enters as
    θ ⊙ m with the mask m a constant); ∂log σ² is zero there already (it carries the factor σ² ⊙ m)."""
    m = R.clip_mask(weight, log_sigma2, clip_threshold)
    return grad_w if m is None else grad_w * m.to(grad_w.dtype)


@_no_autocast
def lrt_linear_fwd(x, weight, log_sigma2, bias, seed, clip_threshold=None):
    dt = _compute_dtype(x, weight)
    xc = x.to(dt)
    w, sigma2 = R.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    mu = F.linear(xc, w, None if bias is None else bias.to(dt))
    s2 = F.linear(xc * xc, sigma2)
    std = torch.sqrt(s2 + R.EPS_VAR)
    y = mu + std * _noise(seed, mu.shape, mu)
    return y.to(x.dtype), std


@_no_autocast
def lrt_linear_bwd(grad, x, weight, log_sigma2, std, seed, need_grad_x=True,
                   clip_threshold=None):
    dt = std.dtype
    m = math.prod(grad.shape[:-1])  # rows; explicit, as -1 is ambiguous for empty shapes
    g = grad.to(dt).reshape(m, weight.shape[0])
    x2 = x.to(dt).reshape(m, weight.shape[1])
    std2 = std.reshape(m, weight.shape[0])
    xi = _noise(seed, std2.shape, std2)
    w, sigma2 = R.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    g_s2 = g * xi / (2.0 * std2)
    grad_w = _clipped(g.t() @ x2, weight, log_sigma2, clip_threshold)
    grad_ls2 = sigma2 * (g_s2.t() @ (x2 * x2))
    grad_b = g.sum(0)
    if need_grad_x:
        grad_x = (g @ w + 2.0 * x2 * (g_s2 @ sigma2)).reshape(x.shape).to(x.dtype)
    else:
        grad_x = x.new_empty((0,))
    return (
        grad_x,
        grad_w.to(weight.dtype),
        grad_ls2.to(log_sigma2.dtype),
        grad_b.to(weight.dtype),
    )


@_no_autocast
def lrt_conv2d_fwd(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups,
                   clip_threshold=None):
    dt = _compute_dtype(x, weight)
    xc = x.to(dt)
    sides = padding_sides(padding)
    w, sigma2 = R.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    mu = R.conv2d(xc, w, None if bias is None else bias.to(dt), stride, sides, dilation, groups)
    s2 = R.conv2d(xc * xc, sigma2, None, stride, sides, dilation, groups)
    std = torch.sqrt(s2 + R.EPS_VAR)
    y = mu + std * _noise(seed, mu.shape, mu)
    fmt = conv_memory_format(x, weight)  # the layout the op promises (its fake impl)
    return y.to(x.dtype).contiguous(memory_format=fmt), std.contiguous(memory_format=fmt)


@_no_autocast
def lrt_conv2d_bwd(grad, x, weight, log_sigma2, std, seed, stride, padding, dilation, groups,
                   need_grad_x=True, clip_threshold=None):
    dt = std.dtype
    g = grad.to(dt)
    xc = x.to(dt)
    t, b, l, r = padding_sides(padding)
    if (t, l) != (b, r):  # asymmetric: the gradient of the padded input, cropped
        xc = torch.nn.functional.pad(xc, (l, r, t, b))
        pad, crop = [0, 0], (t, l)
    else:
        pad, crop = [t, l], (0, 0)
    w, sigma2 = R.clip_parameters(weight.to(dt), log_sigma2.to(dt), clip_threshold)
    xi = _noise(seed, std.shape, std)
    g_s2 = g * xi / (2.0 * std)
    args = (stride, pad, dilation, groups)
    grad_w = _clipped(torch.nn.grad.conv2d_weight(xc, w.shape, g, *args), weight, log_sigma2,
                      clip_threshold)
    grad_ls2 = sigma2 * torch.nn.grad.conv2d_weight(xc * xc, w.shape, g_s2, *args)
    grad_b = g.sum((0, 2, 3))
    if need_grad_x:
        grad_x = (torch.nn.grad.conv2d_input(xc.shape, w, g, *args)
                  + 2.0 * xc * torch.nn.grad.conv2d_input(xc.shape, sigma2, g_s2, *args))
        grad_x = torch.empty_like(x).copy_(
            grad_x[:, :, crop[0]:crop[0] + x.shape[2], crop[1]:crop[1] + x.shape[3]])
    else:
        grad_x = x.new_empty((0,))
    return (
        grad_x,
        grad_w.to(weight.dtype),
        grad_ls2.to(log_sigma2.dtype),
        grad_b.to(weight.dtype),
    )


def _kl_terms(weight: torch.Tensor, log_sigma2: torch.Tensor):
    """KL (fp32 or wider scalar) and its analytic gradients w.r.t. θ and log σ²."""
    dt = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(dt)
    ls2 = log_sigma2.to(dt)
    raw = ls2 - torch.log(w * w + R.EPS_THETA)
    la = torch.clamp(raw, -R.LOG_ALPHA_CLAMP, R.LOG_ALPHA_CLAMP)
    kl = -R.neg_kl_from_log_alpha(la).sum()
    # d KL / d log α = -(k1 k3 σ'(k2 + k3 la) + ½ σ(-la)); zero where the clamp is active.
    z = R.K2 + R.K3 * la
    # σ'(z) = σ(z)·σ(−z): no cancellation in 1 − σ(z) near log α = 10.
    dla = -(R.K1 * R.K3 * torch.sigmoid(z) * torch.sigmoid(-z) + 0.5 * torch.sigmoid(-la))
    dla = dla * ((raw > -R.LOG_ALPHA_CLAMP) & (raw < R.LOG_ALPHA_CLAMP)).to(dt)
    grad_ls2 = dla
    grad_w = dla * (-2.0 * w / (w * w + R.EPS_THETA))
    return kl, grad_w, grad_ls2


@_no_autocast
def kl_fwd(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool):
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


register_impl("lrt_linear", "reference", lrt_linear_fwd)
register_impl("lrt_linear_backward", "reference", lrt_linear_bwd)
register_impl("lrt_conv2d", "reference", lrt_conv2d_fwd)
register_impl("lrt_conv2d_backward", "reference", lrt_conv2d_bwd)
register_impl("kl_sparse_vd", "reference", kl_fwd)
