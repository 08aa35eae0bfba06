"""The op family ``lrt_conv`` (sparsevd.ops.lrt: ``sparsevd::lrt_conv2d`` and its backward) on
every backend that runs it here, against the reference math (sparsevd.reference) on identical
noise: values and gradients for every convolution option, statistics, gradcheck, opcheck.
"""
import math

import pytest
import torch
from conftest import assert_close
from sample_inputs import (F64, CONV1D_CASES, CONV_CASES, as_list, backends_for, clip_case, conv1d_inputs,
                           conv_inputs, device_for, fresh_seed)

import sparsevd.functional as SF
from sparsevd import ops
from sparsevd import reference as R
from sparsevd.ops.noise import lrt_noise

N_SE = 5.0
BACKENDS = backends_for("lrt_conv2d")


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    """Every test of this module runs once per backend (SPARSEVD_BACKEND)."""
    monkeypatch.setenv("SPARSEVD_BACKEND", request.param)
    return request.param


@pytest.fixture
def dev(backend):
    return device_for(backend)


def _grads(fn, x, w, ls2, b, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, ls2)]
    bl = None if b is None else b.detach().clone().requires_grad_()
    y = fn(*leaves, bl)
    (y * g).sum().backward()
    return y, [t.grad for t in leaves] + ([] if bl is None else [bl.grad])


def _conv_noise(shape, seed):
    """ξ of a conv output of ``shape`` as the backend draws it: the op with a 1x1 kernel of
    θ = 0, log σ² = 0 on x = 1 gives y = sqrt(1 + 1e-8)·ξ = ξ in fp32."""
    n, c, h, w = shape
    x = torch.ones(n, 1, h, w, device=seed.device)
    z = torch.zeros(c, 1, 1, 1, device=seed.device)
    return ops.lrt_conv2d(x, z, z, None, seed, [1, 1], [0, 0], [1, 1], 1)[0].to(F64)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False)])
def test_forward_and_gradients_equal_reference(dev, xs, ws, stride, padding, dilation, groups,
                                               with_bias, contiguous):
    args = (as_list(stride), as_list(padding), as_list(dilation), groups)
    seed = fresh_seed(dev)
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64, with_bias, contiguous, dev)
    out_shape = torch.nn.functional.conv2d(x, w, None, *args).shape
    xi = _conv_noise(out_shape, seed)
    g = torch.randn(out_shape, dtype=F64, device=dev)
    y_op, grads_op = _grads(lambda *a: ops.lrt_conv2d(*a, seed, *args)[0], x, w, ls2, b, g)
    y_ref, grads_ref = _grads(lambda *a: R.lrt_conv2d(*a, xi, *args), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    # fp32 forward against the fp64 reference on the same noise.
    y32, std32 = ops.lrt_conv2d(*[None if t is None else t.float() for t in (x, w, ls2, b)],
                                seed, *args)
    assert y32.dtype == torch.float32 and std32.dtype == torch.float32
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")


def test_noise_is_lrt_noise(dev):
    """ξ of the conv op is sparsevd.ops.lrt_noise(seed, y.shape), indexed by the row-major
    offset of the (N, C_out, H_out, W_out) output."""
    seed = fresh_seed(dev)
    assert_close(_conv_noise((2, 3, 5, 4), seed), lrt_noise(seed, (2, 3, 5, 4)), rtol=1e-5,
                 atol=1e-5, name="xi")


def test_sample_moments(dev):
    n_draws = 2000
    x = torch.randn(1, 2, 5, 6, dtype=F64, device=dev)
    w = torch.randn(3, 2, 3, 3, dtype=F64, device=dev)
    ls2 = torch.randn(3, 2, 3, 3, dtype=F64, device=dev) - 1
    b = 10 * torch.randn(3, dtype=F64, device=dev)
    y = SF.lrt_conv2d(x.expand(n_draws, -1, -1, -1), w, ls2, b, stride=(1, 2), padding=1)
    mu = torch.nn.functional.conv2d(x, w, b, (1, 2), 1)[0]
    var = torch.nn.functional.conv2d(x * x, ls2.exp(), None, (1, 2), 1)[0] + 1e-8
    z_mean = (y.mean(0) - mu) / torch.sqrt(var / n_draws)
    z_var = (y.var(0) - var) / (var * math.sqrt(2.0 / (n_draws - 1)))
    assert z_mean.abs().max() < N_SE, f"sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"sample variance {z_var.abs().max():.2f} SE off"


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 2, 2)])
def test_gradcheck(backend, dev, stride, padding, dilation, groups):
    """Full gradcheck for the reference; fast mode (a random projection of the Jacobian, a few
    launches instead of one per input and output element) for the Triton kernels in the
    interpreter, whose full gradchecks on tinier shapes are in test_lrt_conv_triton.py."""
    x, w, ls2, b = conv_inputs((2, 2, 6, 5), (2, 2, 2), groups, F64, device=dev)
    seed = fresh_seed(dev)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(
        lambda *a: SF.lrt_conv2d(*a, stride, padding, dilation, groups, seed=seed), inputs,
        fast_mode=backend == "triton" and dev == "cpu",
    )


