"""One set of sample inputs per op family, shared by the tests of every backend.

``backends_for(op)`` lists the backends that run ``op`` on this machine (``reference`` always;
``triton`` under Triton's interpreter or on a GPU; further backends as they register), so a test
parametrized with it checks each of them on the same inputs against the same oracle.
"""
import math
import os

import torch
from conftest import assert_close

from sparsevd import reference as R
from sparsevd.ops import backend as B

CUDA = torch.cuda.is_available()
F64 = torch.float64


def device_for(backend: str) -> str:
    """Where a backend's tests run: the Triton kernels on the GPU when there is one (else in the
    interpreter on CPU tensors), every other backend on the CPU."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


def backends_for(op: str):
    """Names of the backends (``SPARSEVD_BACKEND`` values) that can run ``op`` here, each on
    :func:`device_for` its name."""
    old = os.environ.get(B.ENV_VAR)
    found = []
    try:
        for name in B.BACKENDS:
            if name == "auto":
                continue
            os.environ[B.ENV_VAR] = name
            try:
                B.get_impl(op, torch.device(device_for(name)))
            except B.BackendUnavailableError:
                continue
            found.append(name)
    finally:
        if old is None:
            os.environ.pop(B.ENV_VAR, None)
        else:
            os.environ[B.ENV_VAR] = old
    return found


def fresh_seed(device="cpu") -> torch.Tensor:
    """A fresh one-element int64 seed from torch's generator (tests seed it per test)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------- linear
#: (leading dims of x, in_features, out_features, bias, contiguous x)
LINEAR_CASES = [
    ((5,), 7, 4, True, True),
    ((1,), 1, 1, True, True),
    ((33,), 123, 17, False, True),
    ((2, 3), 16, 9, True, True),
    ((4, 5), 11, 3, False, False),
    ((6,), 10, 8, True, False),
]


def linear_inputs(lead, k, n, dtype=torch.float32, with_bias=True, contiguous=True, device="cpu"):
    """x (*lead, k) (a strided, misaligned view when not ``contiguous``), θ ~ N(0, 1/k), log σ² ~ N(−3, 1)
    (σ² well away from 0, so the variance path matters), b ~ N(0, 1) or None."""
    if contiguous:
        x = torch.randn(*lead, k, dtype=dtype, device=device)
    else:
        # a strided view that also starts one element in (a misaligned data pointer)
        x = torch.randn(*lead, 2 * k + 1, dtype=dtype, device=device)[..., 1::2]
        if len(lead) > 1:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert k == 1 or not x.is_contiguous()  # a single column is contiguous
    w = torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(max(k, 1))
    ls2 = torch.randn(n, k, dtype=dtype, device=device) - 3
    b = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    return x, w, ls2, b


def op_noise(shape, seed) -> torch.Tensor:
    """ξ of an LRT output of ``shape`` exactly as the current backend's ``lrt_linear`` draws it:
    the op on x = 1 (K = 1) with θ = 0, log σ² = 0 and no bias gives y = sqrt(1 + 1e-8)·ξ, which
    is ξ in fp32. Returned in fp64."""
    from sparsevd import ops

    shape = tuple(shape)
    x = torch.ones(*shape[:-1], 1, device=seed.device)
    z = torch.zeros(shape[-1], 1, device=seed.device)
    y, _ = ops.lrt_linear(x, z, z, None, seed)
    return y.to(F64)


