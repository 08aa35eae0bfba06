"""The ``native`` backend of ``lrt_conv2d`` (csrc/cpu/lrt_conv2d_cpu.cpp and the weight pass it shares
with lrt_linear, csrc/cpu/lrt_common_cpu.cpp; sparsevd/ops/lrt_conv2d/native.py) against the naive
math (the reference backend, called directly) and fp64 oracles on IDENTICAL noise: what is
particular to the compiled CPU kernels. Every kernel set this CPU runs (``isa``); the family's
cases and the kernels' own (sample_inputs.CONV_BOUNDARY_CASES); empty batches; bf16 and CPU bf16
autocast; train-time clipping with compaction of dead channels (``compact``); threads and product
modes; the eager C++ autograd path against the custom op, bit for bit; argument checks. The tests
every backend passes are in test_lrt_conv2d.py.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, close, eager_and_custom_op, grad_scale, with_compact
from sample_inputs import (CLIP_CONV_STRUCTURE_CASES, CONV_BOUNDARY_CASES, CONV_CASES, F64, as_list, clip_case,
                           conv_inputs)

import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.lrt_conv2d import lrt_conv2d, naive_lrt_conv2d, naive_lrt_conv2d_backward
from sparsevd.ops.noise import draw_seed, lrt_noise

N = pytest.importorskip("sparsevd.ops.lrt_conv2d.native", reason="native backend unavailable")

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "native")


def _max_err(a, oracle):
    return float((a.double() - oracle).abs().max())


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES + CONV_BOUNDARY_CASES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False)])
def test_forward_and_backward_equal_reference(isa, xs, ws, stride, padding, dilation, groups,
                                              with_bias, contiguous):
    args = (as_list(stride), as_list(padding), as_list(dilation), groups)
    for dtype, rtol in ((torch.float32, 2e-5), (F64, 1e-11)):
        x, w, ls2, b = conv_inputs(xs, ws, groups, dtype, with_bias, contiguous)
        seed = draw_seed()
        y_r, std_r = naive_lrt_conv2d(x, w, ls2, b, seed, *args)
        y, std = N.native_lrt_conv2d(x, w, ls2, b, seed, *args)
        assert y.shape == y_r.shape and y.dtype == dtype and std.dtype == dtype
        close(y, y_r, rtol, f"y {dtype}")
        close(std, std_r, rtol, f"std {dtype}")
        g = torch.randn_like(y_r)
        ref = naive_lrt_conv2d_backward(g, x, w, ls2, std_r, seed, *args)
        got = N.native_lrt_conv2d_backward(g, x, w, ls2, std_r, seed, *args)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), got, ref):
            assert a.shape == e.shape and a.dtype == e.dtype, name
            close(a, e, rtol, f"{name} {dtype}", scale=grad_scale(name, g, 1))
        no_dx = N.native_lrt_conv2d_backward(g, x, w, ls2, std_r, seed, *args, need_grad_x=False)
        assert no_dx[0].numel() == 0
        for a, e in zip(no_dx[1:], got[1:]):
            assert torch.equal(a, e)


def test_empty_batch():
    x, w, ls2, b = conv_inputs((0, 3, 6, 6), (4, 3, 3), 1)
    seed = draw_seed()
    args = ([1, 1], [1, 1], [1, 1], 1)
    y, std = N.native_lrt_conv2d(x, w, ls2, b, seed, *args)
    assert y.shape == std.shape == (0, 4, 6, 6)
    gx, gw, gls2, gb = N.native_lrt_conv2d_backward(torch.randn(0, 4, 6, 6), x, w, ls2, std, seed, *args)
    assert gx.shape == x.shape and gw.shape == w.shape and gls2.shape == w.shape and gb.shape == (4,)
    assert not gw.any() and not gls2.any() and not gb.any()


def test_gradients_through_autograd_equal_fp64_reference():
    args = ([2, 1], [1, 0], [1, 2], 2)
    for x_grad in (True, False):
        x, w, ls2, b = conv_inputs((2, 4, 8, 9), (6, 3, 2), 2, F64)
        seed = draw_seed()
        out_shape = F.conv2d(x, w, None, *args).shape
        xi = lrt_noise(seed, out_shape).double()
        g = torch.randn(out_shape, dtype=F64)

        def grads(fn):
            leaves = [x.clone().requires_grad_(x_grad)] + [t.clone().requires_grad_() for t in (w, ls2, b)]
            (fn(*leaves) * g).sum().backward()
            return [t.grad for t in leaves]

        got = grads(lambda *a: SF.lrt_conv2d(*a, *args, seed=seed))
        ref = grads(lambda *a: naive_lrt_conv2d(*a, None, *args, noise=xi)[0])
        for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), got, ref):
            if not x_grad and name == "x":
                assert a is None
                continue
            close(a, e, 1e-10, f"grad {name}")


def test_cpu_autocast_bf16():
    """Under CPU bf16 autocast the op receives bf16 x and fp32 parameters: y in bf16, std in fp32,
    products in fp32; error vs fp64 at most 2x the reference backend's under the same autocast."""
    seed = draw_seed()
    cx, cw, cs, cb = conv_inputs((2, 3, 9, 9), (4, 3, 3), 1)
    args = ([1, 1], [1, 1], [1, 1], 1)
    with torch.autocast("cpu", dtype=BF16):
        yc, stdc = lrt_conv2d(cx.bfloat16(), cw, cs, cb, seed, *args)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPARSEVD_BACKEND", "reference")
            yc_r, _ = lrt_conv2d(cx.bfloat16(), cw, cs, cb, seed, *args)
    assert yc.dtype == BF16 and stdc.dtype == torch.float32
    xi_c = lrt_noise(seed, yc.shape).double()
    oracle_c = naive_lrt_conv2d(cx.bfloat16().double(), cw.double(), cs.double(), cb.double(), None, *args,
                                noise=xi_c)[0]
    assert _max_err(yc, oracle_c) <= 2 * _max_err(yc_r, oracle_c) + 1e-6


