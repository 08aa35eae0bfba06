"""The ``native`` backend of ``lrt_linear`` (csrc/cpu/lrt_linear_cpu.cpp and the weight pass it shares
with lrt_conv2d, csrc/cpu/lrt_common_cpu.cpp; sparsevd/ops/lrt_linear/native.py) against the naive
math (the reference backend, called directly) and fp64 oracles on IDENTICAL noise: what is
particular to the compiled CPU kernels. Every kernel set this CPU runs (AVX-512, AVX2, portable) is
tested where results could differ between them (``isa``); shapes at the kernels' vector, chunk and
parallel-grain boundaries (sample_inputs.LINEAR_BOUNDARY_CASES); empty shapes; bf16 and CPU bf16
autocast; the σ² cache; train-time clipping (in-kernel masks, compaction of dead rows and columns,
sparse products, the occupancy hook; ``compact``); threads and product modes; the eager C++
autograd path against the custom op, bit for bit; argument checks. The tests every backend passes
are in test_lrt_linear.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, close, eager_and_custom_op, grad_scale, with_compact
from sample_inputs import CLIP_STRUCTURE_CASES, F64, LINEAR_BOUNDARY_CASES, clip_case, linear_inputs

import sparsevd
import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.lrt_linear import lrt_linear, naive_lrt_linear, naive_lrt_linear_backward
from sparsevd.ops.noise import draw_seed, lrt_noise

N = pytest.importorskip("sparsevd.ops.lrt_linear.native", reason="native backend unavailable")

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "native")


def _fwd_both(x, w, ls2, b, seed):
    return naive_lrt_linear(x, w, ls2, b, seed), N.native_lrt_linear(x, w, ls2, b, seed)


def _max_err(a, oracle):
    return float((a.double() - oracle).abs().max())


@pytest.mark.parametrize("lead,k,n", LINEAR_BOUNDARY_CASES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False), (True, False)])
def test_forward_equals_reference(isa, lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous)
    seed = draw_seed()
    (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
    assert y.shape == (*lead, n) and std.shape == (*lead, n)
    assert y.dtype == torch.float32 and std.dtype == torch.float32
    close(std, std_r, 1e-5, "std")
    close(y, y_r, 1e-5, "y", atol_rel=2e-6)
    # fp64: the same math to rounding.
    d = [None if t is None else t.double() for t in (x, w, ls2, b)]
    (y_r64, std_r64), (y64, std64) = _fwd_both(*d, seed)
    assert y64.dtype == F64 and std64.dtype == F64
    close(y64, y_r64, 1e-12, "y fp64")
    close(std64, std_r64, 1e-12, "std fp64")


@pytest.mark.parametrize("lead,k,n", LINEAR_BOUNDARY_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_backward_equals_reference(isa, lead, k, n, with_bias):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous=len(lead) > 1)
    seed = draw_seed()
    _, std = naive_lrt_linear(x, w, ls2, b, seed)
    g = torch.randn(*lead, n)
    ref = naive_lrt_linear_backward(g, x, w, ls2, std, seed)
    got = N.native_lrt_linear_backward(g, x, w, ls2, std, seed)
    names = ("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias")
    for name, a, e in zip(names, got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        close(a, e, 2e-5, name, atol_rel=2e-6, scale=grad_scale(name, g, -1))
    no_dx = N.native_lrt_linear_backward(g, x, w, ls2, std, seed, need_grad_x=False)
    assert no_dx[0].numel() == 0
    for name, a, e in zip(names[1:], no_dx[1:], got[1:]):
        assert torch.equal(a, e), f"without need_grad_x: {name}"
    d = lambda t: t.double()  # noqa: E731
    ref64 = naive_lrt_linear_backward(d(g), d(x), d(w), d(ls2), d(std), seed)
    got64 = N.native_lrt_linear_backward(d(g), d(x), d(w), d(ls2), d(std), seed)
    for name, a, e in zip(names, got64, ref64):
        close(a, e, 1e-11, f"fp64 {name}", scale=grad_scale(name, d(g), -1))


@pytest.mark.parametrize("lead,k,n", [((0,), 5, 7), ((4,), 0, 3), ((4,), 3, 0), ((0, 3), 0, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_empty_shapes(lead, k, n, with_bias):
    """Empty batch, K = 0 (y = b + 1e-4 ξ, grad_bias = Σ g) and N = 0: no crash, the reference's
    results."""
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias)
    seed = draw_seed()
    (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
    assert y.shape == y_r.shape == (*lead, n) and std.shape == (*lead, n)
    assert_close(y, y_r, rtol=1e-6, atol=1e-7, name="y")
    assert_close(std, std_r, rtol=1e-6, atol=1e-7, name="std")
    if k == 0 and y.numel():
        xi = lrt_noise(seed, y.shape)
        expected = (0.0 if b is None else b) + math.sqrt(1e-8) * xi
        assert_close(y, expected, rtol=1e-6, atol=1e-7, name="y for K=0")
    g = torch.randn(*lead, n)
    ref = naive_lrt_linear_backward(g, x, w, ls2, std_r, seed)
    got = N.native_lrt_linear_backward(g, x, w, ls2, std, seed)
    for name, a, e in zip(("gx", "gw", "gls2", "gb"), got, ref):
        assert a.shape == e.shape, name
        assert_close(a, e, rtol=1e-6, atol=1e-6, name=name)
    assert_close(got[3], g.reshape(math.prod(lead), n).sum(0), rtol=1e-6, atol=1e-6, name="grad_bias = Σ g")


def test_gradients_through_autograd_equal_fp64_reference():
    """Gradients of SF.lrt_linear (native) against autograd through sparsevd.reference on the same
    noise, for a hidden layer (x needs a gradient) and a first layer (it does not: the
    backward runs with need_grad_x=False)."""
    for x_grad in (True, False):
        x, w, ls2, b = linear_inputs((2, 7), 23, 19, F64, True, contiguous=False)
        seed = draw_seed()
        xi = lrt_noise(seed, (2, 7, 19)).double()
        g = torch.randn(2, 7, 19, dtype=F64)

        def grads(fn):
            leaves = [x.clone().requires_grad_(x_grad)] + [t.clone().requires_grad_() for t in (w, ls2, b)]
            (fn(*leaves) * g).sum().backward()
            return [t.grad for t in leaves]

        got = grads(lambda *a: SF.lrt_linear(*a, seed=seed))
        ref = grads(lambda *a: naive_lrt_linear(*a, None, noise=xi)[0])
        for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), got, ref):
            if not x_grad and name == "x":
                assert a is None and e is None
                continue
            close(a, e, 1e-10, f"grad {name} (x requires grad: {x_grad})")


def test_bf16_linear_error_at_most_twice_the_reference():
    """Plain bf16 (parameters bf16 too): the native op computes in fp32 internally; its error vs an
    fp64 oracle on the same (bf16) inputs is at most 2x the reference's, computed in bf16."""
    x, w, ls2, b = linear_inputs((37,), 129, 65, BF16)
    seed = draw_seed()
    (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
    assert y.dtype == BF16 and std.dtype == BF16
    d = [t.double() for t in (x, w, ls2, b)]
    xi = lrt_noise(seed, (37, 65)).double()
    oracle = naive_lrt_linear(*d, None, noise=xi)[0]
    std_oracle = torch.sqrt(F.linear(d[0] ** 2, d[2].exp()) + 1e-8)
    assert _max_err(y, oracle) <= 2 * _max_err(y_r, oracle) + 1e-6
    assert _max_err(std, std_oracle) <= 2 * _max_err(std_r, std_oracle) + 1e-6
    # Backward: gradients of the bf16 ops vs fp64 autograd on the bf16 values.
    g = torch.randn(37, 65).to(BF16)
    ref = naive_lrt_linear_backward(g, x, w, ls2, std_r, seed)
    got = N.native_lrt_linear_backward(g, x, w, ls2, std_r, seed)
    leaves = [t.clone().requires_grad_() for t in d]
    (naive_lrt_linear(*leaves, None, noise=xi)[0] * g.double()).sum().backward()
    for name, a, e, o in zip(("x", "weight", "log_sigma2", "bias"), got, ref, leaves):
        assert a.dtype == BF16 and a.shape == e.shape
        assert _max_err(a, o.grad) <= 2 * _max_err(e, o.grad) + 1e-6, name


def test_cpu_autocast_bf16():
    """Under CPU bf16 autocast the op receives bf16 x and fp32 parameters: y in bf16, std in fp32,
    products in fp32; error vs fp64 at most 2x the reference backend's under the same autocast."""
    x, w, ls2, b = linear_inputs((5, 7), 40, 24, torch.float32)
    seed = draw_seed()
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=BF16):
        y, std = lrt_linear(xb, w, ls2, b, seed)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEVD_BACKEND", "reference")
            y_r, std_r = lrt_linear(xb, w, ls2, b, seed)
    assert y.dtype == BF16 and std.dtype == torch.float32 and std_r.dtype == torch.float32
    d = [xb.double(), w.double(), ls2.double(), b.double()]
    xi = lrt_noise(seed, (5, 7, 24)).double()
    oracle = naive_lrt_linear(*d, None, noise=xi)[0]
    assert _max_err(y, oracle) <= 2 * _max_err(y_r, oracle) + 1e-6
    std_oracle = torch.sqrt(F.linear(d[0] ** 2, d[2].exp()) + 1e-8)
    assert _max_err(std, std_oracle) <= 2 * _max_err(std_r, std_oracle) + 1e-7
    # Training through the functional API: gradients of both backends vs fp64 autograd.
    g = torch.randn(5, 7, 24)

    def grads(name):
        leaves = [t.clone().requires_grad_() for t in (x, w, ls2, b)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEVD_BACKEND", name)
            with torch.autocast("cpu", dtype=BF16):
                out = SF.lrt_linear(*leaves, seed=seed)
            (out.float() * g).sum().backward()
        return [t.grad for t in leaves]

    got, ref = grads("native"), grads("reference")
    leaves = [t.clone().requires_grad_() for t in d]
    (naive_lrt_linear(*leaves, None, noise=xi)[0] * g.double()).sum().backward()
    for name, a, e, o in zip(("x", "weight", "log_sigma2", "bias"), got, ref, leaves):
        assert a.dtype == torch.float32
        assert _max_err(a, o.grad) <= 2 * _max_err(e, o.grad) + 1e-6, name


def test_sigma2_cache_reused_by_backward_and_never_stale():
    """The backward reuses the forward's σ² (a hit per backward, no miss); every forward computes
    σ² afresh, so updates — in place, through .data, or by the optimizer — are always seen."""
    torch.ops.sparsevd.native_sigma2_cache(True)  # clears the cache and its counters
    x, w, ls2, b = linear_inputs((8,), 12, 6)
    w.requires_grad_()
    ls2.requires_grad_()
    # A small step on a mean loss: a large one can blow log σ² up to inf on an unlucky draw.
    opt = torch.optim.SGD([w, ls2], lr=0.01)
    for step in range(3):
        seed = draw_seed()
        y = SF.lrt_linear(x, w, ls2, b, seed=seed)
        hits, misses, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
        y.square().mean().backward()
        hits2, misses2, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
        assert (hits2 - hits, misses2 - misses) == (1, 0), "the backward reuses the forward's σ²"
        expected = naive_lrt_linear(x, w.detach(), ls2.detach(), b, seed)[0]
        assert_close(y, expected, rtol=1e-5, atol=1e-6, name=f"y at step {step}")
        opt.step()
        opt.zero_grad()
    for update in (lambda: ls2.data.add_(0.5), lambda: ls2.detach().mul_(0.9)):
        update()  # .data does not bump the version counter; detach() does
        seed = draw_seed()
        assert_close(N.native_lrt_linear(x, w.detach(), ls2.detach(), b, seed)[0],
                     naive_lrt_linear(x, w.detach(), ls2.detach(), b, seed)[0], rtol=1e-5, atol=1e-6,
                     name="after an update")
    # The entries die with the graphs that hold their std.
    y = SF.lrt_linear(x, w, ls2, b)
    assert torch.ops.sparsevd.native_sigma2_cache_stats()[2] >= 1
    del y
    SF.lrt_linear(x, w.detach(), ls2.detach(), b)  # filing a new entry drops the expired ones
    assert torch.ops.sparsevd.native_sigma2_cache_stats()[2] == 1


def test_sigma2_cache_fresh_tensors_at_reused_addresses():
    """Freshly allocated log σ² tensors (often at a freed one's address, version 0) never get a
    stale σ²."""
    x = torch.randn(5, 33)
    for _ in range(12):
        w = torch.randn(7, 33)
        ls2 = torch.randn(7, 33) - 2
        seed = draw_seed()
        assert_close(N.native_lrt_linear(x, w, ls2, None, seed)[0], naive_lrt_linear(x, w, ls2, None, seed)[0],
                     rtol=1e-5, atol=1e-6, name="fresh log_sigma2")
        del w, ls2


def test_sigma2_cache_off_gives_the_same_results():
    x, w, ls2, b = linear_inputs((4, 3), 10, 9)
    seed = draw_seed()
    on = N.native_lrt_linear(x, w, ls2, b, seed)
    assert torch.ops.sparsevd.native_sigma2_cache(False) is True
    try:
        assert torch.ops.sparsevd.native_sigma2_cache_stats()[2] == 0
        off = N.native_lrt_linear(x, w, ls2, b, seed)
    finally:
        torch.ops.sparsevd.native_sigma2_cache(True)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


def _clip_linear(lead, k, n, dead_rows, dead_cols, dtype=F64):
    x, w, ls2, b = linear_inputs(lead, k, n, F64, True, contiguous=len(lead) == 1)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    return [t.to(dtype) for t in (x, w, ls2, b)], thr


def _row_sum_scale(g, x, w, ls2, std, seed, thr):
    """The scale of the rounding error of ∂θ and ∂log σ²: each element is a sum over the rows of x
    of terms that may cancel (one live weight: four terms once summed to 1/570 of Σ|term|, where
    fp32 sums in another order differ by 3e-5 of the sum), so the largest Σ_rows |term| of an
    element, from the fp64 reference backward of one row of g at a time. Returns (∂θ's, ∂log σ²'s)."""
    rows = g.reshape(-1, g.shape[-1]).double()
    d = [t.double() for t in (x, w, ls2, std)]
    total = [torch.zeros_like(d[1]), torch.zeros_like(d[1])]
    for i in range(rows.shape[0]):
        gi = torch.zeros_like(rows)
        gi[i] = rows[i]
        grads = naive_lrt_linear_backward(gi.view(g.shape), *d, seed, True, thr)
        total = [t + a.abs() for t, a in zip(total, grads[1:3])]
    return tuple(max(float(t.max()), 1e-30) for t in total)


def _check_clip_linear(x, w, ls2, b, thr, rtol_f, rtol_b, dead_rows=(), dead_cols=()):
    """Native forward and every gradient with clipping against the reference backend (the mask
    applied, identical noise), exact zeros where dead, everything finite."""
    seed = draw_seed()
    y_r, std_r = naive_lrt_linear(x, w, ls2, b, seed, thr)
    y, std = N.native_lrt_linear(x, w, ls2, b, seed, thr)
    assert y.shape == y_r.shape and y.dtype == y_r.dtype and std.dtype == std_r.dtype
    assert torch.isfinite(y).all() and torch.isfinite(std).all()
    close(y, y_r, rtol_f, "y", atol_rel=rtol_f / 5)
    close(std, std_r, rtol_f, "std")
    if dead_rows:  # s² = 0 exactly: std = sqrt(1e-8) (the reference's bits), y = b + sqrt(1e-8)·ξ
        d = list(dead_rows)
        assert torch.all(std[..., d] == std[..., d].flatten()[0]), "dead rows: s² = 0 exactly"
        assert_close(std[..., d], std_r[..., d], rtol=1e-6, atol=0, name="dead rows: std = sqrt(1e-8)")
    g = torch.randn_like(y)
    ref = naive_lrt_linear_backward(g, x, w, ls2, std_r, seed, True, thr)
    got = N.native_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr)
    m = W.clip_mask(w, ls2, thr) != 0
    scales = (None, *_row_sum_scale(g, x, w, ls2, std_r, seed, thr), grad_scale("grad_bias", g, -1))
    for name, a, e, scale in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), got, ref, scales):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.isfinite(a).all(), f"{name}: unwritten or non-finite elements"
        close(a, e, rtol_b, name, atol_rel=rtol_b / 5, scale=scale)
    assert torch.all(got[1][~m] == 0) and torch.all(got[2][~m] == 0), "dropped weights: zero gradients"
    if dead_cols:
        assert torch.all(got[0][..., list(dead_cols)] == 0), "dead input columns: ∂x = 0"
    no_dx = N.native_lrt_linear_backward(g, x, w, ls2, std, seed, False, thr)
    assert no_dx[0].numel() == 0
    for a, e in zip(no_dx[1:], got[1:]):
        assert torch.equal(a, e)
    return y, std, got