def clip_case(w, ls2, dead_rows=(), dead_cols=()):
    """Make ``ls2`` (in place) a train-time clipping case and return its ``clip_threshold``:
    the output rows ``dead_rows`` and input columns ``dead_cols`` (dim 1 of θ) get log σ² = 8, or
    log(θ² + 1e-8) + 10 where that is larger (|θ| > e⁻¹), so that log α clamps to 10 there: every
    weight there dropped), every other weight log α <= 9, and the threshold is the midpoint of the
    widest gap between neighbouring log α values in the middle of their range, so that about half
    the other weights are dropped and no weight sits within rounding of the threshold (with a single
    other weight, a threshold 1 above its log α: it is kept)."""
    with torch.no_grad():
        # every other weight gets log α <= 9 (a θ within ~1e-3 of 0 may draw more): none of them
        # may look dead, or a case with few live weights could have none
        ls2.copy_(torch.minimum(ls2, (torch.log(w * w + 1e-8) + 9.0).to(ls2.dtype)))
        dead = torch.clamp(torch.log(w * w + 1e-8) + 10.0, min=8.0).to(ls2.dtype)
        for r in dead_rows:
            ls2[r] = dead[r]
        for c in dead_cols:
            ls2[:, c] = dead[:, c]
        from sparsevd import reference as R

        la = R.log_alpha(w.double(), ls2.double()).flatten()
        la = la[la < 9.5].sort().values
        if la.numel() == 1:
            return float(la[0]) + 1.0
        if la.numel() < 2:
            return 0.0
        lo, hi = int(0.3 * (la.numel() - 1)), max(int(0.7 * (la.numel() - 1)), 1)
        gaps = la[lo + 1:hi + 1] - la[lo:hi]
        i = lo + int(gaps.argmax()) if gaps.numel() else 0
        return float((la[i] + la[min(i + 1, la.numel() - 1)]) / 2)


#: Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages; GROUP_M = 2) of the clipped Triton linear
#: tests: small, so that the cases below span several weight tiles [BLOCK_N, BLOCK_K] of θ.
CLIP_TILES = (16, 32, 32, 4, 1)
#: Linear clipping cases with whole dead weight tiles at CLIP_TILES: (lead, in_features,
#: out_features, dead output rows, dead input columns), as ``clip_case`` takes them.
CLIP_TILE_CASES = [
    # a dead row block (the last, partial block [64, 70) too) and a dead column block
    ((40,), 100, 70, tuple(range(32, 70)), tuple(range(0, 32))),
    # the second of two K steps dead (forward, ∂x), 3-D input
    ((2, 9), 64, 64, (), tuple(range(32, 64))),
    # the first row block dead, K just over one tile
    ((17,), 33, 40, tuple(range(32)), ()),
]


def dead_tiles(mask: torch.Tensor, block_n: int, block_k: int) -> int:
    """The number of [block_n, block_k] tiles of the (N, K) keep-mask with no kept weight."""
    n, k = mask.shape
    tn, tk = -(-n // block_n), -(-k // block_k)
    padded = torch.zeros(tn * block_n, tk * block_k, dtype=torch.bool, device=mask.device)
    padded[:n, :k] = mask.bool()
    live = padded.view(tn, block_n, tk, block_k).any(3).any(1)
    return int((~live).sum())


#: Train-time clipping of the linear layer by structure, for the backends that compact what is
#: dead (test_native.py): (lead, in_features, out_features, dead output rows, dead input columns).
CLIP_STRUCTURE_CASES = [
    ((5,), 7, 4, (), ()),                                              # no whole row or column dead
    ((33,), 123, 17, (0, 5, 16), (1, 2, 64, 122)),                     # dead rows and columns
    ((9,), 40, 20, tuple(range(0, 20, 2)), tuple(range(1, 40, 3))),    # half the rows, a third of the columns
    ((70,), 31, 300, tuple(range(0, 300, 3)), ()),                     # dead rows only; M·N > a parallel grain
    ((2, 3), 50, 6, (), tuple(range(0, 50, 2))),                       # dead columns only, 3-D x
    ((4,), 16, 9, tuple(range(1, 9)), tuple(range(1, 16))),            # one row and one column alive
]


# --------------------------------------------------------------------------------------- conv
#: (N, C_in, H, W), (C_out, kH, kW), stride, padding, dilation, groups
CONV_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1),
    ((2, 3, 8, 7), (5, 3, 3), 2, 1, 1, 1),
    ((1, 2, 9, 10), (3, 2, 3), 1, 2, 2, 1),
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((3, 4, 5, 5), (4, 3, 3), 1, 1, 1, 4),
    ((1, 1, 4, 4), (1, 1, 1), 1, 0, 1, 1),
]


