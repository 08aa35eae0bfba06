"""The ``native`` CPU backend (csrc/cpu, sparsevd/ops/native_impl.py) against the reference backend
(sparsevd/ops/reference_impl.py, called directly) and fp64 oracles on IDENTICAL noise (same seed):
the vectorized noise against the torch specification, LRT linear / conv2d forward and backward for
awkward, 3-D, non-contiguous and empty shapes, fp32 / fp64 / bf16 / CPU bf16 autocast, gradcheck,
opcheck, torch.compile, the σ² cache, train-time clipping (in-kernel masks, compaction of dead rows
and columns, the occupancy hook), the KL and its non-finite flags, threads and argument checks.

Every kernel set this CPU supports (AVX-512, AVX2, portable) is tested where results could differ
between them (``isa`` fixture)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from sample_inputs import (CLIP_CONV_STRUCTURE_CASES, CLIP_STRUCTURE_CASES, as_list, clip_case,
                           conv_inputs, fresh_seed, linear_inputs)

import sparsevd
import sparsevd.functional as SF
from sparsevd import ops
from sparsevd import reference as R
from sparsevd.ops import backend, noise
from sparsevd.ops import reference_impl as RI

try:
    from sparsevd.ops import native_impl as NI
except ImportError as exc:  # extension not built: the whole module is skipped
    NI = None
    _WHY = str(exc)
else:
    _WHY = ""

pytestmark = pytest.mark.skipif(NI is None, reason=f"native backend unavailable: {_WHY}")

F64 = torch.float64
BF16 = torch.bfloat16


def _supported_isas():
    if NI is None:
        return []
    out = []
    for isa in ("avx512", "avx2", "scalar"):
        try:
            torch.ops.sparsevd.native_set_isa(isa)
            out.append(isa)
        except RuntimeError:
            pass
    torch.ops.sparsevd.native_set_isa("auto")
    return out


ISAS = _supported_isas()


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "native")


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with each kernel set this CPU supports."""
    torch.ops.sparsevd.native_set_isa(request.param)
    yield request.param
    torch.ops.sparsevd.native_set_isa("auto")


def scale_of(t: torch.Tensor) -> float:
    return max(float(t.detach().abs().max()) if t.numel() else 0.0, 1e-30)


def close(actual, expected, rtol, name, atol_rel=None, scale=None):
    """assert_close with an absolute tolerance relative to ``scale`` (default: the largest
    |expected|)."""
    scale = scale_of(expected) if scale is None else scale
    atol = (rtol if atol_rel is None else atol_rel) * scale if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=max(atol, 1e-30), name=name)


def grad_scale(name, g, channel_dim):
    """The scale of a gradient's rounding error: for ∂b = Σ g, the largest Σ|g| of a channel (a
    sum of n terms near 0 may cancel to far below them: 16 N(0, 1) values summed to -1.6e-3 once,
    where fp32 sums in another order differ by 2e-7); for the others, the largest |expected|."""
    if name != "grad_bias" or g.numel() == 0:
        return None
    return max(float(g.abs().movedim(channel_dim, 0).reshape(g.shape[channel_dim], -1).sum(1).max()), 1e-30)


# ------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, 2**62 - 1, -3])
@pytest.mark.parametrize("numel,offset", [
    (1, 0), (15, 3), (47, 0), (48, 1), (49, 2**31), (97, 2**32 - 50), (1000, 2**32 - 1),
    (4099, 2**32 - 4000), (100_003, 0), (33, 2**32 + 5),
])
def test_noise_matches_torch_spec(isa, seed, numel, offset):
    """philox_randn_ (now the vectorized generator) against randn_torch, across the 2^32 wrap of
    the counter and for every tail length of the 16/48-element blocks."""
    out = torch.full((numel,), float("nan"))
    torch.ops.sparsevd.philox_randn_(out, seed, offset)
    spec = noise.randn_torch(seed, numel, offset=offset)
    assert torch.isfinite(out).all(), "unwritten elements"
    assert_close(out, spec, rtol=1e-5, atol=2e-6, name=f"noise {isa}")


def test_noise_kernels_agree_with_each_other():
    """All kernel sets give the same numbers to an ulp or two of log/cos, at every offset of a
    block (the Philox integer part is exact: any difference there would be O(1))."""
    seed, n = int(fresh_seed()), 3001
    outs = {}
    for isa in ISAS:
        torch.ops.sparsevd.native_set_isa(isa)
        outs[isa] = noise.randn_like_index(seed, n, offset=2**32 - 1500)
    torch.ops.sparsevd.native_set_isa("auto")
    for isa, o in outs.items():
        assert_close(o, outs[ISAS[-1]], rtol=2e-6, atol=1e-6, name=f"{isa} vs {ISAS[-1]}")


def test_noise_threads_same_numbers():
    seed, n = int(fresh_seed()), 200_001
    one = noise.randn_like_index(seed, n)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = noise.randn_like_index(seed, n)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ------------------------------------------------------------------------------------ inputs
LINEAR_SHAPES = [
    # lead, in_features, out_features
    ((1,), 1, 1),
    ((37,), 129, 65),          # primes, just over 8/16/64-element vectors
    ((2, 3, 5), 17, 33),       # 3-D input
    ((9,), 65, 17),
    ((3,), 16, 481),           # output rows longer than a noise chunk (480)
    ((70,), 31, 300),          # M·N > the parallel grain, rows cross chunks
]


def _fwd_both(x, w, ls2, b, seed):
    return RI.lrt_linear_fwd(x, w, ls2, b, seed), NI.lrt_linear_fwd(x, w, ls2, b, seed)


