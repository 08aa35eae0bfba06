"""The op family ``lrt_linear`` (sparsevd/ops/lrt_linear: ``sparsevd::lrt_linear`` and its backward)
on every backend and device that run here (conftest.py: ``backend``, ``device``), against the
family's naive math (sparsevd.lrt_linear.naive) on identical noise: values, gradients, noise,
statistics, gradcheck, opcheck, empty shapes, train-time clipping and torch.compile; the math
itself by hand.

Backend-only tests (kernel sets, caches, tiles, launches, GPU compilation):
test_lrt_linear_native.py, test_lrt_linear_triton.py.
"""
import math

import pytest
import torch
from conftest import assert_close, compiled_equals_eager, grads_of
from sample_inputs import F64, LINEAR_CASES, LINEAR_CLIP_CASES, clip_case, linear_inputs, op_noise

import sparsevd
import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.lrt_linear import lrt_linear, lrt_linear_backward, naive_lrt_linear
from sparsevd.ops.noise import draw_seed, lrt_noise

OP = "lrt_linear"
N_SE = 5.0  # statistical bounds, in standard errors (a false alarm about once in 10⁶ runs)
#: fp64 agreement with the fp64 naive math: the reference backend runs the same torch ops; the
#: kernels sum in another order.
FP64_RTOL = {"reference": 1e-12, "triton": 1e-10, "native": 1e-10}


def _naive(xi, clip_threshold=None):
    """y of the naive math on the given noise ξ, as a function of (x, θ, log σ², b)."""
    return lambda *a: naive_lrt_linear(*a, None, clip_threshold, noise=xi)[0]


# ------------------------------------------------------------------ values against the reference
@pytest.mark.parametrize("lead,k,n,with_bias,contiguous", LINEAR_CASES)
def test_forward_equals_reference(device, backend, lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous, device)
    seed = draw_seed(device)
    y, std = lrt_linear(x, w, ls2, b, seed)
    xi = op_noise((*lead, n), seed)
    d = [None if t is None else t.double() for t in (x, w, ls2, b)]
    expected = _naive(xi)(*d)
    assert y.dtype == torch.float32 and std.dtype == torch.float32
    assert_close(y, expected, rtol=1e-4, atol=1e-5, name="y")
    s2 = torch.nn.functional.linear(d[0] ** 2, d[2].exp())
    assert_close(std, torch.sqrt(s2 + 1e-8), rtol=1e-4, atol=1e-6, name="std")
    # fp64 op: the same math on the same noise, to rounding.
    y64, _ = lrt_linear(*d, seed)
    assert_close(y64, expected, rtol=FP64_RTOL[backend], atol=1e-12, name="y fp64")


@pytest.mark.parametrize("lead,k,n,with_bias,contiguous", LINEAR_CASES)
def test_gradients_equal_reference_autograd(device, backend, lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, F64, with_bias, contiguous, device)
    seed = draw_seed(device)
    xi = op_noise((*lead, n), seed)
    g = torch.randn(*lead, n, dtype=F64, device=device)
    y_op, grads_op = grads_of(lambda *a: lrt_linear(*a, seed)[0], x, w, ls2, b, g)
    y_ref, grads_ref = grads_of(_naive(xi), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=FP64_RTOL[backend], atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    # fp32 op against the fp64 reference.
    g32 = g.float()
    _, grads32 = grads_of(lambda *a: lrt_linear(*a, seed)[0],
                        *[None if t is None else t.float() for t in (x, w, ls2, b)], g32)
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads32, grads_ref):
        scale = e.abs().max().item()
        assert a.dtype == torch.float32, name
        assert_close(a, e, rtol=1e-4, atol=1e-5 * scale, name=f"fp32 grad {name}")