@pytest.mark.parametrize("lead,k,n,dead_rows,dead_cols", CLIP_STRUCTURE_CASES)
def test_clip_linear_equals_reference(isa, compact, lead, k, n, dead_rows, dead_cols):
    """Clipped native forward and gradients equal the reference backend's on identical noise:
    fp32 to the tolerances of the unclipped tests, fp64 to rounding; every compaction mode and
    kernel set."""
    (x, w, ls2, b), thr = _clip_linear(lead, k, n, dead_rows, dead_cols)
    m = W.clip_mask(w, ls2, thr)
    assert 0 < int(m.sum()) < m.numel()
    _check_clip_linear(x, w, ls2, b, thr, 1e-12, 1e-11, dead_rows, dead_cols)
    x, w, ls2, b = (t.float() for t in (x, w, ls2, b))
    _check_clip_linear(x, w, ls2, b, thr, 1e-5, 2e-5, dead_rows, dead_cols)


@pytest.mark.parametrize("thr", [-11.0, 11.0])
def test_clip_linear_all_dead_and_none_dead(compact, thr):
    """−11: every weight dropped (y = b + sqrt(1e-8)·ξ, zero ∂x, ∂θ, ∂log σ²); 11: none (log α ≤ 10),
    bit-identical to no clipping (forced CSR products: equal to fp32 rounding, other sums)."""
    x, w, ls2, b = linear_inputs((6,), 9, 5)
    seed = draw_seed()
    _check_clip_linear(x, w, ls2, b, thr, 1e-5, 2e-5, range(5) if thr < 0 else (), range(9) if thr < 0 else ())
    y, std = N.native_lrt_linear(x, w, ls2, b, seed, thr)
    g = torch.randn_like(y)
    grads = N.native_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr)
    if thr > 0:
        y0, std0 = N.native_lrt_linear(x, w, ls2, b, seed)
        same = torch.equal if compact != "sparse" else (lambda a, e: bool(torch.allclose(a, e, 1e-5, 1e-6)))
        assert same(y, y0) and same(std, std0)
        for a, e in zip(grads, N.native_lrt_linear_backward(g, x, w, ls2, std0, seed)):
            assert same(a, e)
    else:
        xi = lrt_noise(seed, y.shape)
        assert torch.all((std - 1e-4).abs() < 1e-11)
        assert_close(y, b + std * xi, rtol=1e-6, atol=1e-7, name="all dead")
        assert not grads[0].any() and not grads[1].any() and not grads[2].any() and grads[3].all()