@pytest.mark.parametrize("lead,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False), (True, False)])
def test_linear_forward_equals_reference(isa, lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous)
    seed = fresh_seed()
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


@pytest.mark.parametrize("lead,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_backward_equals_reference(isa, lead, k, n, with_bias):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous=len(lead) > 1)
    seed = fresh_seed()
    _, std = RI.lrt_linear_fwd(x, w, ls2, b, seed)
    g = torch.randn(*lead, n)
    ref = RI.lrt_linear_bwd(g, x, w, ls2, std, seed)
    got = NI.lrt_linear_bwd(g, x, w, ls2, std, seed)
    names = ("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias")
    for name, a, e in zip(names, got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        close(a, e, 2e-5, name, atol_rel=2e-6, scale=grad_scale(name, g, -1))
    no_dx = NI.lrt_linear_bwd(g, x, w, ls2, std, seed, need_grad_x=False)
    assert no_dx[0].numel() == 0
    for name, a, e in zip(names[1:], no_dx[1:], got[1:]):
        assert torch.equal(a, e), f"without need_grad_x: {name}"
    d = lambda t: t.double()  # noqa: E731
    ref64 = RI.lrt_linear_bwd(d(g), d(x), d(w), d(ls2), d(std), seed)
    got64 = NI.lrt_linear_bwd(d(g), d(x), d(w), d(ls2), d(std), seed)
    for name, a, e in zip(names, got64, ref64):
        close(a, e, 1e-11, f"fp64 {name}", scale=grad_scale(name, d(g), -1))


@pytest.mark.parametrize("lead,k,n", [((0,), 5, 7), ((4,), 0, 3), ((4,), 3, 0), ((0, 3), 0, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_empty_shapes(lead, k, n, with_bias):
    """Empty batch, K = 0 (y = b + 1e-4 ξ, grad_bias = Σ g) and N = 0: no crash, the reference's
    results."""
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias)
    seed = fresh_seed()
    (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
    assert y.shape == y_r.shape == (*lead, n) and std.shape == (*lead, n)
    assert_close(y, y_r, rtol=1e-6, atol=1e-7, name="y")
    assert_close(std, std_r, rtol=1e-6, atol=1e-7, name="std")
    if k == 0 and y.numel():
        xi = noise.lrt_noise(seed, y.shape)
        expected = (0.0 if b is None else b) + math.sqrt(1e-8) * xi
        assert_close(y, expected, rtol=1e-6, atol=1e-7, name="y for K=0")
    g = torch.randn(*lead, n)
    ref = RI.lrt_linear_bwd(g, x, w, ls2, std_r, seed)
    got = NI.lrt_linear_bwd(g, x, w, ls2, std, seed)
    for name, a, e in zip(("gx", "gw", "gls2", "gb"), got, ref):
        assert a.shape == e.shape, name
        assert_close(a, e, rtol=1e-6, atol=1e-6, name=name)
    assert_close(got[3], g.reshape(math.prod(lead), n).sum(0), rtol=1e-6, atol=1e-6, name="grad_bias = Σ g")


def test_linear_gradients_through_autograd_equal_fp64_reference():
    """Gradients of SF.lrt_linear (native) against autograd through sparsevd.reference on the same
    noise, for a hidden layer (x needs a gradient) and a first layer (it does not: the
    backward runs with need_grad_x=False)."""
    for x_grad in (True, False):
        x, w, ls2, b = linear_inputs((2, 7), 23, 19, F64, True, contiguous=False)
        seed = fresh_seed()
        xi = noise.lrt_noise(seed, (2, 7, 19)).double()
        g = torch.randn(2, 7, 19, dtype=F64)

        def grads(fn):
            leaves = [x.clone().requires_grad_(x_grad)] + [t.clone().requires_grad_() for t in (w, ls2, b)]
            (fn(*leaves) * g).sum().backward()
            return [t.grad for t in leaves]

        got = grads(lambda *a: SF.lrt_linear(*a, seed=seed))
        ref = grads(lambda *a: R.lrt_linear(*a, xi))
        for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), got, ref):
            if not x_grad and name == "x":
                assert a is None and e is None
                continue
            close(a, e, 1e-10, f"grad {name} (x requires grad: {x_grad})")


# ------------------------------------------------------------------------------------- conv2d
CONV_CASES = [
    # (N, C_in, H, W), (C_out, kH, kW), stride, padding, dilation, groups
    ((2, 3, 7, 7), (4, 3, 3), [1, 1], [0, 0], [1, 1], 1),
    ((2, 3, 8, 7), (5, 3, 3), [2, 2], [1, 1], [1, 1], 1),
    ((1, 2, 9, 10), (3, 2, 3), [1, 1], [2, 2], [2, 2], 1),
    ((2, 4, 8, 9), (6, 3, 2), [2, 1], [1, 0], [1, 2], 2),
    ((3, 6, 9, 9), (6, 3, 3), [1, 1], [1, 1], [1, 1], 6),   # depthwise
    ((1, 1, 4, 4), (1, 1, 1), [1, 1], [0, 0], [1, 1], 1),
    ((2, 5, 23, 23), (17, 5, 5), [1, 1], [0, 0], [1, 1], 1),  # planes 19x19, C_out prime
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False)])
def test_conv2d_forward_and_backward_equal_reference(isa, xs, ws, stride, padding, dilation, groups,
                                                     with_bias, contiguous):
    args = (stride, padding, dilation, groups)
    for dtype, rtol in ((torch.float32, 2e-5), (F64, 1e-11)):
        x, w, ls2, b = conv_inputs(xs, ws, groups, dtype, with_bias, contiguous)
        seed = fresh_seed()
        y_r, std_r = RI.lrt_conv2d_fwd(x, w, ls2, b, seed, *args)
        y, std = NI.lrt_conv2d_fwd(x, w, ls2, b, seed, *args)
        assert y.shape == y_r.shape and y.dtype == dtype and std.dtype == dtype
        close(y, y_r, rtol, f"y {dtype}")
        close(std, std_r, rtol, f"std {dtype}")
        g = torch.randn_like(y_r)
        ref = RI.lrt_conv2d_bwd(g, x, w, ls2, std_r, seed, *args)
        got = NI.lrt_conv2d_bwd(g, x, w, ls2, std_r, seed, *args)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), got, ref):
            assert a.shape == e.shape and a.dtype == e.dtype, name
            close(a, e, rtol, f"{name} {dtype}", scale=grad_scale(name, g, 1))
        no_dx = NI.lrt_conv2d_bwd(g, x, w, ls2, std_r, seed, *args, need_grad_x=False)
        assert no_dx[0].numel() == 0
        for a, e in zip(no_dx[1:], got[1:]):
            assert torch.equal(a, e)


def test_conv2d_empty_batch():
    x, w, ls2, b = conv_inputs((0, 3, 6, 6), (4, 3, 3), 1)
    seed = fresh_seed()
    args = ([1, 1], [1, 1], [1, 1], 1)
    y, std = NI.lrt_conv2d_fwd(x, w, ls2, b, seed, *args)
    assert y.shape == std.shape == (0, 4, 6, 6)
    gx, gw, gls2, gb = NI.lrt_conv2d_bwd(torch.randn(0, 4, 6, 6), x, w, ls2, std, seed, *args)
    assert gx.shape == x.shape and gw.shape == w.shape and gls2.shape == w.shape and gb.shape == (4,)
    assert not gw.any() and not gls2.any() and not gb.any()


def test_conv2d_gradients_through_autograd_equal_fp64_reference():
    args = ([2, 1], [1, 0], [1, 2], 2)
    for x_grad in (True, False):
        x, w, ls2, b = conv_inputs((2, 4, 8, 9), (6, 3, 2), 2, F64)
        seed = fresh_seed()
        out_shape = F.conv2d(x, w, None, *args).shape
        xi = noise.lrt_noise(seed, out_shape).double()
        g = torch.randn(out_shape, dtype=F64)

        def grads(fn):
            leaves = [x.clone().requires_grad_(x_grad)] + [t.clone().requires_grad_() for t in (w, ls2, b)]
            (fn(*leaves) * g).sum().backward()
            return [t.grad for t in leaves]

        got = grads(lambda *a: SF.lrt_conv2d(*a, *args, seed=seed))
        ref = grads(lambda *a: R.lrt_conv2d(*a, xi, *args))
        for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), got, ref):
            if not x_grad and name == "x":
                assert a is None
                continue
            close(a, e, 1e-10, f"grad {name}")


# ------------------------------------------------------------------------------- bf16, autocast
def _max_err(a, oracle):
    return float((a.double() - oracle).abs().max())