def test_op_noise_is_lrt_noise(device):
    """(y − μ)/std of the forward is sparsevd.ops.noise.lrt_noise(seed, y.shape) (the torch
    specification of tl.randn), element by element."""
    x = torch.randn(2, 23, 50, device=device)
    w, ls2, b = linear_inputs((1,), 50, 70, device=device)[1:]
    seed = draw_seed(device)
    y, std = lrt_linear(x, w, ls2, b, seed)
    mu = torch.nn.functional.linear(x.to(F64), w.to(F64), b.to(F64))
    assert_close((y.to(F64) - mu) / std.to(F64), lrt_noise(seed, y.shape), rtol=1e-4, atol=1e-4,
                 name="xi")
    assert_close(op_noise(y.shape, seed), lrt_noise(seed, y.shape), rtol=1e-5, atol=1e-5,
                 name="xi of a unit layer")


def test_same_seed_same_output_new_seed_new_noise(device):
    x = torch.randn(20, 30, device=device)
    w, ls2, b = linear_inputs((1,), 30, 40, device=device)[1:]
    seed = draw_seed(device)
    y1, s1 = lrt_linear(x, w, ls2, b, seed)
    y2, s2 = lrt_linear(x, w, ls2, b, seed.clone())
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    y3, s3 = lrt_linear(x, w, ls2, b, seed + 1)
    assert torch.equal(s1, s3)
    assert (y3 != y1).float().mean() > 0.99


# ------------------------------------------------------------------------------- statistics
def _check_moments(y, mu, var):
    n = y.shape[0]
    z_mean = (y.mean(0) - mu) / torch.sqrt(var / n)
    z_var = (y.var(0) - var) / (var * math.sqrt(2.0 / (n - 1)))
    assert z_mean.abs().max() < N_SE, f"sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"sample variance {z_var.abs().max():.2f} SE off"


def test_sample_moments_big_batch(device):
    """Many identical rows: each output element gets its own ξ; mean μ, variance s² + 1e-8."""
    n_draws, k, n = 4000, 13, 7
    x = torch.randn(1, k, dtype=F64, device=device)
    w = torch.randn(n, k, dtype=F64, device=device)
    ls2 = torch.randn(n, k, dtype=F64, device=device) - 1
    b = 10 * torch.randn(n, dtype=F64, device=device)
    y = SF.lrt_linear(x.expand(n_draws, k), w, ls2, b)
    mu = torch.einsum("k,nk->n", x[0], w) + b
    var = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp()) + 1e-8
    _check_moments(y, mu, var)


def test_sample_moments_over_seeds(device):
    """4000 draws from 100 different seeds (40 identical rows each)."""
    k, n = 5, 3
    x = torch.randn(1, k, dtype=F64, device=device)
    w = torch.randn(n, k, dtype=F64, device=device)
    ls2 = torch.randn(n, k, dtype=F64, device=device) - 1
    b = torch.randn(n, dtype=F64, device=device)
    xs = x.expand(40, k)
    y = torch.cat([lrt_linear(xs, w, ls2, b, draw_seed(device))[0] for _ in range(100)])
    mu = torch.einsum("k,nk->n", x[0], w) + b
    var = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp()) + 1e-8
    _check_moments(y, mu, var)


def test_noise_statistics(device):
    """ξ of the forward: mean 0, variance 1, fourth moment 3, normal CDF (Kolmogorov–Smirnov),
    and no correlation between neighbouring columns, neighbouring rows, or the same element under
    the next seed. Every bound is N_SE standard errors of the statistic."""
    m, n = 256, 512
    seed = draw_seed(device)
    xi = op_noise((m, n), seed)
    flat = xi.reshape(-1)
    cnt = flat.numel()
    se = 1.0 / math.sqrt(cnt)
    assert abs(flat.mean().item()) < N_SE * se
    assert abs(flat.var().item() - 1.0) < N_SE * math.sqrt(2.0) * se
    assert abs((flat**4).mean().item() - 3.0) < N_SE * math.sqrt(96.0) * se
    # Kolmogorov–Smirnov: P(sup|F_n − Φ| > 1.95/√n) ≈ 0.001.
    srt, _ = torch.sort(flat)
    cdf = 0.5 * (1.0 + torch.erf(srt / math.sqrt(2.0)))
    emp = torch.arange(1, cnt + 1, dtype=F64, device=device) / cnt
    assert (cdf - emp).abs().max().item() < 1.95 * se + 1.0 / cnt
    pairs = {
        "columns": (xi[:, :-1], xi[:, 1:]),
        "rows": (xi[:-1], xi[1:]),
        "next seed": (xi, op_noise((m, n), seed + 1)),
    }
    for name, (a, b) in pairs.items():
        r = (a * b).mean().item()  # E[ξ_i ξ_j] = 0 for independent standard normals
        assert abs(r) < N_SE / math.sqrt(a.numel()), f"correlation between {name}: {r}"