#: Train-time clipping of conv2d by structure (test_native.py): x shape, (C_out, kH, kW), stride,
#: padding, dilation, groups, dead output channels, dead input channels (dim 1 of θ).
CLIP_CONV_STRUCTURE_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1, (), ()),
    ((1, 5, 6, 6), (7, 3, 3), 1, 1, 1, 1, (1, 2, 6), (0, 3)),
    ((2, 6, 9, 8), (8, 3, 3), 2, 1, 1, 1, tuple(range(7)), (1, 2, 3, 4, 5)),  # one channel of each alive
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2, (0, 5), (1,)),       # groups = 2
    ((2, 4, 8, 8), (5, 2, 2), 1, (0, 1, 0, 1), 1, 1, (2,), (1,)),            # per-side padding ("same")
]


def conv_inputs(xs, ws, groups, dtype=torch.float32, with_bias=True, contiguous=True, device="cpu"):
    """x (N, C_in, H, W) (a strided view when not ``contiguous``), θ ~ N(0, 1/fan_in),
    log σ² ~ N(−3, 1), b ~ N(0, 1) or None."""
    n, c, h, wd = xs
    co, kh, kw = ws
    x = torch.randn(n, c, h, wd, dtype=dtype, device=device)
    if not contiguous:
        x = torch.randn(n, c, h, 2 * wd, dtype=dtype, device=device)[..., 1::2]
        assert not x.is_contiguous()
    fan_in = c // groups * kh * kw
    w = torch.randn(co, c // groups, kh, kw, dtype=dtype, device=device) / math.sqrt(fan_in)
    ls2 = torch.randn(co, c // groups, kh, kw, dtype=dtype, device=device) - 3
    b = torch.randn(co, dtype=dtype, device=device) if with_bias else None
    return x, w, ls2, b


#: Conv1d: (N, C_in, L), (C_out, k), stride, padding, dilation, groups
CONV1D_CASES = [
    ((2, 3, 11), (4, 3), 1, 0, 1, 1),
    ((3, 4, 16), (6, 4), 1, "same", 2, 2),
    ((1, 5, 9), (5, 3), 2, 1, 1, 5),
    ((2, 2, 7), (3, 1), 1, "valid", 1, 1),
]


def conv1d_inputs(xs, ws, groups, dtype=torch.float32, with_bias=True, contiguous=True,
                  device="cpu"):
    """x (N, C_in, L), θ (C_out, C_in/groups, k), log σ², b as :func:`conv_inputs` draws them."""
    n, c, length = xs
    co, k = ws
    x, w, ls2, b = conv_inputs((n, c, 1, length), (co, 1, k), groups, dtype, with_bias,
                               contiguous, device)
    return x.squeeze(2), w.squeeze(2), ls2.squeeze(2), b


def as_list(v):
    """An int or pair as the [a, b] list the conv ops take."""
    return [v, v] if isinstance(v, int) else list(v)


# ----------------------------------------------------------------------------------------- KL
#: Layer shapes of the KL tests: LeNet-300-100's, a conv weight, single weights, partial blocks.
KL_SHAPES = [(300, 784), (100, 300), (10, 100), (1,), (7, 3, 5, 5), (129,), (256,)]


def kl_layer(shape, dtype=torch.float32, spread=8.0, device="cpu"):
    """θ ~ N(0, 0.1²) with some exact zeros and tiny values; log σ² ~ U(−spread − 8, spread − 8),
    so that log α covers both clamps (−10 and 10) and the inside."""
    w = 0.1 * torch.randn(shape, dtype=dtype, device=device)
    if w.numel() > 4:
        w.view(-1)[:2] = 0.0
        w.view(-1)[2:4] = 1e-6
    ls2 = torch.empty(shape, dtype=dtype, device=device).uniform_(-spread - 8.0, spread - 8.0)
    return w, ls2


def kl_params(shape, dtype=F64, device="cpu"):
    """θ and log σ² with log α spread over (−12, 12) but away from the clamp edges ±10 (for
    gradcheck, which needs a differentiable neighbourhood)."""
    w = torch.randn(shape, dtype=F64)
    w = torch.where(w < 0, w - 0.1, w + 0.1)
    la = torch.empty(shape, dtype=F64).uniform_(-12, 12)
    la = torch.where((la.abs() - 10).abs() < 0.05, la * 0.9, la)
    return w.to(device, dtype), (la + torch.log(w * w + 1e-8)).to(device, dtype)


def kl_reference(weights, log_sigma2s):
    """fp64 KL and gradients from sparsevd.reference with autograd (the clamp masks the gradient).

    Which weights sit inside the clamp (−10 < raw log α < 10) is decided in the parameters' own
    dtype, as the backends decide it: a raw log α within an fp32 rounding of ±10 falls on either
    side, and the gradient there jumps from its full value to 0."""
    total, gws, gls = torch.zeros((), dtype=F64, device=weights[0].device), [], []
    for w, s in zip(weights, log_sigma2s):
        w64 = w.detach().to(F64).requires_grad_()
        s64 = s.detach().to(F64).requires_grad_()
        kl = R.kl_sparse_vd(w64, s64)
        gw, gs = torch.autograd.grad(kl, (w64, s64))
        raw = (s.detach() - torch.log(w.detach() * w.detach() + R.EPS_THETA))
        raw64 = s64.detach() - torch.log(w64.detach() ** 2 + R.EPS_THETA)
        inside = (raw > -R.LOG_ALPHA_CLAMP) & (raw < R.LOG_ALPHA_CLAMP)
        inside64 = (raw64 > -R.LOG_ALPHA_CLAMP) & (raw64 < R.LOG_ALPHA_CLAMP)
        if not torch.equal(inside, inside64):  # recompute the gradient on the dtype's side
            la = torch.clamp(raw64, -R.LOG_ALPHA_CLAMP, R.LOG_ALPHA_CLAMP)
            z = R.K2 + R.K3 * la
            dla = -(R.K1 * R.K3 * torch.sigmoid(z) * torch.sigmoid(-z) + 0.5 * torch.sigmoid(-la))
            dla = dla * inside.to(F64)
            gs = dla
            gw = dla * (-2.0 * w64.detach() / (w64.detach() ** 2 + R.EPS_THETA))
        total = total + kl.detach()
        gws.append(gw)
        gls.append(gs)
    return total, gws, gls


def check_kl(kl, grads_w, grads_l, weights, log_sigma2s, rtol=1e-4):
    kl_ref, gws_ref, gls_ref = kl_reference(weights, log_sigma2s)
    assert kl.dim() == 0 and kl.dtype == torch.promote_types(weights[0].dtype, torch.float32)
    assert_close(kl, kl_ref, rtol=rtol, atol=0.0, name="kl")
    for i, (a, e, t) in enumerate(zip(grads_w, gws_ref, weights)):
        assert a.shape == t.shape and a.dtype == t.dtype and a.stride() == torch.empty_like(t).stride()
        assert_close(a, e, rtol=rtol, atol=rtol * 1e-2 * amax(e) + 1e-7, name=f"grad_weight[{i}]")
    for i, (a, e) in enumerate(zip(grads_l, gls_ref)):
        assert_close(a, e, rtol=rtol, atol=1e-7, name=f"grad_log_sigma2[{i}]")


def amax(t) -> float:
    """max |t| (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0