def test_bf16_linear_error_at_most_twice_the_reference():
    """Plain bf16 (parameters bf16 too): the native op computes in fp32 internally; its error vs an
    fp64 oracle on the same (bf16) inputs is at most 2x the reference's, computed in bf16."""
    x, w, ls2, b = linear_inputs((37,), 129, 65, BF16)
    seed = fresh_seed()
    (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
    assert y.dtype == BF16 and std.dtype == BF16
    d = [t.double() for t in (x, w, ls2, b)]
    xi = noise.lrt_noise(seed, (37, 65)).double()
    oracle = R.lrt_linear(*d, xi)
    std_oracle = torch.sqrt(F.linear(d[0] ** 2, d[2].exp()) + 1e-8)
    assert _max_err(y, oracle) <= 2 * _max_err(y_r, oracle) + 1e-6
    assert _max_err(std, std_oracle) <= 2 * _max_err(std_r, std_oracle) + 1e-6
    # Backward: gradients of the bf16 ops vs fp64 autograd on the bf16 values.
    g = torch.randn(37, 65).to(BF16)
    ref = RI.lrt_linear_bwd(g, x, w, ls2, std_r, seed)
    got = NI.lrt_linear_bwd(g, x, w, ls2, std_r, seed)
    leaves = [t.clone().requires_grad_() for t in d]
    (R.lrt_linear(*leaves, xi) * g.double()).sum().backward()
    for name, a, e, o in zip(("x", "weight", "log_sigma2", "bias"), got, ref, leaves):
        assert a.dtype == BF16 and a.shape == e.shape
        assert _max_err(a, o.grad) <= 2 * _max_err(e, o.grad) + 1e-6, name


def test_cpu_autocast_bf16_linear_and_conv():
    """Under CPU bf16 autocast the op receives bf16 x and fp32 parameters: y in bf16, std in fp32,
    products in fp32; error vs fp64 at most 2x the reference backend's under the same autocast."""
    x, w, ls2, b = linear_inputs((5, 7), 40, 24, torch.float32)
    seed = fresh_seed()
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=BF16):
        y, std = ops.lrt_linear(xb, w, ls2, b, seed)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEVD_BACKEND", "reference")
            y_r, std_r = ops.lrt_linear(xb, w, ls2, b, seed)
    assert y.dtype == BF16 and std.dtype == torch.float32 and std_r.dtype == torch.float32
    d = [xb.double(), w.double(), ls2.double(), b.double()]
    xi = noise.lrt_noise(seed, (5, 7, 24)).double()
    oracle = R.lrt_linear(*d, xi)
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
    (R.lrt_linear(*leaves, xi) * g.double()).sum().backward()
    for name, a, e, o in zip(("x", "weight", "log_sigma2", "bias"), got, ref, leaves):
        assert a.dtype == torch.float32
        assert _max_err(a, o.grad) <= 2 * _max_err(e, o.grad) + 1e-6, name
    # Convolution.
    cx, cw, cs, cb = conv_inputs((2, 3, 9, 9), (4, 3, 3), 1)
    args = ([1, 1], [1, 1], [1, 1], 1)
    with torch.autocast("cpu", dtype=BF16):
        yc, stdc = ops.lrt_conv2d(cx.bfloat16(), cw, cs, cb, seed, *args)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEVD_BACKEND", "reference")
            yc_r, _ = ops.lrt_conv2d(cx.bfloat16(), cw, cs, cb, seed, *args)
    assert yc.dtype == BF16 and stdc.dtype == torch.float32
    xi_c = noise.lrt_noise(seed, yc.shape).double()
    oracle_c = R.lrt_conv2d(cx.bfloat16().double(), cw.double(), cs.double(), cb.double(), xi_c, *args)
    assert _max_err(yc, oracle_c) <= 2 * _max_err(yc_r, oracle_c) + 1e-6


def test_bf16_conv2d_plain():
    x, w, ls2, b = conv_inputs((2, 4, 8, 8), (6, 2, 3), 2, BF16)
    seed = fresh_seed()
    args = ([1, 1], [1, 1], [1, 1], 2)
    y_r, std_r = RI.lrt_conv2d_fwd(x, w, ls2, b, seed, *args)
    y, std = NI.lrt_conv2d_fwd(x, w, ls2, b, seed, *args)
    assert y.dtype == BF16 and std.dtype == BF16
    xi = noise.lrt_noise(seed, y.shape).double()
    oracle = R.lrt_conv2d(*[t.double() for t in (x, w, ls2, b)], xi, *args)
    assert _max_err(y, oracle) <= 2 * _max_err(y_r, oracle) + 1e-6


# ----------------------------------------------------------------------- gradcheck / opcheck
def test_gradcheck_linear():
    for lead, contiguous in (((3,), True), ((2, 3), False)):
        x, w, ls2, b = linear_inputs(lead, 4, 5, F64, True, contiguous)
        seed = fresh_seed()
        inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
        assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs)
    # First layer: no gradient for x (the params-only backward).
    x.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(x, *a, seed=seed), inputs[1:])


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 2, 2), (1, 1, 1, 4)])
def test_gradcheck_conv2d(stride, padding, dilation, groups):
    x, w, ls2, b = conv_inputs((2, 4, 6, 5), (4, 2, 2), groups, F64)
    seed = fresh_seed()
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(
        lambda *a: SF.lrt_conv2d(*a, stride, padding, dilation, groups, seed=seed), inputs)


def _kl_params(shape, dtype=F64):
    """θ and log σ² with log α spread over (−12, 12) but away from the clamp edges ±10."""
    w = torch.randn(shape, dtype=F64)
    w = torch.where(w < 0, w - 0.1, w + 0.1)
    la = torch.empty(shape, dtype=F64).uniform_(-12, 12)
    la = torch.where((la.abs() - 10).abs() < 0.05, la * 0.9, la)
    return w.to(dtype), (la + torch.log(w * w + 1e-8)).to(dtype)


def test_gradcheck_kl():
    (w1, s1), (w2, s2) = _kl_params((4, 3)), _kl_params((2, 1, 2, 2))
    inputs = [t.requires_grad_() for t in (w1, s1, w2, s2)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: SF.kl_sparse_vd_many([a, c], [b, d]), inputs)


def test_opcheck_linear_ops():
    for lead, with_bias, dtype in (((3,), True, F64), ((2, 3), False, F64), ((6,), True, torch.float32)):
        x, w, ls2, b = linear_inputs(lead, 4, 5, dtype, with_bias)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = fresh_seed()
        torch.library.opcheck(ops.lrt_linear, (x, w, ls2, b, seed))
        y, std = ops.lrt_linear(x, w, ls2, b, seed)
        bargs = (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed)
        torch.library.opcheck(ops.lrt_linear_backward, bargs)
        torch.library.opcheck(ops.lrt_linear_backward, (*bargs, False))


def test_opcheck_conv2d_ops():
    for xs, ws, groups, args, with_bias in (
        ((2, 4, 7, 6), (6, 3, 3), 2, ([2, 2], [1, 1], [1, 1], 2), True),
        ((1, 2, 5, 5), (3, 2, 2), 1, ([1, 1], [0, 1], [2, 1], 1), False),
    ):
        x, w, ls2, b = conv_inputs(xs, ws, groups, F64, with_bias)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = fresh_seed()
        torch.library.opcheck(ops.lrt_conv2d, (x, w, ls2, b, seed, *args))
        y, std = ops.lrt_conv2d(x, w, ls2, b, seed, *args)
        bargs = (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed, *args)
        torch.library.opcheck(ops.lrt_conv2d_backward, bargs)
        torch.library.opcheck(ops.lrt_conv2d_backward, (*bargs, False))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_opcheck_kl(dtype):
    p1, p2 = _kl_params((4, 3), dtype), _kl_params((2, 1, 2, 2), dtype)
    ws, ss = [p1[0], p2[0]], [p1[1], p2[1]]
    torch.library.opcheck(ops.kl_sparse_vd, (ws, ss, False))
    ws = [w.requires_grad_() for w in ws]
    ss = [s.requires_grad_() for s in ss]
    torch.library.opcheck(ops.kl_sparse_vd, (ws, ss, True))


# ------------------------------------------------------------------------------- torch.compile
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparsevd.nn.Conv2dSVDO(2, 4, 3, padding=1)
        self.fc1 = sparsevd.nn.LinearSVDO(4 * 6 * 6, 16)
        self.fc2 = sparsevd.nn.LinearSVDO(16, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_torch_compile_fullgraph_training_step():
    """Conv2dSVDO + LinearSVDO forward, KL and backward compile with fullgraph=True under the
    native backend (aot_eager: AOTAutograd forward and backward graphs) and give eager's outputs
    and gradients under the same torch seed."""
    torch._dynamo.reset()
    model = _Net()
    x = torch.randn(3, 2, 6, 6)

    def loss_fn(m, inp):
        out = m(inp)
        return out, out.square().sum() + 0.1 * sparsevd.loss.kl_divergence(m)

    def step(fn):
        model.zero_grad()
        torch.manual_seed(1234)
        out, loss = fn(model, x)
        loss.backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out_c, grads_c = step(compiled)
    out_e, grads_e = step(loss_fn)
    assert_close(out_c, out_e, rtol=1e-5, atol=1e-6, name="compiled output")
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, rtol=1e-5, atol=1e-6, name="compiled grad")