def test_opcheck_forward_and_backward(dev):
    for xs, ws, groups, args, with_bias in (
        ((2, 4, 7, 6), (6, 3, 3), 2, ([2, 2], [1, 1], [1, 1], 2), True),
        ((1, 2, 5, 5), (3, 2, 2), 1, ([1, 1], [0, 1], [2, 1], 1), False),
    ):
        x, w, ls2, b = conv_inputs(xs, ws, groups, F64, with_bias, device=dev)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = fresh_seed(dev)
        torch.library.opcheck(ops.lrt_conv2d, (x, w, ls2, b, seed, *args))
        y, std = ops.lrt_conv2d(x, w, ls2, b, seed, *args)
        torch.library.opcheck(
            ops.lrt_conv2d_backward,
            (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed, *args),
        )


def test_backward_without_grad_x(dev):
    """need_grad_x=False (x needs no gradient, e.g. a first layer): ∂x comes back empty and the
    parameter gradients are those of the full backward; autograd passes it for such an x."""
    x, w, ls2, b = conv_inputs((2, 3, 6, 5), (4, 3, 3), 1, F64, device=dev)
    args = ([1, 1], [1, 1], [1, 1], 1)
    seed = fresh_seed(dev)
    y, std = ops.lrt_conv2d(x, w, ls2, b, seed, *args)
    g = torch.randn_like(y)
    full = ops.lrt_conv2d_backward(g, x, w, ls2, std, seed, *args)
    part = ops.lrt_conv2d_backward(g, x, w, ls2, std, seed, *args, False)
    assert part[0].shape == (0,)
    for name, a, e in zip(("weight", "log_sigma2", "bias"), part[1:], full[1:]):
        assert_close(a, e, rtol=1e-12, atol=1e-12, name=f"grad {name}")
    leaves = [t.clone().requires_grad_() for t in (w, ls2, b)]
    ops.lrt_conv2d(x, *leaves, seed, *args)[0].backward(g)
    for name, t, e in zip(("weight", "log_sigma2", "bias"), leaves, full[1:]):
        assert_close(t.grad, e, rtol=1e-12, atol=1e-12, name=f"autograd grad {name}")


