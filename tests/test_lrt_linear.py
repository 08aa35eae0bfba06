"""The op family ``lrt_linear`` (sparsevd.ops.lrt: ``sparsevd::lrt_linear`` and its backward) on
every backend that runs here, against the reference math (sparsevd.reference) on identical noise:
values, gradients, noise, statistics, gradcheck, opcheck, empty shapes and torch.compile.

Backend-specific tests (tiles, launches, GPU compilation): test_lrt_linear_<backend>.py.
"""
import math

import pytest
import torch
from conftest import assert_close
from sample_inputs import (CLIP_TILE_CASES, CLIP_TILES, F64, LINEAR_CASES, backends_for, clip_case,
                           dead_tiles, device_for, fresh_seed, linear_inputs, op_noise)

import sparsevd
import sparsevd.functional as SF
from sparsevd import ops
from sparsevd import reference as R
from sparsevd.ops.noise import lrt_noise

N_SE = 5.0  # statistical bounds, in standard errors (a false alarm about once in 10⁶ runs)
BACKENDS = backends_for("lrt_linear")
#: fp64 agreement with the fp64 reference: the reference backend runs the same torch ops; the
#: kernels sum in another order.
FP64_RTOL = {"reference": 1e-12, "triton": 1e-10, "native": 1e-10}


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    """Every test of this module runs once per backend (SPARSEVD_BACKEND)."""
    monkeypatch.setenv("SPARSEVD_BACKEND", request.param)
    return request.param


@pytest.fixture
def dev(backend):
    """The device of the backend's tensors (sample_inputs.device_for)."""
    return device_for(backend)


def _grads(fn, x, w, ls2, b, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, ls2)]
    bl = None if b is None else b.detach().clone().requires_grad_()
    y = fn(*leaves, bl)
    (y * g).sum().backward()
    return y, [t.grad for t in leaves] + ([] if bl is None else [bl.grad])


# ------------------------------------------------------------------ values against the reference
@pytest.mark.parametrize("lead,k,n,with_bias,contiguous", LINEAR_CASES)
def test_forward_equals_reference(dev, backend, lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous, dev)
    seed = fresh_seed(dev)
    y, std = ops.lrt_linear(x, w, ls2, b, seed)
    xi = op_noise((*lead, n), seed)
    d = [None if t is None else t.double() for t in (x, w, ls2, b)]
    expected = R.lrt_linear(*d, xi)
    assert y.dtype == torch.float32 and std.dtype == torch.float32
    assert_close(y, expected, rtol=1e-4, atol=1e-5, name="y")
    s2 = torch.nn.functional.linear(d[0] ** 2, d[2].exp())
    assert_close(std, torch.sqrt(s2 + 1e-8), rtol=1e-4, atol=1e-6, name="std")
    # fp64 op: the same math on the same noise, to rounding.
    y64, _ = ops.lrt_linear(*d, seed)
    assert_close(y64, expected, rtol=FP64_RTOL[backend], atol=1e-12, name="y fp64")


@pytest.mark.parametrize("lead,k,n,with_bias,contiguous", LINEAR_CASES)
def test_gradients_equal_reference_autograd(dev, backend, lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, F64, with_bias, contiguous, dev)
    seed = fresh_seed(dev)
    xi = op_noise((*lead, n), seed)
    g = torch.randn(*lead, n, dtype=F64, device=dev)
    y_op, grads_op = _grads(lambda *a: ops.lrt_linear(*a, seed)[0], x, w, ls2, b, g)
    y_ref, grads_ref = _grads(lambda *a: R.lrt_linear(*a, xi), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=FP64_RTOL[backend], atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    # fp32 op against the fp64 reference.
    g32 = g.float()
    _, grads32 = _grads(lambda *a: ops.lrt_linear(*a, seed)[0],
                        *[None if t is None else t.float() for t in (x, w, ls2, b)], g32)
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads32, grads_ref):
        scale = e.abs().max().item()
        assert a.dtype == torch.float32, name
        assert_close(a, e, rtol=1e-4, atol=1e-5 * scale, name=f"fp32 grad {name}")