# ----------------------------------------------------------------------------------- σ² cache
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
        seed = fresh_seed()
        y = SF.lrt_linear(x, w, ls2, b, seed=seed)
        hits, misses, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
        y.square().mean().backward()
        hits2, misses2, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
        assert (hits2 - hits, misses2 - misses) == (1, 0), "the backward reuses the forward's σ²"
        expected = RI.lrt_linear_fwd(x, w.detach(), ls2.detach(), b, seed)[0]
        assert_close(y, expected, rtol=1e-5, atol=1e-6, name=f"y at step {step}")
        opt.step()
        opt.zero_grad()
    for update in (lambda: ls2.data.add_(0.5), lambda: ls2.detach().mul_(0.9)):
        update()  # .data does not bump the version counter; detach() does
        seed = fresh_seed()
        assert_close(NI.lrt_linear_fwd(x, w.detach(), ls2.detach(), b, seed)[0],
                     RI.lrt_linear_fwd(x, w.detach(), ls2.detach(), b, seed)[0], rtol=1e-5, atol=1e-6,
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
        seed = fresh_seed()
        assert_close(NI.lrt_linear_fwd(x, w, ls2, None, seed)[0], RI.lrt_linear_fwd(x, w, ls2, None, seed)[0],
                     rtol=1e-5, atol=1e-6, name="fresh log_sigma2")
        del w, ls2


def test_sigma2_cache_off_gives_the_same_results():
    x, w, ls2, b = linear_inputs((4, 3), 10, 9)
    seed = fresh_seed()
    on = NI.lrt_linear_fwd(x, w, ls2, b, seed)
    assert torch.ops.sparsevd.native_sigma2_cache(False) is True
    try:
        assert torch.ops.sparsevd.native_sigma2_cache_stats()[2] == 0
        off = NI.lrt_linear_fwd(x, w, ls2, b, seed)
    finally:
        torch.ops.sparsevd.native_sigma2_cache(True)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


# ------------------------------------------------------------------------- train-time clipping
@pytest.fixture(params=["never", "always", "sparse", "auto"])
def compact(request):
    """Each way of running the clipped products: never compacted, compacted whenever a whole row
    or column is dead, on the CSR of the kept weights (linear; conv2d compacts), or the measured
    rule (native_set_compact)."""
    old = torch.ops.sparsevd.native_set_compact(request.param)
    yield request.param
    torch.ops.sparsevd.native_set_compact(old)


def _with_compact(mode, fn):
    old = torch.ops.sparsevd.native_set_compact(mode)
    try:
        return fn()
    finally:
        torch.ops.sparsevd.native_set_compact(old)


def _clip_linear(lead, k, n, dead_rows, dead_cols, dtype=F64):
    x, w, ls2, b = linear_inputs(lead, k, n, F64, True, contiguous=len(lead) == 1)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    return [t.to(dtype) for t in (x, w, ls2, b)], thr


def _check_clip_linear(x, w, ls2, b, thr, rtol_f, rtol_b, dead_rows=(), dead_cols=()):
    """Native forward and every gradient with clipping against the reference backend (the mask
    applied, identical noise), exact zeros where dead, everything finite."""
    seed = fresh_seed()
    y_r, std_r = RI.lrt_linear_fwd(x, w, ls2, b, seed, thr)
    y, std = NI.lrt_linear_fwd(x, w, ls2, b, seed, thr)
    assert y.shape == y_r.shape and y.dtype == y_r.dtype and std.dtype == std_r.dtype
    assert torch.isfinite(y).all() and torch.isfinite(std).all()
    close(y, y_r, rtol_f, "y", atol_rel=rtol_f / 5)
    close(std, std_r, rtol_f, "std")
    if dead_rows:  # s² = 0 exactly: std = sqrt(1e-8) (the reference's bits), y = b + sqrt(1e-8)·ξ
        d = list(dead_rows)
        assert torch.all(std[..., d] == std[..., d].flatten()[0]), "dead rows: s² = 0 exactly"
        assert_close(std[..., d], std_r[..., d], rtol=1e-6, atol=0, name="dead rows: std = sqrt(1e-8)")
    g = torch.randn_like(y)
    ref = RI.lrt_linear_bwd(g, x, w, ls2, std_r, seed, True, thr)
    got = NI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr)
    m = R.clip_mask(w, ls2, thr) != 0
    for name, a, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.isfinite(a).all(), f"{name}: unwritten or non-finite elements"
        close(a, e, rtol_b, name, atol_rel=rtol_b / 5, scale=grad_scale(name, g, -1))
    assert torch.all(got[1][~m] == 0) and torch.all(got[2][~m] == 0), "dropped weights: zero gradients"
    if dead_cols:
        assert torch.all(got[0][..., list(dead_cols)] == 0), "dead input columns: ∂x = 0"
    no_dx = NI.lrt_linear_bwd(g, x, w, ls2, std, seed, False, thr)
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
    m = R.clip_mask(w, ls2, thr)
    assert 0 < int(m.sum()) < m.numel()
    _check_clip_linear(x, w, ls2, b, thr, 1e-12, 1e-11, dead_rows, dead_cols)
    x, w, ls2, b = (t.float() for t in (x, w, ls2, b))
    _check_clip_linear(x, w, ls2, b, thr, 1e-5, 2e-5, dead_rows, dead_cols)


@pytest.mark.parametrize("thr", [-11.0, 11.0])
def test_clip_linear_all_dead_and_none_dead(compact, thr):
    """−11: every weight dropped (y = b + sqrt(1e-8)·ξ, zero ∂x, ∂θ, ∂log σ²); 11: none (log α ≤ 10),
    bit-identical to no clipping (forced CSR products: equal to fp32 rounding, other sums)."""
    x, w, ls2, b = linear_inputs((6,), 9, 5)
    seed = fresh_seed()
    _check_clip_linear(x, w, ls2, b, thr, 1e-5, 2e-5, range(5) if thr < 0 else (), range(9) if thr < 0 else ())
    y, std = NI.lrt_linear_fwd(x, w, ls2, b, seed, thr)
    g = torch.randn_like(y)
    grads = NI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr)
    if thr > 0:
        y0, std0 = NI.lrt_linear_fwd(x, w, ls2, b, seed)
        same = torch.equal if compact != "sparse" else (lambda a, e: bool(torch.allclose(a, e, 1e-5, 1e-6)))
        assert same(y, y0) and same(std, std0)
        for a, e in zip(grads, NI.lrt_linear_bwd(g, x, w, ls2, std0, seed)):
            assert same(a, e)
    else:
        xi = noise.lrt_noise(seed, y.shape)
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
    seed = fresh_seed()

    def run():
        y, std = NI.lrt_linear_fwd(x, w, ls2, b, seed, thr)
        return (y, std, *NI.lrt_linear_bwd(torch.ones_like(y), x, w, ls2, std, seed, True, thr))

    full = _with_compact("never", run)
    comp = _with_compact(mode, run)
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
                        m = R.clip_mask(w, ls2, thr)
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
        m = R.clip_mask(w, ls2, thr)
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
    x, b, seed = torch.randn(3, 40), torch.randn(5), fresh_seed()
    y_r, _ = RI.lrt_linear_fwd(x, w, ls2, b, seed, 0.0)
    for mode in ("never", "always", "sparse"):
        y, _ = _with_compact(mode, lambda: NI.lrt_linear_fwd(x, w, ls2, b, seed, 0.0))
        assert torch.equal(torch.isnan(y), torch.isnan(y_r)), mode
        assert_close(y[:, [0, 2]], y_r[:, [0, 2]], rtol=1e-6, atol=1e-7, name=f"finite rows {mode}")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_sparse_products_keep_the_dense_nan_of_nonfinite_inputs(bad):
    """On the CSR path a non-finite input meets the dropped weights as in the reference's dense
    product (0·inf = NaN): the same outputs are non-finite in y, std and ∂x, the others equal."""
    (x, w, ls2, b), thr = _clip_linear((7,), 30, 12, (2, 5), (0, 9), torch.float32)
    x[3, 9] = bad  # a dead column
    x[5, 4] = bad  # a live one
    seed = fresh_seed()
    y_r, std_r = RI.lrt_linear_fwd(x, w, ls2, b, seed, thr)
    y, std = _with_compact("sparse", lambda: NI.lrt_linear_fwd(x, w, ls2, b, seed, thr))
    g = torch.randn_like(y)
    ref = RI.lrt_linear_bwd(g, x, w, ls2, std_r, seed, True, thr)
    got = _with_compact("sparse", lambda: NI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr))
    for name, a, e in (("y", y, y_r), ("std", std, std_r), ("grad_x", got[0], ref[0])):
        fin = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), fin), name
        assert not fin.all() and fin.any(), name
        close(a[fin], e[fin], 2e-5, name, atol_rel=4e-6)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups,dead_out,dead_in", CLIP_CONV_STRUCTURE_CASES)
