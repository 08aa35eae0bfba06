"""sparsevd.ops: the Philox noise against Triton's tl.randn, the custom ops against the reference
math on identical noise (values and gradients), gradcheck, opcheck, and the backend selection."""
import math

import pytest
import torch
from conftest import assert_close

import sparsevd.functional as SF
from sparsevd import ops
from sparsevd import reference as R
from sparsevd.ops import backend
from sparsevd.ops.noise import lrt_noise, randn_like_index

F64 = torch.float64
N_SE = 5.0  # statistical bound, in standard errors (see test_reference.py)



@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests check the reference backend (the backend tests set their own value)."""
    monkeypatch.setenv("SPARSEVD_BACKEND", "reference")


def fresh_seed() -> torch.Tensor:
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


# ------------------------------------------------------------------------------------- noise
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _randn_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    """out[i] = tl.randn(seed, offset + i) for i < n (int32 offsets, as in the LRT kernels)."""
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    tl.store(out_ptr + o_i, tl.randn(seed, offset + o_i), mask=m_i)


def triton_randn(seed: int, n: int, offset: int = 0) -> torch.Tensor:
    out = torch.full((n,), float("nan"))
    block = 1024
    _randn_kernel[(triton.cdiv(n, block),)](out, seed, offset, n, BLOCK=block)
    return out


@pytest.mark.parametrize("seed_kind", ["fresh", "small", "high_word_only", "max"])
def test_noise_equals_triton_randn(seed_kind):
    seed = {
        "fresh": int(fresh_seed()),
        "small": int(torch.randint(0, 1000, ())),
        "high_word_only": int(torch.randint(1, 2**30, ())) << 32,
        "max": 2**63 - 1,
    }[seed_kind]
    n = 3001
    expected = triton_randn(seed, n)
    assert_close(randn_like_index(seed, n), expected, rtol=1e-5, atol=1e-5, name="noise")
    got = lrt_noise(torch.tensor([seed]), (3, 1000, 1))
    assert got.shape == (3, 1000, 1) and got.dtype == torch.float32
    assert_close(got.reshape(-1), expected[:3000], rtol=1e-5, atol=1e-5, name="lrt_noise")


def test_noise_equals_triton_randn_at_an_offset():
    seed, offset = int(fresh_seed()), int(torch.randint(1, 2**30, ()))
    expected = triton_randn(seed, 777, offset)
    assert_close(randn_like_index(seed, 777, offset=offset), expected, rtol=1e-5, atol=1e-5,
                 name="noise at offset")
    # The offset form is a slice of the long sequence.
    assert torch.equal(randn_like_index(seed, 50, offset=offset + 10),
                       randn_like_index(seed, 777, offset=offset)[10:60])


def test_noise_moments():
    n = 1 << 20
    xi = randn_like_index(int(fresh_seed()), n).double()
    assert torch.isfinite(xi).all()
    se = 1.0 / math.sqrt(n)
    assert abs(xi.mean().item()) < N_SE * se
    assert abs(xi.var().item() - 1.0) < N_SE * math.sqrt(2.0) * se
    c = xi - xi.mean()
    kurt = (c ** 4).mean().item() / xi.var().item() ** 2
    assert abs(kurt - 3.0) < N_SE * math.sqrt(24.0) * se
    assert abs((c ** 3).mean().item()) < N_SE * math.sqrt(15.0) * se  # E[ξ⁶] = 15
    # Normal CDF at a few points: each fraction is a binomial proportion.
    for t in (-2.0, -1.0, 0.0, 0.5, 1.5):
        p = 0.5 * math.erfc(-t / math.sqrt(2.0))
        frac = (xi < t).double().mean().item()
        assert abs(frac - p) < N_SE * math.sqrt(p * (1 - p) / n), f"P(ξ < {t})"
    # Neighbours (and elements one "row" apart) are uncorrelated.
    for lag in (1, 2, 7, 1024):
        r = (c[lag:] * c[:-lag]).mean().item() / xi.var().item()
        assert abs(r) < N_SE * se, f"lag-{lag} correlation {r}"


def test_noise_streams_of_two_seeds_are_uncorrelated():
    n = 1 << 18
    s = int(fresh_seed())
    a = randn_like_index(s, n).double()
    b = randn_like_index(s ^ 1, n).double()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) < N_SE / math.sqrt(n)


def test_noise_same_seed_same_output_different_seed_different():
    s = fresh_seed()
    a = lrt_noise(s, (64, 33))
    assert torch.equal(a, lrt_noise(s.clone(), (64, 33)))
    for other in (s + 1, s ^ (1 << 40)):  # low word and high word of the 64-bit key
        b = lrt_noise(other, (64, 33))
        assert (a != b).float().mean() > 0.999


# -------------------------------------------------------------------- ops against the reference
def linear_inputs(lead, k, n, dtype, with_bias, contiguous=True):
    if contiguous:
        x = torch.randn(*lead, k, dtype=dtype)
    else:
        x = torch.randn(*lead, 2 * k, dtype=dtype)[..., ::2]  # a strided view
        if len(lead) > 1:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous()
    w = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    ls2 = torch.randn(n, k, dtype=dtype) - 3
    b = torch.randn(n, dtype=dtype) if with_bias else None
    return x, w, ls2, b


LINEAR_CASES = [
    # lead, in_features, out_features, bias, contiguous
    ((5,), 7, 4, True, True),
    ((1,), 1, 1, True, True),
    ((33,), 123, 17, False, True),
    ((2, 3), 16, 9, True, True),
    ((4, 5), 11, 3, False, False),
    ((6,), 10, 8, True, False),
]


@pytest.mark.parametrize("lead,k,n,with_bias,contiguous", LINEAR_CASES)
def test_lrt_linear_forward_equals_reference(lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, with_bias, contiguous)
    seed = fresh_seed()
    y, std = ops.lrt_linear(x, w, ls2, b, seed)
    xi = lrt_noise(seed, (*lead, n)).double()
    d = [None if t is None else t.double() for t in (x, w, ls2, b)]
    expected = R.lrt_linear(*d, xi)
    assert y.dtype == torch.float32 and std.dtype == torch.float32
    assert_close(y, expected, rtol=1e-4, atol=1e-5, name="y")
    s2 = torch.nn.functional.linear(d[0] ** 2, d[2].exp())
    assert_close(std, torch.sqrt(s2 + 1e-8), rtol=1e-4, atol=1e-6, name="std")
    # fp64 op: the same math on the same noise, to rounding.
    y64, _ = ops.lrt_linear(*d, seed)
    assert_close(y64, expected, rtol=1e-12, atol=1e-12, name="y fp64")


def _linear_grads(fn, x, w, ls2, b, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, ls2)]
    bl = None if b is None else b.detach().clone().requires_grad_()
    y = fn(*leaves, bl)
    (y * g).sum().backward()
    return y, [t.grad for t in leaves] + ([] if bl is None else [bl.grad])


@pytest.mark.parametrize("lead,k,n,with_bias,contiguous", LINEAR_CASES)
def test_lrt_linear_gradients_equal_reference_autograd(lead, k, n, with_bias, contiguous):
    x, w, ls2, b = linear_inputs(lead, k, n, F64, with_bias, contiguous)
    seed = fresh_seed()
    xi = lrt_noise(seed, (*lead, n)).double()
    g = torch.randn(*lead, n, dtype=F64)
    y_op, grads_op = _linear_grads(lambda *a: ops.lrt_linear(*a, seed)[0], x, w, ls2, b, g)
    y_ref, grads_ref = _linear_grads(lambda *a: R.lrt_linear(*a, xi), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    # fp32 op against the fp64 reference.
    g32 = g.float()
    _, grads32 = _linear_grads(lambda *a: ops.lrt_linear(*a, seed)[0],
                               *[None if t is None else t.float() for t in (x, w, ls2, b)], g32)
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads32, grads_ref):
        scale = e.abs().max().item()
        assert_close(a, e, rtol=1e-4, atol=1e-5 * scale, name=f"fp32 grad {name}")


CONV_CASES = [
    # (N, C_in, H, W), (C_out, kH, kW), stride, padding, dilation, groups
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1),
    ((2, 3, 8, 7), (5, 3, 3), 2, 1, 1, 1),
    ((1, 2, 9, 10), (3, 2, 3), 1, 2, 2, 1),
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((3, 4, 5, 5), (4, 3, 3), 1, 1, 1, 4),
    ((1, 1, 4, 4), (1, 1, 1), 1, 0, 1, 1),
]


def conv_inputs(xs, ws, groups, dtype, with_bias=True, contiguous=True):
    n, c, h, wd = xs
    co, kh, kw = ws
    x = torch.randn(n, c, h, wd, dtype=dtype)
    if not contiguous:
        x = torch.randn(n, c, h, 2 * wd, dtype=dtype)[..., 1::2]
        assert not x.is_contiguous()
    fan_in = c // groups * kh * kw
    w = torch.randn(co, c // groups, kh, kw, dtype=dtype) / math.sqrt(fan_in)
    ls2 = torch.randn(co, c // groups, kh, kw, dtype=dtype) - 3
    b = torch.randn(co, dtype=dtype) if with_bias else None
    return x, w, ls2, b


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False)])
def test_lrt_conv2d_forward_and_gradients_equal_reference(xs, ws, stride, padding, dilation, groups,
                                                          with_bias, contiguous):
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    seed = fresh_seed()
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64, with_bias, contiguous)
    out_shape = torch.nn.functional.conv2d(x, w, None, *args).shape
    xi = lrt_noise(seed, out_shape).double()
    g = torch.randn(out_shape, dtype=F64)
    y_op, grads_op = _linear_grads(lambda *a: ops.lrt_conv2d(*a, seed, *args)[0], x, w, ls2, b, g)
    y_ref, grads_ref = _linear_grads(lambda *a: R.lrt_conv2d(*a, xi, *args), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    # fp32 forward against the fp64 reference on the same noise.
    y32, std32 = ops.lrt_conv2d(*[None if t is None else t.float() for t in (x, w, ls2, b)],
                                seed, *args)
    assert y32.dtype == torch.float32
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")


def test_lrt_linear_op_sample_moments_big_batch():
    """Many identical rows: each output element gets its own ξ; mean μ, variance s² + 1e-8."""
    n_draws, k, n = 4000, 13, 7
    x = torch.randn(1, k, dtype=F64)
    w = torch.randn(n, k, dtype=F64)
    ls2 = torch.randn(n, k, dtype=F64) - 1
    b = 10 * torch.randn(n, dtype=F64)
    y = SF.lrt_linear(x.expand(n_draws, k), w, ls2, b)
    mu = torch.einsum("k,nk->n", x[0], w) + b
    var = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp()) + 1e-8
    _check_moments(y, mu, var)


def test_lrt_linear_op_sample_moments_over_seeds():
    """4000 draws from 500 different seeds (8 identical rows each)."""
    k, n = 5, 3
    x = torch.randn(1, k, dtype=F64)
    w = torch.randn(n, k, dtype=F64)
    ls2 = torch.randn(n, k, dtype=F64) - 1
    b = torch.randn(n, dtype=F64)
    xs = x.expand(8, k)
    y = torch.cat([ops.lrt_linear(xs, w, ls2, b, fresh_seed())[0] for _ in range(500)])
    mu = torch.einsum("k,nk->n", x[0], w) + b
    var = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp()) + 1e-8
    _check_moments(y, mu, var)


def test_lrt_conv2d_op_sample_moments():
    n_draws = 2000
    x = torch.randn(1, 2, 5, 6, dtype=F64)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    ls2 = torch.randn(3, 2, 3, 3, dtype=F64) - 1
    b = 10 * torch.randn(3, dtype=F64)
    y = SF.lrt_conv2d(x.expand(n_draws, -1, -1, -1), w, ls2, b, stride=(1, 2), padding=1)
    mu = torch.nn.functional.conv2d(x, w, b, (1, 2), 1)[0]
    var = torch.nn.functional.conv2d(x * x, ls2.exp(), None, (1, 2), 1)[0] + 1e-8
    _check_moments(y, mu, var)


def _check_moments(y, mu, var):
    n = y.shape[0]
    z_mean = (y.mean(0) - mu) / torch.sqrt(var / n)
    z_var = (y.var(0) - var) / (var * math.sqrt(2.0 / (n - 1)))
    assert z_mean.abs().max() < N_SE, f"sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"sample variance {z_var.abs().max():.2f} SE off"


# ---------------------------------------------------------------------------------- gradcheck
def test_gradcheck_lrt_linear():
    x, w, ls2, b = linear_inputs((3,), 4, 5, F64, True)
    seed = fresh_seed()
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs)
    assert torch.autograd.gradcheck(lambda *a: ops.lrt_linear(*a, None, seed)[0], inputs[:3])


def test_gradcheck_lrt_linear_3d_noncontiguous():
    x, w, ls2, b = linear_inputs((2, 3), 4, 3, F64, True, contiguous=False)
    seed = fresh_seed()
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_linear(*a, seed=seed), inputs)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 2, 2)])
def test_gradcheck_lrt_conv2d(stride, padding, dilation, groups):
    x, w, ls2, b = conv_inputs((2, 2, 6, 5), (2, 2, 2), groups, F64)
    seed = fresh_seed()
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(
        lambda *a: SF.lrt_conv2d(*a, stride, padding, dilation, groups, seed=seed), inputs
    )


def _kl_params(shape):
    """θ and log σ² with log α spread over (−12, 12) but away from the clamp edges ±10."""
    w = torch.randn(shape, dtype=F64)
    w = torch.where(w < 0, w - 0.1, w + 0.1)
    la = torch.empty(shape, dtype=F64).uniform_(-12, 12)
    la = torch.where((la.abs() - 10).abs() < 0.05, la * 0.9, la)
    return w, la + torch.log(w * w + 1e-8)


def test_gradcheck_kl_sparse_vd():
    w1, s1 = _kl_params((4, 3))
    w2, s2 = _kl_params((2, 1, 2, 2))
    inputs = [t.requires_grad_() for t in (w1, s1, w2, s2)]
    assert torch.autograd.gradcheck(SF.kl_sparse_vd, inputs[:2])
    assert torch.autograd.gradcheck(lambda a, b, c, d: SF.kl_sparse_vd_many([a, c], [b, d]), inputs)
    assert torch.autograd.gradcheck(lambda a, b, c, d: ops.kl_sparse_vd([a, c], [b, d], True)[0],
                                    inputs)


def test_gradcheck_log_alpha():
    w, ls2 = _kl_params((5, 4))
    inputs = [t.requires_grad_() for t in (w, ls2)]
    assert torch.autograd.gradcheck(ops.log_alpha, inputs)
    assert torch.autograd.gradcheck(SF.log_alpha, inputs)


def test_kl_op_value_and_gradients_equal_reference():
    shapes = [(7, 5), (3, 2, 3, 3), (1, 1)]
    params = [_kl_params(s) for s in shapes]
    ws = [p[0].requires_grad_() for p in params]
    ss = [p[1].requires_grad_() for p in params]
    kl = ops.kl_sparse_vd(ws, ss, True)[0]
    g_op = torch.autograd.grad(kl * 1.7, ws + ss)
    kl_ref = sum(R.kl_sparse_vd(w, s) for w, s in zip(ws, ss))
    g_ref = torch.autograd.grad(kl_ref * 1.7, ws + ss)
    assert_close(kl, kl_ref, rtol=1e-12, atol=1e-12, name="kl")
    for i, (a, e) in enumerate(zip(g_op, g_ref)):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {i}")
    # with_grad=False: the same value, no gradients, and differentiating it is an error.
    kl_ng, gw, gs = ops.kl_sparse_vd([w.detach() for w in ws], [s.detach() for s in ss], False)
    assert gw == [] and gs == []
    assert_close(kl_ng, kl_ref, rtol=1e-12, atol=1e-12, name="kl without grad")
    with pytest.raises(RuntimeError, match="with_grad=True"):
        ops.kl_sparse_vd(ws, ss, False)[0].backward()


def test_kl_op_fp32_against_fp64():
    w, s = _kl_params((40, 30))
    kl32 = ops.kl_sparse_vd([w.float()], [s.float()], False)[0]
    assert kl32.dtype == torch.float32
    assert_close(kl32, R.kl_sparse_vd(w, s), rtol=1e-5, atol=1e-5, name="kl fp32")


def test_log_alpha_op_equals_reference():
    w = torch.randn(9, 8)
    ls2 = torch.randn(9, 8) * 12
    assert_close(ops.log_alpha(w, ls2), R.log_alpha(w.double(), ls2.double()), rtol=1e-5,
                 atol=1e-5, name="log_alpha")


# ------------------------------------------------------------------------------------ opcheck
def test_opcheck_lrt_linear_and_backward():
    for lead, with_bias in (((3,), True), ((2, 3), False)):
        x, w, ls2, b = linear_inputs(lead, 4, 5, F64, with_bias)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = fresh_seed()
        torch.library.opcheck(ops.lrt_linear, (x, w, ls2, b, seed))
        y, std = ops.lrt_linear(x, w, ls2, b, seed)
        torch.library.opcheck(
            ops.lrt_linear_backward,
            (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed),
        )
    x, w, ls2, b = linear_inputs((6,), 5, 3, torch.float32, True)
    torch.library.opcheck(ops.lrt_linear, (x, w, ls2, b, fresh_seed()))


def test_opcheck_lrt_conv2d_and_backward():
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
        torch.library.opcheck(
            ops.lrt_conv2d_backward,
            (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed, *args),
        )


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_opcheck_kl_sparse_vd(dtype):
    p1, p2 = _kl_params((4, 3)), _kl_params((2, 1, 2, 2))
    ws = [p1[0].to(dtype), p2[0].to(dtype)]
    ss = [p1[1].to(dtype), p2[1].to(dtype)]
    torch.library.opcheck(ops.kl_sparse_vd, (ws, ss, False))
    ws = [w.requires_grad_() for w in ws]
    ss = [s.requires_grad_() for s in ss]
    torch.library.opcheck(ops.kl_sparse_vd, (ws, ss, True))


def test_opcheck_log_alpha():
    w, ls2 = _kl_params((5, 4))
    torch.library.opcheck(ops.log_alpha, (w.requires_grad_(), ls2.requires_grad_()))
    torch.library.opcheck(ops.log_alpha, (w.detach().float(), ls2.detach().float()))


# ------------------------------------------------------------------------------ backend choice
def _lin_args():
    x, w, ls2, b = linear_inputs((3,), 4, 2, torch.float32, True)
    return x, w, ls2, b


def test_backend_unknown_value_raises_value_error(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "tritonn")
    with pytest.raises(ValueError,
                       match=r"SPARSEVD_BACKEND='tritonn'.*auto, triton, cuda, native, reference"):
        SF.lrt_linear(*_lin_args())
    with pytest.raises(ValueError, match="SPARSEVD_BACKEND"):
        backend.requested_backend()


@pytest.mark.parametrize("value", ["reference", "auto", " Reference ", ""])
def test_backend_reference_and_auto_run_on_cpu(monkeypatch, value):
    monkeypatch.setenv("SPARSEVD_BACKEND", value)
    x, w, ls2, b = _lin_args()
    seed = fresh_seed()
    y = SF.lrt_linear(x, w, ls2, b, seed=seed)
    expected = R.lrt_linear(x.double(), w.double(), ls2.double(), b.double(),
                            lrt_noise(seed, (3, 2)).double())
    assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_backend_triton_without_interpreter_on_cpu_raises(monkeypatch):
    # Import the Triton provider (if present) with the interpreter on, so its @triton.jit
    # functions stay usable by the rest of the session.
    backend._load_provider("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")
    with pytest.raises(backend.BackendUnavailableError, match="SPARSEVD_BACKEND=triton"):
        SF.lrt_linear(*_lin_args())
    # Even where the Triton backend has the op, CPU tensors need the interpreter.
    monkeypatch.setitem(backend._IMPLS, ("lrt_linear", "triton"), R.lrt_linear)
    with pytest.raises(backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        SF.lrt_linear(*_lin_args())
    with pytest.raises(backend.BackendUnavailableError):
        backend.get_impl("lrt_linear", torch.device("cpu"))


def test_backend_cuda_without_the_op_raises(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "cuda")
    backend._load_provider("cuda")
    for op in ("lrt_linear", "kl_sparse_vd"):
        monkeypatch.delitem(backend._IMPLS, (op, "cuda"), raising=False)
    with pytest.raises(backend.BackendUnavailableError, match="SPARSEVD_BACKEND=cuda.*lrt_linear"):
        SF.lrt_linear(*_lin_args())
    w, s = _kl_params((3, 3))
    with pytest.raises(backend.BackendUnavailableError, match="kl_sparse_vd"):
        SF.kl_sparse_vd(w, s)


def test_backend_error_is_a_runtime_error():
    assert issubclass(backend.BackendUnavailableError, RuntimeError)
    with pytest.raises(ValueError, match="backend"):
        backend.register_impl("lrt_linear", "auto", R.lrt_linear)