# ------------------------------------------------------------------ train-time clipping
#: (x shape, (C_out, kH, kW), stride, padding, dilation, groups, dead output channels,
#: dead input channels (dim 1 of θ))
CLIP_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1, (), ()),
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2, (0, 5), (1,)),
    ((3, 4, 5, 5), (4, 3, 3), 1, 1, 1, 4, (2,), ()),
    ((1, 5, 6, 6), (7, 3, 3), 1, 1, 1, 1, (1, 2, 6), (0, 3)),
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups,dead_out,dead_in", CLIP_CASES)
def test_clip_threshold_equals_reference(dev, xs, ws, stride, padding, dilation, groups, dead_out,
                                         dead_in):
    """Train-time clipping on the convolution: forward and gradients equal the reference with
    the mask applied on identical noise; the clipped weights get exactly zero LRT gradients."""
    args = (as_list(stride), as_list(padding), as_list(dilation), groups)
    seed = fresh_seed(dev)
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64, True, True, dev)
    thr = clip_case(w, ls2, dead_out, dead_in)
    m = R.eval_mask(w, ls2, thr)
    assert 0 < int(m.sum()) < m.numel()
    out_shape = torch.nn.functional.conv2d(x, w, None, *args).shape
    xi = _conv_noise(out_shape, seed)
    g = torch.randn(out_shape, dtype=F64, device=dev)
    y_op, grads_op = _grads(lambda *a: ops.lrt_conv2d(*a, seed, *args, thr)[0], x, w, ls2, b, g)
    y_ref, grads_ref = _grads(lambda *a: R.lrt_conv2d(*a, xi, *args, clip_threshold=thr),
                              x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    assert torch.all(grads_op[1][~m] == 0) and torch.all(grads_op[2][~m] == 0)
    x32, w32, ls32, b32 = (t.float() for t in (x, w, ls2, b))
    y32, std32 = ops.lrt_conv2d(x32, w32, ls32, b32, seed, *args, thr)
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")
    gx, gw, gl, gb = ops.lrt_conv2d_backward(g.float(), x32, w32, ls32, std32, seed, *args, False,
                                             thr)
    assert gx.numel() == 0
    for name, a, e in zip(("weight", "log_sigma2", "bias"), (gw, gl, gb), grads_ref[1:]):
        assert_close(a, e, rtol=1e-3, atol=1e-4, name=f"grad {name} fp32")
    assert torch.all(gw[~m] == 0) and torch.all(gl[~m] == 0)


def test_clip_threshold_gradcheck_and_opcheck(dev):
    x, w, ls2, b = conv_inputs((1, 2, 5, 4), (3, 3, 2), 1, F64, device=dev)
    thr = clip_case(w, ls2, (1,), (0,))
    args = ([1, 1], [1, 0], [1, 1], 1)
    seed = fresh_seed(dev)
    leaves = tuple(t.requires_grad_() for t in (x, w, ls2, b))
    assert torch.autograd.gradcheck(lambda *a: ops.lrt_conv2d(*a, seed, *args, thr)[0], leaves)
    torch.library.opcheck(ops.lrt_conv2d, (*leaves, seed, *args, thr))
    y, std = ops.lrt_conv2d(*leaves, seed, *args, thr)
    torch.library.opcheck(ops.lrt_conv2d_backward,
                          (torch.randn_like(y), *(t.detach() for t in leaves[:3]), std.detach(),
                           seed, *args, True, thr))


def _conv1d_reference(x, w, ls2, b, xi, stride, padding, dilation, groups, clip_threshold=None):
    """The LRT of a 1-D convolution written out with F.conv1d (eq. of sec. 4.2 in 1-D)."""
    F = torch.nn.functional
    if clip_threshold is not None:
        w, s2 = R.clip_parameters(w, ls2, clip_threshold)
    else:
        s2 = torch.exp(ls2)
    mean = F.conv1d(x, w, b, stride, padding, dilation, groups)
    var = F.conv1d(x * x, s2, None, stride, padding, dilation, groups)
    return mean + torch.sqrt(var + 1e-8) * xi


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV1D_CASES)
@pytest.mark.parametrize("clip", [False, True])
def test_conv1d_equals_reference(dev, xs, ws, stride, padding, dilation, groups, clip):
    """lrt_conv1d (the 2-D kernels over (N, C, 1, L)) equals the 1-D LRT written with F.conv1d
    on the same noise, values and gradients; with clipping, the clipped weights get zero
    gradients."""
    seed = fresh_seed(dev)
    x, w, ls2, b = conv1d_inputs(xs, ws, groups, F64, True, clip, dev)
    thr = clip_case(w, ls2, (1,), ()) if clip else None
    out_shape = torch.nn.functional.conv1d(x, w, None, stride, padding, dilation, groups).shape
    xi = _conv_noise((out_shape[0], out_shape[1], 1, out_shape[2]), seed).view(out_shape)
    g = torch.randn(out_shape, dtype=F64, device=dev)
    kw = dict(seed=seed, clip_threshold=thr)
    y_op, grads_op = _grads(lambda *a: SF.lrt_conv1d(*a, stride, padding, dilation, groups, **kw),
                            x, w, ls2, b, g)
    y_ref, grads_ref = _grads(
        lambda *a: _conv1d_reference(*a, xi, stride, padding, dilation, groups, thr), x, w, ls2, b, g)
    assert y_op.shape == out_shape
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    if clip:
        m = R.eval_mask(w, ls2, thr)
        assert 0 < int(m.sum()) < m.numel()
        assert torch.all(grads_op[1][~m] == 0) and torch.all(grads_op[2][~m] == 0)
    y1 = SF.lrt_conv1d(x[0], w, ls2, b, stride, padding, dilation, groups, **kw)  # unbatched
    assert y1.shape == out_shape[1:]


def test_conv1d_errors_name_the_argument(dev):
    x, w, ls2, b = conv1d_inputs((2, 3, 8), (4, 3), 1, device=dev)
    cases = [
        (dict(x=x.unsqueeze(2)), ValueError, "x:"),
        (dict(weight=w.unsqueeze(2), log_sigma2=ls2.unsqueeze(2)), ValueError, "weight:"),
        (dict(log_sigma2=ls2[:, :2]), ValueError, "log_sigma2"),
        (dict(stride=(1, 2)), ValueError, "stride:"),
        (dict(padding="full"), ValueError, "padding:"),
        (dict(dilation=0), ValueError, "dilation:"),
        (dict(x=x[:, :2]), ValueError, "x:"),
        (dict(x=x.double()), TypeError, "x:"),
        (dict(x=x[..., :1]), ValueError, "x:"),
    ]
    for change, err, msg in cases:
        a = dict(x=x, weight=w, log_sigma2=ls2, bias=b, stride=1, padding=0, dilation=1)
        a.update(change)
        with pytest.raises(err, match=msg):
            SF.lrt_conv1d(**a)