# ------------------------------------------------------------------------------ empty shapes
@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch(device, lead):
    w, ls2, b = (t.requires_grad_() for t in linear_inputs((1,), 5, 7, device=device)[1:])
    x = torch.randn(*lead, 5, device=device, requires_grad=True)
    y, std = lrt_linear(x, w, ls2, b, draw_seed(device))
    assert y.shape == (*lead, 7) and std.shape == (*lead, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w, ls2, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_zero_out_features(device):
    """N = 0: empty y and std, ∂x = 0, empty ∂θ, ∂log σ², ∂b."""
    w, ls2, b = (t.requires_grad_() for t in linear_inputs((1,), 5, 0, device=device)[1:])
    x = torch.randn(2, 3, 5, device=device, requires_grad=True)
    y, std = lrt_linear(x, w, ls2, b, draw_seed(device))
    assert y.shape == std.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and w.grad.shape == (0, 5) and b.grad.shape == (0,)


def test_zero_in_features(device):
    """K = 0: y = b + sqrt(1e-8)·ξ; ∂θ, ∂log σ², ∂x are empty and ∂b = Σ g."""
    x = torch.randn(6, 0, dtype=F64, device=device)
    w, ls2, b = linear_inputs((1,), 0, 5, F64, device=device)[1:]
    seed = draw_seed(device)
    g = torch.randn(6, 5, dtype=F64, device=device)
    y, grads = grads_of(lambda *a: lrt_linear(*a, seed)[0], x, w, ls2, b, g)
    assert_close(y, b + 1e-4 * op_noise((6, 5), seed), rtol=1e-6, atol=1e-12, name="y")
    assert [t.shape for t in grads[:3]] == [(6, 0), (5, 0), (5, 0)]
    assert_close(grads[3], g.sum(0), rtol=1e-12, atol=1e-12, name="grad bias")


# ------------------------------------------------------------------------ gradcheck, opcheck
def test_gradcheck(device):
    x, w, ls2, b = linear_inputs((3,), 4, 5, F64, True, device=device)
    seed = draw_seed(device)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs,
                                    eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda *a: lrt_linear(*a, None, seed)[0], inputs[:3],
                                    eps=1e-6, atol=1e-6)


def test_gradcheck_3d_noncontiguous(device):
    x, w, ls2, b = linear_inputs((2, 3), 4, 3, F64, True, contiguous=False, device=device)
    seed = draw_seed(device)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs,
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_opcheck_forward_and_backward(device, dtype):
    for lead, with_bias in (((3,), True), ((2, 3), False)):
        x, w, ls2, b = linear_inputs(lead, 4, 5, dtype, with_bias, device=device)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = draw_seed(device)
        torch.library.opcheck(lrt_linear, (x, w, ls2, b, seed))
        y, std = lrt_linear(x, w, ls2, b, seed)
        torch.library.opcheck(
            lrt_linear_backward,
            (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed),
        )