def test_clip_conv2d_equals_reference(compact, xs, ws, stride, padding, dilation, groups, dead_out, dead_in):
    """Clipped conv2d forward and gradients against the reference backend (fp32 and fp64),
    exact zeros for dropped weights, dead output channels (std = sqrt(1e-8)) and dead input
    channels (∂x), everything finite, and the compacted results against the uncompacted."""
    args = (as_list(stride), list(padding) if isinstance(padding, tuple) and len(padding) == 4
            else as_list(padding), as_list(dilation), groups)
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64)
    thr = clip_case(w, ls2, dead_out, dead_in)
    m = R.clip_mask(w, ls2, thr) != 0
    assert 0 < int(m.sum()) < m.numel()
    for dtype, rtol in ((F64, 1e-11), (torch.float32, 2e-5)):
        xd, wd, ld, bd = (t.to(dtype) for t in (x, w, ls2, b))
        seed = fresh_seed()
        y_r, std_r = RI.lrt_conv2d_fwd(xd, wd, ld, bd, seed, *args, thr)
        y, std = NI.lrt_conv2d_fwd(xd, wd, ld, bd, seed, *args, thr)
        assert y.shape == y_r.shape and torch.isfinite(y).all() and torch.isfinite(std).all()
        close(y, y_r, rtol, f"y {dtype}")
        close(std, std_r, rtol, f"std {dtype}")
        if dead_out:  # s² = 0 exactly: std = sqrt(1e-8)
            d = std[:, list(dead_out)]
            assert torch.all(d == d.flatten()[0])
            assert_close(d, std_r[:, list(dead_out)], rtol=1e-6, atol=0, name="dead channels: std")
        g = torch.randn_like(y_r)
        ref = RI.lrt_conv2d_bwd(g, xd, wd, ld, std_r, seed, *args, True, thr)
        got = NI.lrt_conv2d_bwd(g, xd, wd, ld, std, seed, *args, True, thr)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), got, ref):
            assert a.shape == e.shape and a.dtype == e.dtype and torch.isfinite(a).all(), name
            close(a, e, rtol, f"{name} {dtype}", scale=grad_scale(name, g, 1))
        assert torch.all(got[1][~m] == 0) and torch.all(got[2][~m] == 0)
        if dead_in and groups == 1:
            assert torch.all(got[0][:, list(dead_in)] == 0)
        no_dx = NI.lrt_conv2d_bwd(g, xd, wd, ld, std, seed, *args, False, thr)
        assert no_dx[0].numel() == 0 and all(torch.equal(a, e) for a, e in zip(no_dx[1:], got[1:]))
        if dtype == torch.float32 and compact == "always":  # compacted vs uncompacted (see the linear test)
            full = _with_compact("never", lambda: (
                *NI.lrt_conv2d_fwd(xd, wd, ld, bd, seed, *args, thr),
                *NI.lrt_conv2d_bwd(g, xd, wd, ld, std, seed, *args, True, thr)))
            for name, a, e in zip(("y", "std", "gx", "gw", "gls2", "gb"), (y, std, *got), full):
                close(a, e, 1e-5, f"compacted {name}", atol_rel=1e-6)


@pytest.mark.parametrize("mode", ["never", "always", "sparse"])
def test_clip_gradcheck(mode):
    """fp64 gradcheck of the clipped linear and conv2d ops (tiny, with dead rows and columns),
    through autograd, compacted and not."""
    old = torch.ops.sparsevd.native_set_compact(mode)
    try:
        x, w, ls2, b = linear_inputs((4,), 6, 5, F64)
        thr = clip_case(w, ls2, (1,), (2, 4))
        seed = fresh_seed()
        leaves = [t.requires_grad_() for t in (x, w, ls2, b)]
        assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed, clip_threshold=thr), leaves)
        x, w, ls2, b = conv_inputs((1, 3, 5, 4), (4, 2, 2), 1, F64)
        thr = clip_case(w, ls2, (0, 3), (1,))
        args = ([1, 1], [1, 0], [1, 1], 1)
        leaves = [t.requires_grad_() for t in (x, w, ls2, b)]
        assert torch.autograd.gradcheck(
            lambda *a: SF.lrt_conv2d(*a, *args, seed=seed, clip_threshold=thr), leaves)
    finally:
        torch.ops.sparsevd.native_set_compact(old)


def test_clip_state_reused_by_backward_and_keyed_on_weight():
    """The backward reuses the forward's σ² pass under clipping (one hit, no miss); an in-place
    change of θ between them (a new version) makes it run the pass again on the new θ."""
    torch.ops.sparsevd.native_sigma2_cache(True)
    x, w, ls2, b = linear_inputs((8,), 40, 20)
    thr = clip_case(w, ls2, (0, 3), (5, 7, 9))
    seed = fresh_seed()
    y, std = NI.lrt_linear_fwd(x, w, ls2, b, seed, thr)
    g = torch.randn_like(y)
    h0, m0, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
    got = NI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr)
    h1, m1, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
    assert (h1 - h0, m1 - m0) == (1, 0)
    for a, e in zip(got, RI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr)):
        close(a, e, 2e-5, "cached", atol_rel=4e-6)
    w.mul_(3.0)  # bumps θ's version: log α and the mask change
    got = NI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr)
    h2, m2, _ = torch.ops.sparsevd.native_sigma2_cache_stats()
    assert (h2 - h1, m2 - m1) == (0, 1)
    for a, e in zip(got, RI.lrt_linear_bwd(g, x, w, ls2, std, seed, True, thr)):
        close(a, e, 2e-5, "after θ changed", atol_rel=4e-6)
    # an unclipped backward never takes a clipped entry
    NI.lrt_linear_bwd(g, x, w, ls2, std, seed)
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
    s = fresh_seed()
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


# ------------------------------------------------------------------------------------------ KL
KL_SHAPES = [(1, 1), (7, 5), (3, 2, 3, 3), (300, 784), (17,), (100, 300)]