def test_op_noise_is_lrt_noise(dev):
    """(y − μ)/std of the forward is sparsevd.ops.lrt_noise(seed, y.shape) (the torch
    specification of tl.randn), element by element."""
    x = torch.randn(2, 23, 50, device=dev)
    w, ls2, b = linear_inputs((1,), 50, 70, device=dev)[1:]
    seed = fresh_seed(dev)
    y, std = ops.lrt_linear(x, w, ls2, b, seed)
    mu = torch.nn.functional.linear(x.to(F64), w.to(F64), b.to(F64))
    assert_close((y.to(F64) - mu) / std.to(F64), lrt_noise(seed, y.shape), rtol=1e-4, atol=1e-4,
                 name="xi")
    assert_close(op_noise(y.shape, seed), lrt_noise(seed, y.shape), rtol=1e-5, atol=1e-5,
                 name="xi of a unit layer")


def test_same_seed_same_output_new_seed_new_noise(dev):
    x = torch.randn(20, 30, device=dev)
    w, ls2, b = linear_inputs((1,), 30, 40, device=dev)[1:]
    seed = fresh_seed(dev)
    y1, s1 = ops.lrt_linear(x, w, ls2, b, seed)
    y2, s2 = ops.lrt_linear(x, w, ls2, b, seed.clone())
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    y3, s3 = ops.lrt_linear(x, w, ls2, b, seed + 1)
    assert torch.equal(s1, s3)
    assert (y3 != y1).float().mean() > 0.99


# ------------------------------------------------------------------------------- statistics
def _check_moments(y, mu, var):
    n = y.shape[0]
    z_mean = (y.mean(0) - mu) / torch.sqrt(var / n)
    z_var = (y.var(0) - var) / (var * math.sqrt(2.0 / (n - 1)))
    assert z_mean.abs().max() < N_SE, f"sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"sample variance {z_var.abs().max():.2f} SE off"


def test_sample_moments_big_batch(dev):
    """Many identical rows: each output element gets its own ξ; mean μ, variance s² + 1e-8."""
    n_draws, k, n = 4000, 13, 7
    x = torch.randn(1, k, dtype=F64, device=dev)
    w = torch.randn(n, k, dtype=F64, device=dev)
    ls2 = torch.randn(n, k, dtype=F64, device=dev) - 1
    b = 10 * torch.randn(n, dtype=F64, device=dev)
    y = SF.lrt_linear(x.expand(n_draws, k), w, ls2, b)
    mu = torch.einsum("k,nk->n", x[0], w) + b
    var = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp()) + 1e-8
    _check_moments(y, mu, var)


def test_sample_moments_over_seeds(dev):
    """4000 draws from 100 different seeds (40 identical rows each)."""
    k, n = 5, 3
    x = torch.randn(1, k, dtype=F64, device=dev)
    w = torch.randn(n, k, dtype=F64, device=dev)
    ls2 = torch.randn(n, k, dtype=F64, device=dev) - 1
    b = torch.randn(n, dtype=F64, device=dev)
    xs = x.expand(40, k)
    y = torch.cat([ops.lrt_linear(xs, w, ls2, b, fresh_seed(dev))[0] for _ in range(100)])
    mu = torch.einsum("k,nk->n", x[0], w) + b
    var = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp()) + 1e-8
    _check_moments(y, mu, var)


def test_noise_statistics(dev):
    """ξ of the forward: mean 0, variance 1, fourth moment 3, normal CDF (Kolmogorov–Smirnov),
    and no correlation between neighbouring columns, neighbouring rows, or the same element under
    the next seed. Every bound is N_SE standard errors of the statistic."""
    m, n = 256, 512
    seed = fresh_seed(dev)
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
    emp = torch.arange(1, cnt + 1, dtype=F64, device=dev) / cnt
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
def test_empty_batch(dev, lead):
    w, ls2, b = (t.requires_grad_() for t in linear_inputs((1,), 5, 7, device=dev)[1:])
    x = torch.randn(*lead, 5, device=dev, requires_grad=True)
    y, std = ops.lrt_linear(x, w, ls2, b, fresh_seed(dev))
    assert y.shape == (*lead, 7) and std.shape == (*lead, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w, ls2, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_zero_out_features(dev):
    """N = 0: empty y and std, ∂x = 0, empty ∂θ, ∂log σ², ∂b."""
    w, ls2, b = (t.requires_grad_() for t in linear_inputs((1,), 5, 0, device=dev)[1:])
    x = torch.randn(2, 3, 5, device=dev, requires_grad=True)
    y, std = ops.lrt_linear(x, w, ls2, b, fresh_seed(dev))
    assert y.shape == std.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and w.grad.shape == (0, 5) and b.grad.shape == (0,)


def test_zero_in_features(dev):
    """K = 0: y = b + sqrt(1e-8)·ξ; ∂θ, ∂log σ², ∂x are empty and ∂b = Σ g."""
    x = torch.randn(6, 0, dtype=F64, device=dev)
    w, ls2, b = linear_inputs((1,), 0, 5, F64, device=dev)[1:]
    seed = fresh_seed(dev)
    g = torch.randn(6, 5, dtype=F64, device=dev)
    y, grads = _grads(lambda *a: ops.lrt_linear(*a, seed)[0], x, w, ls2, b, g)
    assert_close(y, b + 1e-4 * op_noise((6, 5), seed), rtol=1e-6, atol=1e-12, name="y")
    assert [t.shape for t in grads[:3]] == [(6, 0), (5, 0), (5, 0)]
    assert_close(grads[3], g.sum(0), rtol=1e-12, atol=1e-12, name="grad bias")


# ------------------------------------------------------------------------ gradcheck, opcheck
def test_gradcheck(dev):
    x, w, ls2, b = linear_inputs((3,), 4, 5, F64, True, device=dev)
    seed = fresh_seed(dev)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs,
                                    eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda *a: ops.lrt_linear(*a, None, seed)[0], inputs[:3],
                                    eps=1e-6, atol=1e-6)