@pytest.mark.parametrize("mode", ["always", "sparse"])
@pytest.mark.parametrize("lead,k,n,dead_rows,dead_cols", CLIP_STRUCTURE_CASES)
def test_clip_linear_compacted_equals_uncompacted(mode, lead, k, n, dead_rows, dead_cols):
    """The compacted (or CSR) products against the full ones (fp32, same inputs and seed): they
    sum the same nonzero terms, fewer exact zeros and in another order, so each output moves by at
    most ~K·eps·Σ|terms| (K <= 123 here: ~1e-5 relative to the largest output); checked with
    rtol 1e-5 and atol 1e-6·max|expected|. ∂θ / ∂log σ² of dead weights, ∂x of dead columns and
    the std of dead rows are exact."""
    (x, w, ls2, b), thr = _clip_linear(lead, k, n, dead_rows, dead_cols, torch.float32)
    seed = draw_seed()

    def run():
        y, std = N.native_lrt_linear(x, w, ls2, b, seed, thr)
        return (y, std, *N.native_lrt_linear_backward(torch.ones_like(y), x, w, ls2, std, seed, True, thr))

    full = with_compact("never", run)
    comp = with_compact(mode, run)
    for name, a, e in zip(("y", "std", "grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), comp, full):
        assert torch.isfinite(a).all(), name
        close(a, e, 1e-5, f"compacted {name}", atol_rel=1e-6)
        assert torch.equal(a == 0, e == 0) or name in ("y",), f"{name}: the same exact zeros"


def test_clip_occupancy_equals_torch(isa):
    """native_clip_occupancy against the per-row / per-column sums of sparsevd.reference.clip_mask
    (fp32 and fp64, linear and conv shapes, thresholds across the log α range, 1 and 2 threads):
    the masks agree exactly: same formula, roundings, NaN and clamp rules, threshold rounded to the
    dtype as torch rounds the scalar of a comparison (ties at the clamp: 10 < 10.0000001 is false
    in fp32). Not tested: thresholds within an ulp of a weight's log α, where the kernel's log and
    torch's (both ≤ 1 ulp, neither correctly rounded everywhere: ~2 % of fp32 inputs each) can fall
    on either side (benchmarks/NOTES.md, "native train-time clip and compaction"): such weights
    are moved away from the threshold first."""
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for shape in ((300, 784), (17, 5), (7, 3, 5, 5), (1, 1)):
                for dtype in (torch.float32, F64):
                    w = torch.randn(shape, dtype=dtype) / math.sqrt(shape[-1])
                    w.view(-1)[: min(3, w.numel())] = 0.0  # θ = 0: log(0 + 1e-8)
                    ls2 = torch.randn(shape, dtype=dtype) * 3 - 4
                    if w.numel() > 8:  # at the clamps: log α = ±10
                        ls2.view(-1)[4:6] = 30.0
                        ls2.view(-1)[6:8] = -30.0
                    for thr in (-11.0, -10.0, -9.9999999, -3.0, 0.0, 0.7, 2.9, 10.0, 10.0000001, 11.0):
                        # clear of the ulp ties: a weight whose exact log α lies within 1e-4 of
                        # thr moves 0.01 up (with 235k weights, one in a few runs lies that close)
                        la = ls2.double() - torch.log(w.double() ** 2 + 1e-8)
                        ls2[(la - thr).abs() < 1e-4] += 0.01
                        rows, cols = torch.ops.sparsevd.native_clip_occupancy(w, ls2, thr)
                        m = W.clip_mask(w, ls2, thr)
                        other = tuple(d for d in range(m.dim()) if d != 1)
                        assert rows.dtype == cols.dtype == torch.int64
                        assert torch.equal(rows, m.flatten(1).sum(1).long()), (shape, dtype, thr)
                        assert torch.equal(cols, m.sum(other).long()), (shape, dtype, thr)
    finally:
        torch.set_num_threads(threads)


def test_clip_mask_near_the_threshold_equals_torch(isa):
    """The fp32 σ² pass decides most vectors from a bracket of log α without the log
    (simd/sigma2_vec.h, vec_math.h vlog_lower) and runs the exact lanes where a lane lies within
    ~0.07 of the threshold. One candidate weight per row at log α = thr + u, u in ±0.15 (both sides
    of the bracket's band; |u| ≥ 1e-4, clear of the ulp ties), the rest of the row far dropped or
    far kept, some candidates with θ² = inf or log σ² > 88: each row's count is its candidate's
    decision, and it equals sparsevd.reference.clip_mask's."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    R_, S = 512, 24
    for thr in (3.0, 0.0, -9.95, 9.95, 10.0):
        w = torch.randn(R_, S, generator=gen) * 0.3
        log_w2 = torch.log(w * w + 1e-8)
        far = torch.where(torch.arange(R_) % 2 == 0, 5.0, -5.0)[:, None].expand(R_, S)
        u = (torch.rand(R_, generator=gen) * 0.146 + 0.004) * torch.where(torch.rand(R_, generator=gen) < 0.5, 1, -1)
        col = torch.randint(0, S, (R_,), generator=gen)
        la = far.clone()
        la[torch.arange(R_), col] = thr + u
        ls2 = la + log_w2
        w[7, col[7]] = 1e20  # θ² = inf: log α = −inf, kept
        ls2[8, col[8]] = 95.0  # e^{log σ²} = inf
        ls2[9, col[9]] = float("nan")
        rows, _ = torch.ops.sparsevd.native_clip_occupancy(w, ls2, thr)
        m = W.clip_mask(w, ls2, thr)
        expected = m.sum(1).long()
        expected[8:10] += 1  # dropped, but σ²·0 is NaN: the weight still occupies its row
        assert torch.equal(rows, expected), thr
        decided = m[torch.arange(R_), col]
        assert 0 < int(decided.sum()) < R_, "both decisions present"


def test_clip_occupancy_counts_nonfinite_dropped_weights(isa):
    """A dropped weight whose θ·0 or σ²·0 is NaN (log σ² NaN, +inf or above 88.7, where e^{log σ²}
    is inf in fp32; θ NaN) still occupies its row and column, so the compacted products keep the
    reference's NaN there. Rows of 40: whole vectors of the σ² pass and its padded tail."""
    w = torch.randn(5, 40)
    ls2 = torch.full((5, 40), 8.0)  # everything dropped at threshold 0
    ls2[1, 2] = float("nan")
    ls2[3, 4] = float("inf")
    ls2[4, 20] = 100.0
    rows, cols = torch.ops.sparsevd.native_clip_occupancy(w, ls2, 0.0)
    assert rows.tolist() == [0, 1, 0, 1, 1]
    assert cols.tolist() == [int(c in (2, 4, 20)) for c in range(40)]
    x, b, seed = torch.randn(3, 40), torch.randn(5), draw_seed()
    y_r, _ = naive_lrt_linear(x, w, ls2, b, seed, 0.0)
    for mode in ("never", "always", "sparse"):
        y, _ = with_compact(mode, lambda: N.native_lrt_linear(x, w, ls2, b, seed, 0.0))
        assert torch.equal(torch.isnan(y), torch.isnan(y_r)), mode
        assert_close(y[:, [0, 2]], y_r[:, [0, 2]], rtol=1e-6, atol=1e-7, name=f"finite rows {mode}")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_sparse_products_keep_the_dense_nan_of_nonfinite_inputs(bad):
    """On the CSR path a non-finite input meets the dropped weights as in the reference's dense
    product (0·inf = NaN): the same outputs are non-finite in y, std and ∂x, the others equal."""
    (x, w, ls2, b), thr = _clip_linear((7,), 30, 12, (2, 5), (0, 9), torch.float32)
    x[3, 9] = bad  # a dead column
    x[5, 4] = bad  # a live one
    seed = draw_seed()
    y_r, std_r = naive_lrt_linear(x, w, ls2, b, seed, thr)
    y, std = with_compact("sparse", lambda: N.native_lrt_linear(x, w, ls2, b, seed, thr))
    g = torch.randn_like(y)
    ref = naive_lrt_linear_backward(g, x, w, ls2, std_r, seed, True, thr)
    got = with_compact("sparse", lambda: N.native_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr))
    for name, a, e in (("y", y, y_r), ("std", std, std_r), ("grad_x", got[0], ref[0])):
        fin = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), fin), name
        assert not fin.all() and fin.any(), name
        close(a[fin], e[fin], 2e-5, name, atol_rel=4e-6)