def test_kl_equals_fp64_reference(isa):
    params = [_kl_params(s) for s in KL_SHAPES]
    ws = [p[0] for p in params]
    ss = [p[1] for p in params]
    kl_r, gw_r, gs_r = RI.kl_fwd(ws, ss, True)
    kl, gw, gs = NI.kl_fwd(ws, ss, True)
    assert kl.dtype == F64 and kl.shape == ()
    close(kl, kl_r, 1e-12, "kl fp64")
    for i, (a, e) in enumerate(zip(gw + gs, gw_r + gs_r)):
        assert a.shape == e.shape and a.dtype == e.dtype
        close(a, e, 1e-10, f"fp64 grad {i}")
    # fp32 against the fp64 reference on the fp32-rounded inputs. Measured max relative errors:
    # KL sum 5e-8, gradients 1.5e-6 (the fp32 reference: the same), set by rounding log α in fp32.
    w32, s32 = [w.float() for w in ws], [s.float() for s in ss]
    kl_o, gw_o, gs_o = RI.kl_fwd([w.double() for w in w32], [s.double() for s in s32], True)
    kl32, gw32, gs32 = NI.kl_fwd(w32, s32, True)
    assert kl32.dtype == torch.float32
    close(kl32, kl_o, 1e-6, "kl fp32")
    for i, (a, e) in enumerate(zip(gw32 + gs32, gw_o + gs_o)):
        assert a.dtype == torch.float32
        assert_close(a, e, rtol=5e-6, atol=1e-6 * scale_of(e), name=f"fp32 grad {i}")
    # Value only: the same value, no gradients.
    kl_v, gw_v, gs_v = NI.kl_fwd(w32, s32, False)
    assert gw_v == [] and gs_v == []
    assert float(kl_v) == pytest.approx(float(kl32), rel=1e-6)


@pytest.mark.parametrize("la", [-11.0, -9.0, -5.0, -2.0, -0.5, 0.0, 0.5, 2.0, 5.0, 9.0, 11.0])
def test_kl_fp32_accuracy_per_log_alpha_band(isa, la):
    """fp32 KL of 4096 weights with log α near one value against fp64: a systematic error of a
    term (which a spread of log α would average out) shows up here. Measured: |rel| <= 1e-7."""
    w = 0.3 * (1 + 0.01 * torch.randn(4096))
    s = la + 0.01 * torch.randn(4096) + torch.log(w * w + 1e-8)
    kl64 = RI.kl_fwd([w.double()], [s.double()], False)[0]
    kl, gw, gs = NI.kl_fwd([w], [s], True)
    assert abs(float(kl) - float(kl64)) <= 3e-7 * float(kl64)
    _, gw64, gs64 = RI.kl_fwd([w.double()], [s.double()], True)
    assert_close(gs[0], gs64[0], rtol=5e-6, atol=1e-7 * scale_of(gs64[0]), name="grad log_sigma2")
    assert_close(gw[0], gw64[0], rtol=5e-6, atol=1e-7 * scale_of(gw64[0]), name="grad weight")


def test_kl_near_the_clamp_and_tiny_weights():
    """log α just inside/outside ±10 (gradient zero outside), θ = 0 and tiny θ (θ² ≪ 1e-8)."""
    la = torch.tensor([-10.5, -10.0001, -9.9999, -5.0, 0.0, 5.0, 9.9999, 10.0001, 10.5] * 4, dtype=F64)
    w = torch.tensor([0.0, 1e-9, 1e-5, 0.3, -2.0, 1e-3, 7.0, -1e-4, 0.05] * 4, dtype=F64)
    s = la + torch.log(w * w + 1e-8)
    for dtype, rtol in ((F64, 1e-10), (torch.float32, 5e-6)):
        kl_o, gw_o, gs_o = RI.kl_fwd([w], [s], True)
        kl, gw, gs = NI.kl_fwd([w.to(dtype)], [s.to(dtype)], True)
        close(kl, kl_o, rtol, f"kl {dtype}")
        inside = (la.abs() < 10)
        assert (gs[0][~inside] == 0).all() and (gw[0][~inside] == 0).all()
        assert_close(gs[0], gs_o[0], rtol=rtol, atol=rtol * scale_of(gs_o[0]), name=f"gls2 {dtype}")
        assert_close(gw[0], gw_o[0], rtol=rtol, atol=rtol * scale_of(gw_o[0]), name=f"gw {dtype}")


def test_kl_lanes_near_the_clamp_have_the_full_lanes_bits(isa):
    """The KL's classification brackets raw log α without the log (vec_math.h vlog_lower): lanes
    within ~0.07 of ±10, NaN and θ² = inf are computed, the others get the constants. Weights with
    raw log α = ±10 + u, u in ±0.1 (and exactly ±10, one fp32 step either side, θ = 1e20), an
    eighth of the lanes among far-clamped ones (blocks classified, the band's lanes gathered),
    against the same weights in blocks over half inside (every lane computed): the same bits."""
    n = 8 * 16 * 40 + 13
    w = 0.3 * torch.randn(n)
    log_w2 = torch.log(w * w + 1e-8)
    edge = torch.zeros(n, dtype=torch.bool)
    edge[::8] = True
    sign = torch.where(torch.rand(n) < 0.5, 1.0, -1.0)
    raw = sign * torch.where(edge, 10 + 0.2 * torch.rand(n) - 0.1, 12 + torch.rand(n))
    ten = torch.tensor(10.0)
    raw[0:64:8] = torch.tensor([10.0, -10.0, torch.nextafter(ten, ten + 1), torch.nextafter(ten, ten - 1),
                                -torch.nextafter(ten, ten + 1), -torch.nextafter(ten, ten - 1), 10.05, -10.05])
    w[64:128:8] = 1e20
    s = raw + log_w2
    dense = s.clone()
    fill = ~edge & (torch.arange(n) % 8 < 6)
    dense[fill] = (4 * torch.rand(n) - 2)[fill] + log_w2[fill]  # 6/8 of each block inside
    kl, gw, gs = NI.kl_fwd([w], [s], True)
    kl_r, _, _ = RI.kl_fwd([w.double()], [s.double()], True)
    close(kl, kl_r, 1e-6, "kl")
    _, gw_d, gs_d = NI.kl_fwd([w], [dense], True)
    for a, e, name in ((gw[0], gw_d[0], "gw"), (gs[0], gs_d[0], "gls2")):
        assert torch.equal(a.view(torch.int32)[edge], e.view(torch.int32)[edge]), name
    inside = gs[0][edge] != 0
    assert inside.any() and (~inside).any(), "both sides of the clamp"