def test_gradcheck_3d_noncontiguous(dev):
    x, w, ls2, b = linear_inputs((2, 3), 4, 3, F64, True, contiguous=False, device=dev)
    seed = fresh_seed(dev)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs,
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_opcheck_forward_and_backward(dev, dtype):
    for lead, with_bias in (((3,), True), ((2, 3), False)):
        x, w, ls2, b = linear_inputs(lead, 4, 5, dtype, with_bias, device=dev)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = fresh_seed(dev)
        torch.library.opcheck(ops.lrt_linear, (x, w, ls2, b, seed))
        y, std = ops.lrt_linear(x, w, ls2, b, seed)
        torch.library.opcheck(
            ops.lrt_linear_backward,
            (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed),
        )


# ------------------------------------------------------------------ train-time clipping
#: (lead, in_features, out_features, dead output rows, dead input columns)
CLIP_CASES = [
    ((5,), 7, 4, (), ()),
    ((33,), 123, 17, (0, 5, 16), (1, 2, 64, 122)),
    ((2, 3), 16, 9, (3,), (0,)),
    ((9,), 40, 20, tuple(range(0, 20, 2)), tuple(range(1, 40, 3))),
] + CLIP_TILE_CASES  # whole dead weight tiles at CLIP_TILES


@pytest.fixture
def clip_tiles(backend, monkeypatch):
    """The Triton kernels with CLIP_TILES in groups of 2 row tiles instead of the interpreter's
    32x256x512, so that the clipping cases span several weight tiles (dead and live ones) and K
    steps; the other backends unchanged. Returns the tiles (None for other backends)."""
    if backend != "triton":
        return None
    from sparsevd.ops import triton_impl as TI

    cfg = [TI._config(CLIP_TILES, group_m=2)]
    monkeypatch.setattr(TI, "_fwd_kernel", TI._autotuned(TI.K.lrt_linear_fwd_kernel, "fwd", cfg))
    monkeypatch.setattr(TI, "_bwd_kernel", TI._autotuned(TI.K.lrt_linear_bwd_kernel, "bwd", cfg))
    return CLIP_TILES


@pytest.mark.parametrize("lead,k,n,dead_rows,dead_cols", CLIP_CASES)
def test_clip_threshold_equals_reference(dev, backend, clip_tiles, lead, k, n, dead_rows, dead_cols):
    """Train-time clipping: forward and gradients equal the reference with the mask applied
    (θ ⊙ m, σ² ⊙ m) on identical noise; the clipped weights get exactly zero LRT gradients, the
    dead output rows y = b + 1e-4 ξ. fp64 inputs (to rounding) and fp32 (to fp32 rounding).
    Triton: small tiles (clip_tiles), with whole dead weight tiles in CLIP_TILE_CASES."""
    x, w, ls2, b = linear_inputs(lead, k, n, F64, True, True, dev)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    m = R.eval_mask(w, ls2, thr)
    assert 0 < int(m.sum()) < m.numel()
    seed = fresh_seed(dev)
    xi = op_noise((*lead, n), seed)
    g = torch.randn(*lead, n, dtype=F64, device=dev)
    y_op, grads_op = _grads(lambda *a: ops.lrt_linear(*a, seed, thr)[0], x, w, ls2, b, g)
    y_ref, grads_ref = _grads(lambda *a: R.lrt_linear(*a, xi, clip_threshold=thr), x, w, ls2, b, g)
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
    y32, std32 = ops.lrt_linear(x32, w32, ls32, b32, seed, thr)
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")
    gx, gw, gl, gb = ops.lrt_linear_backward(g.float(), x32, w32, ls32, std32, seed, False, thr)
    assert gx.numel() == 0
    for name, a, e in zip(("weight", "log_sigma2", "bias"), (gw, gl, gb), grads_ref[1:]):
        assert_close(a, e, rtol=1e-3, atol=1e-4, name=f"grad {name} fp32")
    assert torch.all(gw[~m] == 0) and torch.all(gl[~m] == 0)