@pytest.mark.parametrize("mode", ["never", "always", "sparse"])
def test_clip_gradcheck(mode):
    """fp64 gradcheck of the clipped op (tiny, with dead rows and columns), through autograd,
    compacted, on the CSR of the kept weights and neither."""
    old = torch.ops.sparsevd.native_set_compact(mode)
    try:
        x, w, ls2, b = linear_inputs((4,), 6, 5, F64)
        thr = clip_case(w, ls2, (1,), (2, 4))
        seed = draw_seed()
        leaves = [t.requires_grad_() for t in (x, w, ls2, b)]
        assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed, clip_threshold=thr), leaves)
    finally:
        torch.ops.sparsevd.native_set_compact(old)


def test_clip_state_reused_by_backward_and_keyed_on_weight():
    """The backward reuses the forward's σ² pass under clipping (one hit, no miss); an in-place
    change of θ between them (a new version) makes it run the pass again on the new θ."""
    torch.ops.sparsevd.native_sigma2_cache(True)
    x, w, ls2, b = linear_inputs((8,), 40, 20)
    thr = clip_case(w, ls2, (0, 3), (5, 7, 9))
    seed = draw_seed()
    y, std = N.native_lrt_linear(x, w, ls2, b, seed, thr)
    g = torch.randn_like(y)
    h0, m0, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
    got = N.native_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr)
    h1, m1, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
    assert (h1 - h0, m1 - m0) == (1, 0)
    for a, e in zip(got, naive_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr)):
        close(a, e, 2e-5, "cached", atol_rel=4e-6)
    w.mul_(3.0)  # bumps θ's version: log α and the mask change
    got = N.native_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr)
    h2, m2, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
    assert (h2 - h1, m2 - m1) == (0, 1)
    for a, e in zip(got, naive_lrt_linear_backward(g, x, w, ls2, std, seed, True, thr)):
        close(a, e, 2e-5, "after θ changed", atol_rel=4e-6)
    # an unclipped backward never takes a clipped entry
    N.native_lrt_linear_backward(g, x, w, ls2, std, seed)
    assert torch.ops.sparsevd.native_sigma2_cache_stats()[1] == m2 + 1