def test_kl_clamped_lanes_have_the_full_lanes_bits(isa):
    """The fp32 KL classifies blocks of vectors (simd/kl_vec.h): clamped lanes (|log σ² −
    log(θ² + 1e-8)| ≥ 10) get KL(±10) and zero gradients without the exps, the others are gathered
    and computed (blocks with at most a third of them inside) or the block runs every lane (more
    inside). Every path gives each weight the same gradient bits (signed zeros included) and the
    reference's KL; a NaN in a clamped block reaches the KL and its own gradients only."""
    n = 4109  # a partial last block and a scalar tail
    w = 0.3 * torch.randn(n)
    w[::9] = 0.0
    w[5::11] = 1e-6
    log_w2 = torch.log(w * w + 1e-8)
    raw = torch.where(torch.rand(n) < 0.5, 10.01 + 5 * torch.rand(n), -10.01 - 5 * torch.rand(n))
    inside = 4 * torch.rand(n) - 2
    sparse_lanes = torch.zeros(n, dtype=torch.bool)
    sparse_lanes[::16] = True                       # 1/16 inside: gathered
    dense_lanes = sparse_lanes.clone()
    dense_lanes[1::2] = True                        # over half inside: every lane computed
    variants = {"clamped": raw, "sparse": torch.where(sparse_lanes, inside, raw),
                "dense": torch.where(dense_lanes, inside, raw)}
    got = {}
    for name, r in variants.items():
        s = r + log_w2
        kl, gw, gs = NI.kl_fwd([w], [s], True)
        kl_r, gw_r, gs_r = RI.kl_fwd([w.double()], [s.double()], True)
        close(kl, kl_r, 1e-6, f"kl {name}")
        assert_close(gs[0], gs_r[0], rtol=5e-6, atol=1e-7 * scale_of(gs_r[0]), name=f"gls2 {name}")
        assert_close(gw[0], gw_r[0], rtol=5e-6, atol=1e-7 * scale_of(gw_r[0]), name=f"gw {name}")
        got[name] = (gw[0].view(torch.int32), gs[0].view(torch.int32))
    clamped_everywhere = ~dense_lanes
    for name in ("sparse", "dense"):
        for a, e in zip(got[name], got["clamped"]):
            assert torch.equal(a[clamped_everywhere], e[clamped_everywhere]), name
    for a, e in zip(got["sparse"], got["dense"]):
        assert torch.equal(a[sparse_lanes], e[sparse_lanes]), "gathered lanes = every lane computed"
    gw_c = got["clamped"][0].view(torch.float32)
    assert torch.all(gw_c == 0) and torch.signbit(gw_c).any() and (~torch.signbit(gw_c)).any()
    w_nan = w.clone()
    w_nan[100] = float("nan")
    kl, gw, gs = NI.kl_fwd([w_nan], [variants["clamped"] + log_w2], True)
    assert math.isnan(float(kl)) and NI.nonfinite_layers().tolist() == [True]
    assert math.isnan(float(gw[0][100])) and math.isnan(float(gs[0][100]))
    others = torch.ones(n, dtype=torch.bool)
    others[100] = False
    assert torch.equal(gw[0].view(torch.int32)[others], got["clamped"][0][others])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kl_nonfinite_flags(isa, dtype):
    """NaN / ±inf in θ or log σ² of some of several layers: the flags say which, the clean layers'
    gradients are the reference's, and the glue exposes the flags of the last call."""
    shapes = [(30, 17), (300, 100), (5,), (64, 33), (1000,)]
    params = [_kl_params(s, dtype) for s in shapes]
    ws = [p[0].clone() for p in params]
    ss = [p[1].clone() for p in params]
    ws[1].view(-1)[12345] = float("nan")        # in the vectorized body of a multi-chunk layer
    ss[2][4] = float("inf")                     # the scalar tail of a tiny layer
    ws[3].view(-1)[-1] = float("-inf")          # the last element
    ss[4][999] = float("nan")
    kl, gw, gs = NI.kl_fwd(ws, ss, True)
    flags = NI.nonfinite_layers()
    assert flags.dtype == torch.bool and flags.tolist() == [False, True, True, True, True]
    assert NI.last_nonfinite is flags
    assert math.isnan(float(kl))
    _, gw_r, gs_r = RI.kl_fwd(ws[:1], ss[:1], True)
    tol = 1e-10 if dtype == F64 else 5e-6
    assert_close(gw[0], gw_r[0], rtol=tol, atol=tol * scale_of(gw_r[0]), name="clean layer grad")
    assert_close(gs[0], gs_r[0], rtol=tol, atol=tol * scale_of(gs_r[0]), name="clean layer grad")
    # Through the custom op and the functional API; a clean call clears the flags.
    with torch.no_grad():
        SF.CHECK_NAN, old = False, SF.CHECK_NAN
        try:
            SF.kl_sparse_vd_many(ws, ss)
        finally:
            SF.CHECK_NAN = old
    assert NI.nonfinite_layers().tolist() == [False, True, True, True, True]
    ops.kl_sparse_vd([p[0] for p in params], [p[1] for p in params], False)
    assert NI.nonfinite_layers().tolist() == [False] * 5


def test_kl_bf16_parameters():
    w, s = _kl_params((33, 17), torch.bfloat16)
    kl_r, gw_r, gs_r = RI.kl_fwd([w], [s], True)
    kl, gw, gs = NI.kl_fwd([w], [s], True)
    assert kl.dtype == torch.float32 and gw[0].dtype == torch.bfloat16 and gs[0].dtype == torch.bfloat16
    close(kl, kl_r, 1e-5, "kl")
    assert_close(gw[0], gw_r[0], rtol=2**-7, atol=2**-7 * scale_of(gw_r[0]), name="gw")
    assert_close(gs[0], gs_r[0], rtol=2**-7, atol=2**-7 * scale_of(gs_r[0]), name="gs")


def test_kl_noncontiguous_parameters_keep_their_strides():
    w, s = _kl_params((12, 9), torch.float32)
    wt, st = w.t(), s.t()
    kl_r, gw_r, gs_r = RI.kl_fwd([wt], [st], True)
    kl, gw, gs = NI.kl_fwd([wt], [st], True)
    assert gw[0].stride() == wt.stride() and gs[0].stride() == st.stride()
    close(kl, kl_r, 1e-6, "kl")
    close(gw[0], gw_r[0], 5e-6, "gw")


# ------------------------------------------------------------------------------ threads, modes
@pytest.mark.parametrize("mode", ["serial", "concurrent"])
def test_two_threads_and_product_modes(mode):
    """The parallel passes (per-thread bias-gradient partials, KL chunks) and both ways of running
    the products give the reference's results on 2 threads."""
    threads = torch.get_num_threads()
    old = torch.ops.sparsevd.native_set_products(mode)
    torch.set_num_threads(2)
    try:
        x, w, ls2, b = linear_inputs((200,), 150, 90)
        seed = fresh_seed()
        (y_r, std_r), (y, std) = _fwd_both(x, w, ls2, b, seed)
        close(y, y_r, 1e-5, "y", atol_rel=2e-6)
        g = torch.randn_like(y)
        for name, a, e in zip(("gx", "gw", "gls2", "gb"), NI.lrt_linear_bwd(g, x, w, ls2, std_r, seed),
                              RI.lrt_linear_bwd(g, x, w, ls2, std_r, seed)):
            close(a, e, 2e-5, name, atol_rel=2e-6)
        cx, cw, cs, cb = conv_inputs((4, 3, 20, 20), (8, 3, 3), 1)
        args = ([1, 1], [1, 1], [1, 1], 1)
        yc_r, stdc_r = RI.lrt_conv2d_fwd(cx, cw, cs, cb, seed, *args)
        yc, _ = NI.lrt_conv2d_fwd(cx, cw, cs, cb, seed, *args)
        close(yc, yc_r, 2e-5, "conv y")
        gc = torch.randn_like(yc)
        for name, a, e in zip(("gx", "gw", "gls2", "gb"), NI.lrt_conv2d_bwd(gc, cx, cw, cs, stdc_r, seed, *args),
                              RI.lrt_conv2d_bwd(gc, cx, cw, cs, stdc_r, seed, *args)):
            close(a, e, 2e-5, f"conv {name}")
        params = [_kl_params(s, torch.float32) for s in KL_SHAPES]
        kl2 = NI.kl_fwd([p[0] for p in params], [p[1] for p in params], True)
        torch.set_num_threads(1)
        kl1 = NI.kl_fwd([p[0] for p in params], [p[1] for p in params], True)
        assert torch.equal(kl1[0], kl2[0]), "the KL sum does not depend on the thread count"
    finally:
        torch.set_num_threads(threads)
        torch.ops.sparsevd.native_set_products(old)


# ------------------------------------------------------------------------------------- backend
def test_auto_picks_native_on_cpu_only(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "auto")
    for op in ("lrt_linear", "lrt_linear_backward", "lrt_conv2d", "lrt_conv2d_backward", "kl_sparse_vd"):
        assert backend.get_impl(op, torch.device("cpu"))[0] == "native"
        assert backend.get_impl(op, torch.device("cuda"))[0] != "native"
    monkeypatch.setenv("SPARSEVD_BACKEND", "native")
    with pytest.raises(backend.BackendUnavailableError, match="native kernels need CPU tensors"):
        backend.get_impl("lrt_linear", torch.device("cuda"))
    assert "native" in backend.BACKENDS


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