def test_clip_threshold_none_is_no_clipping_and_everything_clipped(dev):
    x, w, ls2, b = linear_inputs((6,), 9, 5, F64, True, True, dev)
    seed = fresh_seed(dev)
    y0, _ = ops.lrt_linear(x, w, ls2, b, seed)
    y_far, _ = ops.lrt_linear(x, w, ls2, b, seed, 11.0)  # log α ≤ 10 < 11: nothing clipped
    assert torch.equal(y0, y_far)
    y_all, std = ops.lrt_linear(x, w, ls2, b, seed, -11.0)  # everything clipped
    xi = op_noise((6, 5), seed)
    assert_close(y_all, b + math.sqrt(1e-8) * xi, rtol=1e-10, atol=1e-12, name="all clipped")
    gx, gw, gl, gb = ops.lrt_linear_backward(torch.randn_like(y_all), x, w, ls2, std, seed, True,
                                             -11.0)
    assert torch.all(gx == 0) and torch.all(gw == 0) and torch.all(gl == 0) and torch.all(gb != 0)


def test_clip_threshold_gradcheck_and_opcheck(dev):
    x, w, ls2, b = linear_inputs((4,), 6, 5, F64, True, True, dev)
    thr = clip_case(w, ls2, (1,), (2,))
    seed = fresh_seed(dev)
    leaves = tuple(t.requires_grad_() for t in (x, w, ls2, b))
    assert torch.autograd.gradcheck(lambda *a: ops.lrt_linear(*a, seed, thr)[0], leaves)
    torch.library.opcheck(ops.lrt_linear, (*leaves, seed, thr))
    y, std = ops.lrt_linear(*leaves, seed, thr)
    torch.library.opcheck(ops.lrt_linear_backward,
                          (torch.randn_like(y), *(t.detach() for t in leaves[:3]), std.detach(),
                           seed, True, thr))


def test_clip_threshold_rounding_and_zero_weights(dev, backend):
    """The mask is clip_mask's to the last bit at the threshold: θ = 0 (log σ² = −3) and
    log σ² = 20 both give log α = 10 (the clamp), and the threshold 10 + 1e-7 rounds to 10 in
    fp32 (torch compares an fp32 tensor with a Python float in fp32) but not in fp64, so those
    weights are dropped in fp32 and kept in fp64."""
    thr = 10.0 + 1e-7
    for dtype in (torch.float32, F64):
        x, w, ls2, b = linear_inputs((6,), 9, 5, dtype, True, True, dev)
        w[0, :3] = 0.0
        ls2[0, :3] = -3.0
        ls2[1] = 20.0
        keep = R.eval_mask(w, ls2, thr)
        assert keep[1].any() == (dtype == F64) and keep[0, :3].any() == (dtype == F64)
        seed = fresh_seed(dev)
        g = torch.randn(6, 5, dtype=dtype, device=dev)
        xi = op_noise((6, 5), seed)
        y_op, grads_op = _grads(lambda *a: ops.lrt_linear(*a, seed, thr)[0], x, w, ls2, b, g)
        y_ref, grads_ref = _grads(lambda *a: R.lrt_linear(*a, xi.to(dtype), clip_threshold=thr),
                                  x, w, ls2, b, g)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
        assert_close(y_op, y_ref, **tol, name=f"y {dtype}")
        for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
            assert_close(a, e, **tol, name=f"grad {name} {dtype}")
        assert torch.equal(grads_op[1] == 0, grads_ref[1] == 0)