def test_bf16_plain():
    x, w, ls2, b = conv_inputs((2, 4, 8, 8), (6, 2, 3), 2, BF16)
    seed = draw_seed()
    args = ([1, 1], [1, 1], [1, 1], 2)
    y_r, std_r = naive_lrt_conv2d(x, w, ls2, b, seed, *args)
    y, std = N.native_lrt_conv2d(x, w, ls2, b, seed, *args)
    assert y.dtype == BF16 and std.dtype == BF16
    xi = lrt_noise(seed, y.shape).double()
    oracle = naive_lrt_conv2d(*[t.double() for t in (x, w, ls2, b)], None, *args, noise=xi)[0]
    assert _max_err(y, oracle) <= 2 * _max_err(y_r, oracle) + 1e-6


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups,dead_out,dead_in", CLIP_CONV_STRUCTURE_CASES)
def test_clip_conv2d_equals_reference(compact, xs, ws, stride, padding, dilation, groups, dead_out, dead_in):
    """Clipped conv2d forward and gradients against the reference backend (fp32 and fp64),
    exact zeros for dropped weights, dead output channels (std = sqrt(1e-8)) and dead input
    channels (∂x), everything finite, and the compacted results against the uncompacted."""
    args = (as_list(stride), list(padding) if isinstance(padding, tuple) and len(padding) == 4
            else as_list(padding), as_list(dilation), groups)
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64)
    thr = clip_case(w, ls2, dead_out, dead_in)
    m = W.clip_mask(w, ls2, thr) != 0
    assert 0 < int(m.sum()) < m.numel()
    for dtype, rtol in ((F64, 1e-11), (torch.float32, 2e-5)):
        xd, wd, ld, bd = (t.to(dtype) for t in (x, w, ls2, b))
        seed = draw_seed()
        y_r, std_r = naive_lrt_conv2d(xd, wd, ld, bd, seed, *args, thr)
        y, std = N.native_lrt_conv2d(xd, wd, ld, bd, seed, *args, thr)
        assert y.shape == y_r.shape and torch.isfinite(y).all() and torch.isfinite(std).all()
        close(y, y_r, rtol, f"y {dtype}")
        close(std, std_r, rtol, f"std {dtype}")
        if dead_out:  # s² = 0 exactly: std = sqrt(1e-8)
            d = std[:, list(dead_out)]
            assert torch.all(d == d.flatten()[0])
            assert_close(d, std_r[:, list(dead_out)], rtol=1e-6, atol=0, name="dead channels: std")
        g = torch.randn_like(y_r)
        ref = naive_lrt_conv2d_backward(g, xd, wd, ld, std_r, seed, *args, True, thr)
        got = N.native_lrt_conv2d_backward(g, xd, wd, ld, std, seed, *args, True, thr)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), got, ref):
            assert a.shape == e.shape and a.dtype == e.dtype and torch.isfinite(a).all(), name
            close(a, e, rtol, f"{name} {dtype}", scale=grad_scale(name, g, 1))
        assert torch.all(got[1][~m] == 0) and torch.all(got[2][~m] == 0)
        if dead_in and groups == 1:
            assert torch.all(got[0][:, list(dead_in)] == 0)
        no_dx = N.native_lrt_conv2d_backward(g, xd, wd, ld, std, seed, *args, False, thr)
        assert no_dx[0].numel() == 0 and all(torch.equal(a, e) for a, e in zip(no_dx[1:], got[1:]))
        if dtype == torch.float32 and compact == "always":  # compacted vs uncompacted (see the linear test)
            full = with_compact("never", lambda: (
                *N.native_lrt_conv2d(xd, wd, ld, bd, seed, *args, thr),
                *N.native_lrt_conv2d_backward(g, xd, wd, ld, std, seed, *args, True, thr)))
            for name, a, e in zip(("y", "std", "gx", "gw", "gls2", "gb"), (y, std, *got), full):
                close(a, e, 1e-5, f"compacted {name}", atol_rel=1e-6)