@pytest.mark.parametrize("mode", ["always", "sparse"])
def test_clip_two_threads_structured_layer(mode):
    """A LeNet-sized layer (300×784, 235k weights: the σ² pass splits its rows over threads and
    sums per-thread column counts; the CSR is built and the sampled products run by row ranges)
    with structured death, on 2 threads: the reference's results and the same occupancy as on 1
    thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    old = torch.ops.sparsevd.native_set_compact(mode)
    try:
        (x, w, ls2, b), thr = _clip_linear((64,), 784, 300, tuple(range(0, 300, 2)),
                                           tuple(range(0, 784, 3)), torch.float32)
        two = torch.ops.sparsevd.native_clip_occupancy(w, ls2, thr)
        _check_clip_linear(x, w, ls2, b, thr, 1e-5, 2e-5, range(0, 300, 2), range(0, 784, 3))
        torch.set_num_threads(1)
        one = torch.ops.sparsevd.native_clip_occupancy(w, ls2, thr)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    finally:
        torch.set_num_threads(threads)
        torch.ops.sparsevd.native_set_compact(old)


def test_clip_argument_checks():
    x, w, ls2, b = linear_inputs((3,), 4, 5)
    s = draw_seed()
    with pytest.raises(RuntimeError, match="clip_threshold"):
        torch.ops.sparsevd.native_lrt_linear(x, w, ls2, b, s, float("nan"))
    with pytest.raises(RuntimeError, match="clip_threshold"):
        torch.ops.sparsevd.native_clip_occupancy(w, ls2, float("inf"))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.sparsevd.native_clip_occupancy(w[0], ls2[0], 0.0)
    with pytest.raises(RuntimeError, match="log_sigma2"):
        torch.ops.sparsevd.native_clip_occupancy(w, ls2[:, :2], 0.0)
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.sparsevd.native_set_compact("sometimes")


def test_two_threads_and_product_modes(two_threads):
    """The parallel passes (per-thread bias-gradient partials) and both ways of running the
    products give the reference's results on 2 threads."""
    x, w, ls2, b = linear_inputs((200,), 150, 90)
    seed = draw_seed()
    (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
    close(y, y_r, 1e-5, "y", atol_rel=2e-6)
    g = torch.randn_like(y)
    for name, a, e in zip(("gx", "gw", "gls2", "gb"), N.native_lrt_linear_backward(g, x, w, ls2, std_r, seed),
                          naive_lrt_linear_backward(g, x, w, ls2, std_r, seed)):
        close(a, e, 2e-5, name, atol_rel=2e-6)


def test_training_step_matches_reference_backend():
    """One SGVLB step of a converted MLP under native and reference from the same state and seed:
    the same loss and gradients."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(9, 20), torch.randint(0, 4, (9,))
    results = {}
    for name in ("reference", "native"):
        model = sparsevd.convert(base)
        loss_fn = sparsevd.SGVLB(model, train_size=100, kl_warmup_epochs=0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEVD_BACKEND", name)
            torch.manual_seed(7)
            loss = loss_fn(model(x), y)
            loss.backward()
        results[name] = (loss.detach(), [p.grad for p in model.parameters()])
    close(results["native"][0], results["reference"][0], 1e-5, "loss")
    for a, e in zip(results["native"][1], results["reference"][1]):
        close(a, e, 1e-4, "grad", atol_rel=1e-5)


@pytest.mark.parametrize("x_grad", [True, False])
def test_eager_linear_equals_custom_op_bitwise(x_grad):
    """SF.lrt_linear in eager mode runs the C++ autograd op; its output and gradients are the custom
    op's, bit for bit (the same kernels), with and without clipping and bias, 3-D inputs."""
    for lead, k, n, bias, clip in (((6,), 33, 17, True, None), ((2, 5), 16, 9, False, None),
                                   ((7,), 40, 24, True, "clip")):
        x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, bias)
        thr = clip_case(w, ls2, dead_rows=(1,), dead_cols=(2,)) if clip else None
        seed = draw_seed()
        x.requires_grad_(x_grad)
        leaves = [x, w.requires_grad_(), ls2.requires_grad_()] + ([b.requires_grad_()] if bias else [])
        out = eager_and_custom_op(lambda x, w, s, *b: SF.lrt_linear(x, w, s, *(b or [None]), seed=seed,
                                                         clip_threshold=thr), leaves)
        (y_e, fn_e, g_e), (y_c, fn_c, g_c) = out["eager"], out["custom_op"]
        assert "LrtLinearFn" in fn_e and "lrt_linear" in fn_c, (fn_e, fn_c)
        assert torch.equal(y_e, y_c)
        for a, e in zip(g_e, g_c):
            assert (a is None and e is None) or torch.equal(a, e)
        assert (g_e[0] is None) == (not x_grad)