# ------------------------------------------------------------------------------ eager autograd
class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing: under it the custom ops run (no eager bypass)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run_both(fn, leaves):
    """fn(*leaves) and the leaves' gradients of Σ fn·G, once on the eager C++ autograd path and once
    through the custom ops (under a pass-through dispatch mode); G random, the same for both."""
    out = {}
    g = None
    for path in ("eager", "custom_op"):
        ls = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        if path == "eager":
            y = fn(*ls)
        else:
            with _PassThrough():
                y = fn(*ls)
        if g is None:
            g = torch.randn_like(y)
        (y * g).sum().backward()
        out[path] = (y.detach(), y.grad_fn.name(), [t.grad for t in ls])
    return out


@pytest.mark.parametrize("x_grad", [True, False])
def test_eager_linear_equals_custom_op_bitwise(x_grad):
    """SF.lrt_linear in eager mode runs the C++ autograd op; its output and gradients are the custom
    op's, bit for bit (the same kernels), with and without clipping and bias, 3-D inputs."""
    for lead, k, n, bias, clip in (((6,), 33, 17, True, None), ((2, 5), 16, 9, False, None),
                                   ((7,), 40, 24, True, "clip")):
        x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, bias)
        thr = clip_case(w, ls2, dead_rows=(1,), dead_cols=(2,)) if clip else None
        seed = fresh_seed()
        x.requires_grad_(x_grad)
        leaves = [x, w.requires_grad_(), ls2.requires_grad_()] + ([b.requires_grad_()] if bias else [])
        out = _run_both(lambda x, w, s, *b: SF.lrt_linear(x, w, s, *(b or [None]), seed=seed,
                                                         clip_threshold=thr), leaves)
        (y_e, fn_e, g_e), (y_c, fn_c, g_c) = out["eager"], out["custom_op"]
        assert "LrtLinearFn" in fn_e and "lrt_linear" in fn_c, (fn_e, fn_c)
        assert torch.equal(y_e, y_c)
        for a, e in zip(g_e, g_c):
            assert (a is None and e is None) or torch.equal(a, e)
        assert (g_e[0] is None) == (not x_grad)


@pytest.mark.parametrize("padding,channels_last", [([1, 1], False), ("same", False), ([0, 0], True)])
def test_eager_conv2d_equals_custom_op_bitwise(padding, channels_last):
    """The conv layer's eager path: bit-identical to the custom op (values and layout), also with
    padding="same" on an even kernel (padded explicitly, F.pad's backward crops ∂x) and
    channels_last inputs."""
    x, w, ls2, b = conv_inputs((2, 3, 9, 8), (5, 2, 2) if padding == "same" else (5, 3, 3), 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = fresh_seed()
    leaves = [x.requires_grad_(), w.requires_grad_(), ls2.requires_grad_(), b.requires_grad_()]
    out = _run_both(lambda x, w, s, b: SF.lrt_conv2d(x, w, s, b, padding=padding, seed=seed), leaves)
    (y_e, fn_e, g_e), (y_c, fn_c, g_c) = out["eager"], out["custom_op"]
    assert "lrt_conv2d" in fn_c and "lrt_conv2d" not in fn_e, (fn_e, fn_c)
    assert torch.equal(y_e, y_c) and y_e.stride() == y_c.stride()
    for a, e in zip(g_e, g_c):
        assert torch.equal(a, e)


@pytest.mark.parametrize("beta", [1.0, 0.37])
def test_eager_kl_equals_custom_op_bitwise(beta):
    """The KL's eager path: the same value and gradients as the custom op, at β = 1 (the backward
    hands out the forward's gradients as they are) and β ≠ 1 (scaled); repeated backward with
    retain_graph accumulates correctly; the non-finite flags are set."""
    shapes = [(30, 17), (300, 100), (5,)]
    params = [_kl_params(s, torch.float32) for s in shapes]
    res = {}
    for path in ("eager", "custom_op"):
        ws = [p[0].clone().requires_grad_() for p in params]
        ss = [p[1].clone().requires_grad_() for p in params]
        if path == "eager":
            kl = SF.kl_sparse_vd_many(ws, ss)
        else:
            with _PassThrough():
                kl = SF.kl_sparse_vd_many(ws, ss)
        (beta * kl).backward(retain_graph=True)
        first = [t.grad.clone() for t in (*ws, *ss)]
        (beta * kl).backward()
        res[path] = (kl.detach(), first, [t.grad for t in (*ws, *ss)])
    assert torch.equal(res["eager"][0], res["custom_op"][0])
    for a, e, twice in zip(res["eager"][1], res["custom_op"][1], res["eager"][2]):
        assert torch.equal(a, e)
        assert torch.equal(twice, a + a)
    assert NI.nonfinite_layers().tolist() == [False] * 3


def test_eager_paths_without_grad_inference_and_double_backward():
    x, w, ls2, b = linear_inputs((4,), 8, 3)
    seed = fresh_seed()
    ref = NI.lrt_linear_fwd(x, w, ls2, b, seed)[0]  # the same kernel as the eager op's
    with torch.no_grad():
        assert torch.equal(SF.lrt_linear(x, w.requires_grad_(), ls2, b, seed=seed), ref)
    with torch.inference_mode():
        assert torch.equal(SF.lrt_linear(x, w, ls2, b, seed=seed), ref)
        kl = SF.kl_sparse_vd_many([w], [ls2])
    assert torch.equal(kl, NI.kl_fwd([w.detach()], [ls2], False)[0])
    # a second derivative raises (as through the custom ops), a first one with create_graph works
    x.requires_grad_()
    y = SF.lrt_linear(x, w, ls2, b, seed=seed)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gx.sum().backward()
    kl = SF.kl_sparse_vd_many([w], [ls2])
    (gw,) = torch.autograd.grad(kl, w, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gw.sum().backward()


# --------------------------------------------------------------------------- argument checks
def test_cpp_argument_checks_name_the_argument():
    x, w, ls2, b = linear_inputs((3,), 4, 5)
    s = fresh_seed()
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
    C = torch.ops.sparsevd.native_lrt_conv2d
    cx, cw, cs, cb = conv_inputs((1, 4, 5, 5), (6, 2, 3), 2)
    cases += [
        (lambda: C(cx, cw, cs, cb, s, [1, 1], [0, 0], [1, 1], 4), "groups"),
        (lambda: C(cx, cw, cs, cb, s, [1], [0, 0], [1, 1], 2), "stride"),
        (lambda: C(cx, cw, cs, cb, s, [1, 1], [-1, 0], [1, 1], 2), "padding"),
        (lambda: C(cx, cw, cs, cb, s, [1, 1], [0, 0], [0, 1], 2), "dilation"),
        (lambda: C(cx[:, :3], cw, cs, cb, s, [1, 1], [0, 0], [1, 1], 2), "x"),
        (lambda: C(cx[..., :2, :2], cw, cs, cb, s, [1, 1], [0, 0], [1, 1], 2), "x"),
        (lambda: C(cx, cw[:, :, 0], cs[:, :, 0], cb, s, [1, 1], [0, 0], [1, 1], 2), "weight"),
    ]
    K = torch.ops.sparsevd.native_kl_sparse_vd
    cases += [
        (lambda: K([w, w], [ls2], True), "log_sigma2s"),
        (lambda: K([w], [ls2[:2]], True), "log_sigma2s"),
        (lambda: K([w], [ls2.double()], True), "log_sigma2s"),
        (lambda: K([w.int()], [ls2.int()], True), "weights"),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError, match=name):
            fn()
    with pytest.raises(RuntimeError, match="isa"):
        torch.ops.sparsevd.native_set_isa("sse9")
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.sparsevd.native_set_products("sometimes")