@pytest.mark.parametrize("mode", ["never", "always", "sparse"])
def test_clip_gradcheck(mode):
    """fp64 gradcheck of the clipped op (tiny, with dead channels), through autograd, compacted
    and not."""
    old = torch.ops.sparsevd.native_set_compact(mode)
    try:
        seed = draw_seed()
        x, w, ls2, b = conv_inputs((1, 3, 5, 4), (4, 2, 2), 1, F64)
        thr = clip_case(w, ls2, (0, 3), (1,))
        args = ([1, 1], [1, 0], [1, 1], 1)
        leaves = [t.requires_grad_() for t in (x, w, ls2, b)]
        assert torch.autograd.gradcheck(
            lambda *a: SF.lrt_conv2d(*a, *args, seed=seed, clip_threshold=thr), leaves)
    finally:
        torch.ops.sparsevd.native_set_compact(old)


def test_two_threads_and_product_modes(two_threads):
    """The parallel passes (per-thread bias-gradient partials) and both ways of running the
    products give the reference's results on 2 threads."""
    seed = draw_seed()
    cx, cw, cs, cb = conv_inputs((4, 3, 20, 20), (8, 3, 3), 1)
    args = ([1, 1], [1, 1], [1, 1], 1)
    yc_r, stdc_r = naive_lrt_conv2d(cx, cw, cs, cb, seed, *args)
    yc, _ = N.native_lrt_conv2d(cx, cw, cs, cb, seed, *args)
    close(yc, yc_r, 2e-5, "conv y")
    gc = torch.randn_like(yc)
    for name, a, e in zip(("gx", "gw", "gls2", "gb"), N.native_lrt_conv2d_backward(gc, cx, cw, cs, stdc_r, seed, *args),
                          naive_lrt_conv2d_backward(gc, cx, cw, cs, stdc_r, seed, *args)):
        close(a, e, 2e-5, f"conv {name}")


@pytest.mark.parametrize("padding,channels_last", [([1, 1], False), ("same", False), ([0, 0], True)])
def test_eager_conv2d_equals_custom_op_bitwise(padding, channels_last):
    """The conv layer's eager path: bit-identical to the custom op (values and layout), also with
    padding="same" on an even kernel (padded explicitly, F.pad's backward crops ∂x) and
    channels_last inputs."""
    x, w, ls2, b = conv_inputs((2, 3, 9, 8), (5, 2, 2) if padding == "same" else (5, 3, 3), 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = draw_seed()
    leaves = [x.requires_grad_(), w.requires_grad_(), ls2.requires_grad_(), b.requires_grad_()]
    out = eager_and_custom_op(lambda x, w, s, b: SF.lrt_conv2d(x, w, s, b, padding=padding, seed=seed), leaves)
    (y_e, fn_e, g_e), (y_c, fn_c, g_c) = out["eager"], out["custom_op"]
    assert "lrt_conv2d" in fn_c and "lrt_conv2d" not in fn_e, (fn_e, fn_c)
    assert torch.equal(y_e, y_c) and y_e.stride() == y_c.stride()
    for a, e in zip(g_e, g_c):
        assert torch.equal(a, e)


def test_cpp_argument_checks_name_the_argument():
    s = draw_seed()
    C = torch.ops.sparsevd.native_lrt_conv2d
    cx, cw, cs, cb = conv_inputs((1, 4, 5, 5), (6, 2, 3), 2)
    cases = [
        (lambda: C(cx, cw, cs, cb, s, [1, 1], [0, 0], [1, 1], 4), "groups"),
        (lambda: C(cx, cw, cs, cb, s, [1], [0, 0], [1, 1], 2), "stride"),
        (lambda: C(cx, cw, cs, cb, s, [1, 1], [-1, 0], [1, 1], 2), "padding"),
        (lambda: C(cx, cw, cs, cb, s, [1, 1], [0, 0], [0, 1], 2), "dilation"),
        (lambda: C(cx[:, :3], cw, cs, cb, s, [1, 1], [0, 0], [1, 1], 2), "x"),
        (lambda: C(cx[..., :2, :2], cw, cs, cb, s, [1, 1], [0, 0], [1, 1], 2), "x"),
        (lambda: C(cx, cw[:, :, 0], cs[:, :, 0], cb, s, [1, 1], [0, 0], [1, 1], 2), "weight"),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError, match=name):
            fn()