def test_eager_paths_without_grad_inference_and_double_backward():
    x, w, ls2, b = linear_inputs((4,), 8, 3)
    seed = draw_seed()
    ref = N.native_lrt_linear(x, w, ls2, b, seed)[0]  # the same kernel as the eager op's
    with torch.no_grad():
        assert torch.equal(SF.lrt_linear(x, w.requires_grad_(), ls2, b, seed=seed), ref)
    with torch.inference_mode():
        assert torch.equal(SF.lrt_linear(x, w, ls2, b, seed=seed), ref)
    # a second derivative raises (as through the custom ops), a first one with create_graph works
    x.requires_grad_()
    y = SF.lrt_linear(x, w, ls2, b, seed=seed)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gx.sum().backward()


def test_cpp_argument_checks_name_the_argument():
    x, w, ls2, b = linear_inputs((3,), 4, 5)
    s = draw_seed()
    L = torch.ops.sparsevd.native_lrt_linear
    LB = torch.ops.sparsevd.native_lrt_linear_backward
    cases = [
        (lambda: L(x, w[0], ls2, b, s), "weight"),
        (lambda: L(x, w, ls2[:, :3], b, s), "log_sigma2"),
        (lambda: L(x[:, :3], w, ls2, b, s), "x"),
        (lambda: L(x.int(), w, ls2, b, s), "x"),
        (lambda: L(x, w, ls2, b[:4], s), "bias"),
        (lambda: L(x, w, ls2, b, s.int()), "seed"),
        (lambda: L(x, w, ls2, b, torch.tensor([1, 2])), "seed"),
        (lambda: L(torch.randn(()), w, ls2, b, s), "x"),
        (lambda: LB(torch.randn(3, 4), x, w, ls2, torch.rand(3, 5), s), "grad"),
        (lambda: LB(torch.randn(3, 5), x, w, ls2, torch.rand(2, 5), s), "std"),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError, match=name):
            fn()
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.sparsevd.native_set_products("sometimes")