# ------------------------------------------------------------------ train-time clipping
@pytest.mark.parametrize("lead,k,n,dead_rows,dead_cols", LINEAR_CLIP_CASES)
def test_clip_threshold_equals_reference(device, backend, linear_small_tiles, lead, k, n, dead_rows,
                                         dead_cols):
    """Train-time clipping: forward and gradients equal the reference with the mask applied
    (θ ⊙ m, σ² ⊙ m) on identical noise; the clipped weights get exactly zero LRT gradients, the
    dead output rows y = b + 1e-4 ξ. fp64 inputs (to rounding) and fp32 (to fp32 rounding).
    Triton: small tiles (linear_small_tiles), with whole dead weight tiles in CLIP_TILE_CASES."""
    x, w, ls2, b = linear_inputs(lead, k, n, F64, True, True, device)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    m = W.eval_mask(w, ls2, thr)
    assert 0 < int(m.sum()) < m.numel()
    seed = draw_seed(device)
    xi = op_noise((*lead, n), seed)
    g = torch.randn(*lead, n, dtype=F64, device=device)
    y_op, grads_op = grads_of(lambda *a: lrt_linear(*a, seed, thr)[0], x, w, ls2, b, g)
    y_ref, grads_ref = grads_of(_naive(xi, thr), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=FP64_RTOL[backend], atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    assert torch.all(grads_op[1][~m] == 0) and torch.all(grads_op[2][~m] == 0)
    if dead_rows:
        rows = list(dead_rows)
        assert_close(y_op[..., rows], b[rows] + math.sqrt(1e-8) * xi[..., rows], rtol=1e-10,
                     atol=1e-12, name="dead rows")
    # fp32 against the fp64 reference; first-layer case (no ∂x) too
    x32, w32, ls32, b32 = (t.float() for t in (x, w, ls2, b))
    y32, std32 = lrt_linear(x32, w32, ls32, b32, seed, thr)
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")
    gx, gw, gl, gb = lrt_linear_backward(g.float(), x32, w32, ls32, std32, seed, False, thr)
    assert gx.numel() == 0
    for name, a, e in zip(("weight", "log_sigma2", "bias"), (gw, gl, gb), grads_ref[1:]):
        assert_close(a, e, rtol=1e-3, atol=1e-4, name=f"grad {name} fp32")
    assert torch.all(gw[~m] == 0) and torch.all(gl[~m] == 0)


def test_clip_threshold_none_is_no_clipping_and_everything_clipped(device):
    x, w, ls2, b = linear_inputs((6,), 9, 5, F64, True, True, device)
    seed = draw_seed(device)
    y0, _ = lrt_linear(x, w, ls2, b, seed)
    y_far, _ = lrt_linear(x, w, ls2, b, seed, 11.0)  # log α ≤ 10 < 11: nothing clipped
    assert torch.equal(y0, y_far)
    y_all, std = lrt_linear(x, w, ls2, b, seed, -11.0)  # everything clipped
    xi = op_noise((6, 5), seed)
    assert_close(y_all, b + math.sqrt(1e-8) * xi, rtol=1e-10, atol=1e-12, name="all clipped")
    gx, gw, gl, gb = lrt_linear_backward(torch.randn_like(y_all), x, w, ls2, std, seed, True,
                                             -11.0)
    assert torch.all(gx == 0) and torch.all(gw == 0) and torch.all(gl == 0) and torch.all(gb != 0)


def test_clip_threshold_gradcheck_and_opcheck(device):
    x, w, ls2, b = linear_inputs((4,), 6, 5, F64, True, True, device)
    thr = clip_case(w, ls2, (1,), (2,))
    seed = draw_seed(device)
    leaves = tuple(t.requires_grad_() for t in (x, w, ls2, b))
    assert torch.autograd.gradcheck(lambda *a: lrt_linear(*a, seed, thr)[0], leaves)
    torch.library.opcheck(lrt_linear, (*leaves, seed, thr))
    y, std = lrt_linear(*leaves, seed, thr)
    torch.library.opcheck(lrt_linear_backward,
                          (torch.randn_like(y), *(t.detach() for t in leaves[:3]), std.detach(),
                           seed, True, thr))


def test_clip_threshold_rounding_and_zero_weights(device, backend):
    """The mask is clip_mask's to the last bit at the threshold: θ = 0 (log σ² = −3) and
    log σ² = 20 both give log α = 10 (the clamp), and the threshold 10 + 1e-7 rounds to 10 in
    fp32 (torch compares an fp32 tensor with a Python float in fp32) but not in fp64, so those
    weights are dropped in fp32 and kept in fp64."""
    thr = 10.0 + 1e-7
    for dtype in (torch.float32, F64):
        x, w, ls2, b = linear_inputs((6,), 9, 5, dtype, True, True, device)
        w[0, :3] = 0.0
        ls2[0, :3] = -3.0
        ls2[1] = 20.0
        keep = W.eval_mask(w, ls2, thr)
        assert keep[1].any() == (dtype == F64) and keep[0, :3].any() == (dtype == F64)
        seed = draw_seed(device)
        g = torch.randn(6, 5, dtype=dtype, device=device)
        xi = op_noise((6, 5), seed)
        y_op, grads_op = grads_of(lambda *a: lrt_linear(*a, seed, thr)[0], x, w, ls2, b, g)
        y_ref, grads_ref = grads_of(_naive(xi.to(dtype), thr), x, w, ls2, b, g)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
        assert_close(y_op, y_ref, **tol, name=f"y {dtype}")
        for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
            assert_close(a, e, **tol, name=f"grad {name} {dtype}")
        assert torch.equal(grads_op[1] == 0, grads_ref[1] == 0)


def test_functional_clip_threshold_is_validated(device):
    x, w, ls2, b = linear_inputs((3,), 4, 2, torch.float32, True, True, device)
    for bad, exc in ((float("nan"), ValueError), ("3", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="clip_threshold"):
            SF.lrt_linear(x, w, ls2, b, clip_threshold=bad)


# ---------------------------------------------------------------------------- torch.compile
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = sparsevd.nn.LinearSVDO(12, 16)
        self.fc2 = sparsevd.nn.LinearSVDO(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_torch_compile_fullgraph(device):
    """A 2-layer LinearSVDO MLP compiles with fullgraph=True (no graph break: the ops have fake
    impls, the seed is drawn inside the graph) and gives eager's outputs and gradients under the
    same torch seed."""
    model = _MLP().to(device)
    x = torch.randn(8, 12, device=device)

    def loss_fn(m):
        out = m(x)
        return out, out.square().sum()

    compiled_equals_eager(model, loss_fn)


# ------------------------------------------------------------------------ naive math by hand
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("with_bias", [True, False])
def test_naive_given_noise_elementwise(lead, with_bias):
    k, n = 7, 4
    x = torch.randn(*lead, k, dtype=F64)
    w = torch.randn(n, k, dtype=F64)
    ls2 = torch.randn(n, k, dtype=F64) - 2
    b = torch.randn(n, dtype=F64) if with_bias else None
    xi = torch.randn(*lead, n, dtype=F64)
    got = naive_lrt_linear(x, w, ls2, b, None, noise=xi)[0]
    # Independent computation: explicit sums per output element.
    xs, xis = x.reshape(-1, k), xi.reshape(-1, n)
    expected = torch.empty(xs.shape[0], n, dtype=F64)
    for r in range(xs.shape[0]):
        for j in range(n):
            mu = math.fsum(xs[r, i].item() * w[j, i].item() for i in range(k))
            mu += 0.0 if b is None else b[j].item()
            s2 = math.fsum(xs[r, i].item() ** 2 * math.exp(ls2[j, i].item()) for i in range(k))
            expected[r, j] = mu + math.sqrt(s2 + 1e-8) * xis[r, j].item()
    assert_close(got, expected.reshape(*lead, n), rtol=1e-12, atol=1e-12, name="naive_lrt_linear")


def test_naive_sample_moments():
    n_draws, k, n = 4000, 11, 9
    x = torch.randn(1, k, dtype=F64)
    w = torch.randn(n, k, dtype=F64)
    ls2 = torch.randn(n, k, dtype=F64) - 1
    b = 10 * torch.randn(n, dtype=F64)  # large: a bias leaking into s² would show
    y = naive_lrt_linear(x.expand(n_draws, k), w, ls2, b, None, noise=torch.randn(n_draws, n, dtype=F64))[0]
    mu = torch.einsum("k,nk->n", x[0], w) + b
    s2 = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp())
    _check_moments(y, mu, s2 + 1e-8)