def _nan_alloc(monkeypatch):
    """Every floating tensor that torch.empty, torch.empty_like and Tensor.new_empty allocate
    from now on starts as NaN: outputs a kernel leaves unwritten show up."""
    def filled(fn):
        def alloc(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return alloc

    monkeypatch.setattr(torch, "empty", filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", filled(torch.Tensor.new_empty))


def _clip_run(x, w, ls2, b, seed, thr, g, need_grad_x=True):
    y, std = ops.lrt_linear(x, w, ls2, b, seed, thr)
    return (y, std, *ops.lrt_linear_backward(g, x, w, ls2, std, seed, need_grad_x, thr))


@pytest.mark.parametrize("need_grad_x", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("lead,k,n,dead_rows,dead_cols", CLIP_TILE_CASES + [((5,), 7, 4, (), ())])
def test_clip_tile_skipping_equals_no_skipping(dev, backend, clip_tiles, monkeypatch, need_grad_x,
                                               lead, k, n, dead_rows, dead_cols):
    """Triton: skipping the all-dropped weight tiles (default) gives bit for bit what the kernels
    give without skipping (SPARSEVD_TRITON_CLIP_SKIP=0); the skipping path is taken exactly for
    the dead tiles (count_skipped_tiles: forward K steps and ∂x N steps once per row tile, dead
    ∂θ programs once each); every element of every output is written (NaN-filled allocations)
    and the dropped weights' gradients are exactly 0."""
    if backend != "triton":
        pytest.skip("dead-tile skipping is a Triton kernel feature")
    from sparsevd.ops import triton_impl as TI

    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, True, True, dev)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    keep = R.eval_mask(w, ls2, thr)
    seed = fresh_seed(dev)
    g = torch.randn(*lead, n, device=dev)
    _nan_alloc(monkeypatch)
    monkeypatch.setenv(TI.CLIP_SKIP_ENV, "1")
    with TI.count_skipped_tiles(dev) as skipped:
        out = _clip_run(x, w, ls2, b, seed, thr, g, need_grad_x)
    monkeypatch.setenv(TI.CLIP_SKIP_ENV, "0")
    with TI.count_skipped_tiles(dev) as not_skipped:
        out_ref = _clip_run(x, w, ls2, b, seed, thr, g, need_grad_x)
    names = ("y", "std", "grad x", "grad weight", "grad log_sigma2", "grad bias")
    for name, a, e in zip(names, out, out_ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
        assert torch.equal(a, e), f"{name}: skipping changed the result"
    assert torch.all(out[3][~keep] == 0) and torch.all(out[4][~keep] == 0)
    bm, bn, bk = clip_tiles[:3]
    dead = dead_tiles(keep, bn, bk)
    row_tiles = -(-math.prod(lead) // bm)
    assert (dead > 0) == bool(dead_rows or dead_cols)  # the cases are what they claim
    assert skipped.tolist() == [row_tiles * dead, row_tiles * dead * need_grad_x, dead]
    assert not_skipped.tolist() == [0, 0, 0]


def test_clip_tile_skipping_all_dead_and_none_dead(dev, backend, clip_tiles):
    """Triton: every tile dead (threshold −11: y = b + 1e-4 ξ, ∂x = ∂θ = ∂log σ² = 0, ∂b = Σ g)
    and no tile dead (threshold 11: the unclipped kernels' results, bit for bit)."""
    if backend != "triton":
        pytest.skip("dead-tile skipping is a Triton kernel feature")
    from sparsevd.ops import triton_impl as TI

    lead, k, n = (20,), 70, 40
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, True, True, dev)
    seed = fresh_seed(dev)
    g = torch.randn(*lead, n, device=dev)
    bm, bn, bk = clip_tiles[:3]
    tiles = -(-n // bn) * -(-k // bk)
    with TI.count_skipped_tiles(dev) as skipped:
        y, std, gx, gw, gl, gb = _clip_run(x, w, ls2, b, seed, -11.0, g)
    assert skipped.tolist() == [2 * tiles, 2 * tiles, tiles]
    xi = op_noise(y.shape, seed)
    assert_close(y, b + math.sqrt(1e-8) * xi, rtol=1e-6, atol=1e-7, name="all dead")
    assert torch.all(gx == 0) and torch.all(gw == 0) and torch.all(gl == 0)
    assert_close(gb, g.sum(0), rtol=1e-5, atol=1e-6, name="grad bias")
    with TI.count_skipped_tiles(dev) as skipped:
        clipped = _clip_run(x, w, ls2, b, seed, 11.0, g)
    assert skipped.tolist() == [0, 0, 0]
    for a, e in zip(clipped, _clip_run(x, w, ls2, b, seed, None, g)):
        assert torch.equal(a, e)


def test_clip_skip_env_is_validated(dev, backend, monkeypatch):
    """Triton: SPARSEVD_TRITON_CLIP_SKIP takes 0 or 1; another value is an error naming it (only
    clipped calls read it)."""
    if backend != "triton":
        pytest.skip("a Triton backend setting")
    from sparsevd.ops import triton_impl as TI

    x, w, ls2, b = linear_inputs((3,), 4, 2, torch.float32, True, True, dev)
    monkeypatch.setenv(TI.CLIP_SKIP_ENV, "yes")
    with pytest.raises(ValueError, match=TI.CLIP_SKIP_ENV):
        ops.lrt_linear(x, w, ls2, b, fresh_seed(dev), 0.0)
    ops.lrt_linear(x, w, ls2, b, fresh_seed(dev))  # unclipped: not read


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0·inf
def test_clip_tile_skipping_keeps_nonfinite_inputs(dev, backend, clip_tiles, monkeypatch):
    """Triton: an inf in x (or g) that meets only dropped weights still makes its rows NaN, as
    0·inf does in the dots without skipping and in the reference (F.linear with θ ⊙ m)."""
    if backend != "triton":
        pytest.skip("dead-tile skipping is a Triton kernel feature")
    from sparsevd.ops import triton_impl as TI

    lead, k, n, dead_rows, dead_cols = CLIP_TILE_CASES[0]
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, True, True, dev)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    x[3, 5] = float("inf")  # column 5: in the dead column block
    seed = fresh_seed(dev)
    g = torch.randn(*lead, n, device=dev)
    g[7, 40] = float("inf")  # output 40: in the dead row block
    outs = []
    for skip in ("1", "0"):
        monkeypatch.setenv(TI.CLIP_SKIP_ENV, skip)
        outs.append(_clip_run(x, w, ls2, b, seed, thr, g))
    for a, e in zip(*outs):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num())
    y, gx = outs[0][0], outs[0][2]
    wm, s2m = R.clip_parameters(w, ls2, thr)
    y_ref = torch.nn.functional.linear(x, wm, b)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y[3].isnan().all()
    assert gx[7].isnan().all()


@pytest.mark.parametrize("case", [0, 2])
def test_clip_tile_gradcheck_and_opcheck(dev, backend, clip_tiles, case):
    """fp64 gradcheck (fast mode: random projections) and opcheck through the kernels on cases
    with whole dead weight tiles."""
    lead, k, n, dead_rows, dead_cols = CLIP_TILE_CASES[case]
    lead = (3,)  # few rows: the check's cost grows with the batch
    x, w, ls2, b = linear_inputs(lead, k, n, F64, True, True, dev)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    seed = fresh_seed(dev)
    leaves = tuple(t.requires_grad_() for t in (x, w, ls2, b))
    assert torch.autograd.gradcheck(lambda *a: ops.lrt_linear(*a, seed, thr)[0], leaves,
                                    fast_mode=True)
    if case == 0:
        torch.library.opcheck(ops.lrt_linear, (*leaves, seed, thr))
        y, std = ops.lrt_linear(*leaves, seed, thr)
        torch.library.opcheck(ops.lrt_linear_backward,
                              (torch.randn_like(y), *(t.detach() for t in leaves[:3]), std.detach(),
                               seed, False, thr))


def test_functional_clip_threshold_is_validated(dev):
    x, w, ls2, b = linear_inputs((3,), 4, 2, torch.float32, True, True, dev)
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


def test_torch_compile_fullgraph(dev):
    """A 2-layer LinearSVDO MLP compiles with fullgraph=True (no graph break: the ops have fake
    impls, the seed is drawn inside the graph) and gives eager's outputs and gradients under the
    same torch seed. aot_eager runs AOTAutograd (forward and backward graphs) without Inductor's
    C++ build."""
    torch._dynamo.reset()
    model = _MLP().to(dev)
    x = torch.randn(8, 12, device=dev)

    def step(fn):
        model.zero_grad()
        torch.manual_seed(1234)
        out = fn(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c, grads_c = step(compiled)
    out_e, grads_e = step(model)
    assert_close(out_c, out_e, rtol=1e-5, atol=1e-6, name="compiled output")
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, rtol=1e-5, atol=1e-6, name="compiled grad")
