"""The op family ``lrt_conv2d`` (sparsevd/ops/lrt_conv2d: ``sparsevd::lrt_conv2d`` and its backward,
and ``lrt_conv1d`` on it) on every backend and device that run here (conftest.py: ``backend``,
``device``), against the family's naive math (sparsevd.lrt_conv2d.naive) on identical noise:
values and gradients for every convolution option, statistics, gradcheck, opcheck, train-time
clipping, torch.compile; the math itself by hand.

Backend-only tests: test_lrt_conv2d_native.py, test_lrt_conv2d_triton.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, compiled_equals_eager, grads_of
from sample_inputs import (F64, CONV1D_CASES, CONV_CASES, CONV_CLIP_CASES, as_list, clip_case, conv1d_inputs,
                           conv_inputs, op_noise)

import sparsevd
import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.lrt_conv2d import lrt_conv2d, lrt_conv2d_backward, naive_lrt_conv2d
from sparsevd.ops.noise import draw_seed, lrt_noise

OP = "lrt_conv2d"
N_SE = 5.0


def _naive(xi, args, clip_threshold=None):
    """y of the naive math on the given noise ξ with the op's (stride, padding, dilation,
    groups), as a function of (x, θ, log σ², b)."""
    return lambda *a: naive_lrt_conv2d(*a, None, *args, clip_threshold, noise=xi)[0]


def _conv_noise(shape, seed):
    return op_noise(shape, seed, "lrt_conv2d")


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("with_bias,contiguous", [(True, True), (False, False)])
def test_forward_and_gradients_equal_reference(device, xs, ws, stride, padding, dilation, groups,
                                               with_bias, contiguous):
    args = (as_list(stride), as_list(padding), as_list(dilation), groups)
    seed = draw_seed(device)
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64, with_bias, contiguous, device)
    out_shape = torch.nn.functional.conv2d(x, w, None, *args).shape
    xi = _conv_noise(out_shape, seed)
    g = torch.randn(out_shape, dtype=F64, device=device)
    y_op, grads_op = grads_of(lambda *a: lrt_conv2d(*a, seed, *args)[0], x, w, ls2, b, g)
    y_ref, grads_ref = grads_of(_naive(xi, args), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    # fp32 forward against the fp64 reference on the same noise.
    y32, std32 = lrt_conv2d(*[None if t is None else t.float() for t in (x, w, ls2, b)],
                                seed, *args)
    assert y32.dtype == torch.float32 and std32.dtype == torch.float32
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")


def test_noise_is_lrt_noise(device):
    """ξ of the conv op is sparsevd.ops.noise.lrt_noise(seed, y.shape), indexed by the row-major
    offset of the (N, C_out, H_out, W_out) output."""
    seed = draw_seed(device)
    assert_close(_conv_noise((2, 3, 5, 4), seed), lrt_noise(seed, (2, 3, 5, 4)), rtol=1e-5,
                 atol=1e-5, name="xi")


def test_sample_moments(device):
    n_draws = 2000
    x = torch.randn(1, 2, 5, 6, dtype=F64, device=device)
    w = torch.randn(3, 2, 3, 3, dtype=F64, device=device)
    ls2 = torch.randn(3, 2, 3, 3, dtype=F64, device=device) - 1
    b = 10 * torch.randn(3, dtype=F64, device=device)
    y = SF.lrt_conv2d(x.expand(n_draws, -1, -1, -1), w, ls2, b, stride=(1, 2), padding=1)
    mu = torch.nn.functional.conv2d(x, w, b, (1, 2), 1)[0]
    var = torch.nn.functional.conv2d(x * x, ls2.exp(), None, (1, 2), 1)[0] + 1e-8
    z_mean = (y.mean(0) - mu) / torch.sqrt(var / n_draws)
    z_var = (y.var(0) - var) / (var * math.sqrt(2.0 / (n_draws - 1)))
    assert z_mean.abs().max() < N_SE, f"sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"sample variance {z_var.abs().max():.2f} SE off"


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", [
    ((2, 2, 6, 5), (2, 2, 2), 1, 1, 1, 1), ((2, 2, 6, 5), (2, 2, 2), 2, 0, 2, 2),
    ((1, 4, 5, 4), (4, 2, 2), 1, 1, 1, 4)])
def test_gradcheck(backend, device, xs, ws, stride, padding, dilation, groups):
    """Full gradcheck for the reference; fast mode (a random projection of the Jacobian, a few
    launches instead of one per input and output element) for the Triton kernels in the
    interpreter, whose full gradchecks on tinier shapes are in test_lrt_conv2d_triton.py."""
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64, device=device)
    seed = draw_seed(device)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(
        lambda *a: SF.lrt_conv2d(*a, stride, padding, dilation, groups, seed=seed), inputs,
        fast_mode=backend == "triton" and device == "cpu",
    )


def test_opcheck_forward_and_backward(device):
    for xs, ws, groups, args, with_bias in (
        ((2, 4, 7, 6), (6, 3, 3), 2, ([2, 2], [1, 1], [1, 1], 2), True),
        ((1, 2, 5, 5), (3, 2, 2), 1, ([1, 1], [0, 1], [2, 1], 1), False),
    ):
        x, w, ls2, b = conv_inputs(xs, ws, groups, F64, with_bias, device=device)
        for t in (x, w, ls2, b):
            if t is not None:
                t.requires_grad_()
        seed = draw_seed(device)
        torch.library.opcheck(lrt_conv2d, (x, w, ls2, b, seed, *args))
        y, std = lrt_conv2d(x, w, ls2, b, seed, *args)
        torch.library.opcheck(
            lrt_conv2d_backward,
            (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed, *args),
        )


def test_backward_without_grad_x(device):
    """need_grad_x=False (x needs no gradient, e.g. a first layer): ∂x comes back empty and the
    parameter gradients are those of the full backward; autograd passes it for such an x."""
    x, w, ls2, b = conv_inputs((2, 3, 6, 5), (4, 3, 3), 1, F64, device=device)
    args = ([1, 1], [1, 1], [1, 1], 1)
    seed = draw_seed(device)
    y, std = lrt_conv2d(x, w, ls2, b, seed, *args)
    g = torch.randn_like(y)
    full = lrt_conv2d_backward(g, x, w, ls2, std, seed, *args)
    part = lrt_conv2d_backward(g, x, w, ls2, std, seed, *args, False)
    assert part[0].shape == (0,)
    for name, a, e in zip(("weight", "log_sigma2", "bias"), part[1:], full[1:]):
        assert_close(a, e, rtol=1e-12, atol=1e-12, name=f"grad {name}")
    leaves = [t.clone().requires_grad_() for t in (w, ls2, b)]
    lrt_conv2d(x, *leaves, seed, *args)[0].backward(g)
    for name, t, e in zip(("weight", "log_sigma2", "bias"), leaves, full[1:]):
        assert_close(t.grad, e, rtol=1e-12, atol=1e-12, name=f"autograd grad {name}")


# ------------------------------------------------------------------ train-time clipping
@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups,dead_out,dead_in", CONV_CLIP_CASES)
def test_clip_threshold_equals_reference(device, xs, ws, stride, padding, dilation, groups, dead_out,
                                         dead_in):
    """Train-time clipping on the convolution: forward and gradients equal the reference with
    the mask applied on identical noise; the clipped weights get exactly zero LRT gradients."""
    args = (as_list(stride), as_list(padding), as_list(dilation), groups)
    seed = draw_seed(device)
    x, w, ls2, b = conv_inputs(xs, ws, groups, F64, True, True, device)
    thr = clip_case(w, ls2, dead_out, dead_in)
    m = W.eval_mask(w, ls2, thr)
    assert 0 < int(m.sum()) < m.numel()
    out_shape = torch.nn.functional.conv2d(x, w, None, *args).shape
    xi = _conv_noise(out_shape, seed)
    g = torch.randn(out_shape, dtype=F64, device=device)
    y_op, grads_op = grads_of(lambda *a: lrt_conv2d(*a, seed, *args, thr)[0], x, w, ls2, b, g)
    y_ref, grads_ref = grads_of(_naive(xi, args, thr), x, w, ls2, b, g)
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    assert torch.all(grads_op[1][~m] == 0) and torch.all(grads_op[2][~m] == 0)
    x32, w32, ls32, b32 = (t.float() for t in (x, w, ls2, b))
    y32, std32 = lrt_conv2d(x32, w32, ls32, b32, seed, *args, thr)
    assert_close(y32, y_ref, rtol=1e-4, atol=1e-5, name="y fp32")
    gx, gw, gl, gb = lrt_conv2d_backward(g.float(), x32, w32, ls32, std32, seed, *args, False,
                                             thr)
    assert gx.numel() == 0
    for name, a, e in zip(("weight", "log_sigma2", "bias"), (gw, gl, gb), grads_ref[1:]):
        assert_close(a, e, rtol=1e-3, atol=1e-4, name=f"grad {name} fp32")
    assert torch.all(gw[~m] == 0) and torch.all(gl[~m] == 0)


def test_clip_threshold_gradcheck_and_opcheck(device):
    x, w, ls2, b = conv_inputs((1, 2, 5, 4), (3, 3, 2), 1, F64, device=device)
    thr = clip_case(w, ls2, (1,), (0,))
    args = ([1, 1], [1, 0], [1, 1], 1)
    seed = draw_seed(device)
    leaves = tuple(t.requires_grad_() for t in (x, w, ls2, b))
    assert torch.autograd.gradcheck(lambda *a: lrt_conv2d(*a, seed, *args, thr)[0], leaves)
    torch.library.opcheck(lrt_conv2d, (*leaves, seed, *args, thr))
    y, std = lrt_conv2d(*leaves, seed, *args, thr)
    torch.library.opcheck(lrt_conv2d_backward,
                          (torch.randn_like(y), *(t.detach() for t in leaves[:3]), std.detach(),
                           seed, *args, True, thr))


# ------------------------------------------------------------------------ naive math by hand
def _conv_by_unfold(x, w, stride, padding, dilation):
    """conv2d (groups=1) as an explicit im2col product, independent of F.conv2d."""
    n, _, h, wd = x.shape
    kh, kw = w.shape[2:]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return torch.einsum("ok,nkl->nol", w.reshape(w.shape[0], -1), cols).reshape(n, -1, ho, wo)


def test_naive_given_noise_against_unfold():
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    w = torch.randn(4, 3, 3, 2, dtype=F64)
    ls2 = torch.randn(4, 3, 3, 2, dtype=F64) - 2
    b = torch.randn(4, dtype=F64)
    args = dict(stride=2, padding=1, dilation=2)
    mu = _conv_by_unfold(x, w, **args) + b[None, :, None, None]
    s2 = _conv_by_unfold(x * x, ls2.exp(), **args)
    xi = torch.randn_like(mu)
    got = naive_lrt_conv2d(x, w, ls2, b, None, [2, 2], [1, 1], [2, 2], 1, noise=xi)[0]
    assert_close(got, mu + torch.sqrt(s2 + 1e-8) * xi, rtol=1e-12, atol=1e-12, name="naive_lrt_conv2d")


def test_naive_groups_equals_per_group_convs():
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    w = torch.randn(6, 2, 3, 3, dtype=F64)
    ls2 = torch.randn(6, 2, 3, 3, dtype=F64) - 2
    b = torch.randn(6, dtype=F64)
    xi = torch.randn(2, 6, 6, 6, dtype=F64)
    got = naive_lrt_conv2d(x, w, ls2, b, None, [1, 1], [1, 1], [1, 1], 2, noise=xi)[0]
    halves = []
    for g in range(2):
        xg = x[:, 2 * g:2 * g + 2]
        mu = _conv_by_unfold(xg, w[3 * g:3 * g + 3], 1, 1, 1) + b[3 * g:3 * g + 3, None, None]
        s2 = _conv_by_unfold(xg * xg, ls2[3 * g:3 * g + 3].exp(), 1, 1, 1)
        halves.append(mu + torch.sqrt(s2 + 1e-8) * xi[:, 3 * g:3 * g + 3])
    assert_close(got, torch.cat(halves, 1), rtol=1e-12, atol=1e-12, name="grouped naive_lrt_conv2d")


def test_naive_sample_moments():
    n_draws = 3000
    x = torch.randn(1, 2, 6, 5, dtype=F64)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    ls2 = torch.randn(3, 2, 3, 3, dtype=F64) - 1
    b = 10 * torch.randn(3, dtype=F64)
    mu = _conv_by_unfold(x, w, 1, 1, 1)[0] + b[:, None, None]
    s2 = _conv_by_unfold(x * x, ls2.exp(), 1, 1, 1)[0]
    xi = torch.randn(n_draws, *mu.shape, dtype=F64)
    y = naive_lrt_conv2d(x.expand(n_draws, -1, -1, -1), w, ls2, b, None, [1, 1], [1, 1], [1, 1], 1,
                         noise=xi)[0]
    z_mean = (y.mean(0) - mu) / torch.sqrt((s2 + 1e-8) / n_draws)
    z_var = (y.var(0) - s2 - 1e-8) / ((s2 + 1e-8) * math.sqrt(2.0 / (n_draws - 1)))
    assert z_mean.abs().max() < N_SE, f"sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"sample variance {z_var.abs().max():.2f} SE off"


def _conv1d_reference(x, w, ls2, b, xi, stride, padding, dilation, groups, clip_threshold=None):
    """The LRT of a 1-D convolution written out with F.conv1d (eq. of sec. 4.2 in 1-D)."""
    F = torch.nn.functional
    if clip_threshold is not None:
        w, s2 = W.clip_parameters(w, ls2, clip_threshold)
    else:
        s2 = torch.exp(ls2)
    mean = F.conv1d(x, w, b, stride, padding, dilation, groups)
    var = F.conv1d(x * x, s2, None, stride, padding, dilation, groups)
    return mean + torch.sqrt(var + 1e-8) * xi


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV1D_CASES)
@pytest.mark.parametrize("clip", [False, True])
def test_conv1d_equals_reference(device, xs, ws, stride, padding, dilation, groups, clip):
    """lrt_conv1d (the 2-D kernels over (N, C, 1, L)) equals the 1-D LRT written with F.conv1d
    on the same noise, values and gradients; with clipping, the clipped weights get zero
    gradients."""
    seed = draw_seed(device)
    x, w, ls2, b = conv1d_inputs(xs, ws, groups, F64, True, clip, device)
    thr = clip_case(w, ls2, (1,), ()) if clip else None
    out_shape = torch.nn.functional.conv1d(x, w, None, stride, padding, dilation, groups).shape
    xi = _conv_noise((out_shape[0], out_shape[1], 1, out_shape[2]), seed).view(out_shape)
    g = torch.randn(out_shape, dtype=F64, device=device)
    kw = dict(seed=seed, clip_threshold=thr)
    y_op, grads_op = grads_of(lambda *a: SF.lrt_conv1d(*a, stride, padding, dilation, groups, **kw),
                            x, w, ls2, b, g)
    y_ref, grads_ref = grads_of(
        lambda *a: _conv1d_reference(*a, xi, stride, padding, dilation, groups, thr), x, w, ls2, b, g)
    assert y_op.shape == out_shape
    assert_close(y_op, y_ref, rtol=1e-12, atol=1e-12, name="y")
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads_op, grads_ref):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {name}")
    if clip:
        m = W.eval_mask(w, ls2, thr)
        assert 0 < int(m.sum()) < m.numel()
        assert torch.all(grads_op[1][~m] == 0) and torch.all(grads_op[2][~m] == 0)
    y1 = SF.lrt_conv1d(x[0], w, ls2, b, stride, padding, dilation, groups, **kw)  # unbatched
    assert y1.shape == out_shape[1:]


def test_conv1d_errors_name_the_argument(device):
    x, w, ls2, b = conv1d_inputs((2, 3, 8), (4, 3), 1, device=device)
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


# ---------------------------------------------------------------------------- torch.compile
class _Net(torch.nn.Module):
    """A conv layer with padding="same", a strided depthwise one with an even kernel, two linear
    layers."""

    def __init__(self):
        super().__init__()
        self.conv = sparsevd.nn.Conv2dSVDO(2, 4, 3, padding="same")
        self.depthwise = sparsevd.nn.Conv2dSVDO(4, 4, 2, stride=2, groups=4)
        self.fc1 = sparsevd.nn.LinearSVDO(4 * 3 * 3, 16)
        self.fc2 = sparsevd.nn.LinearSVDO(16, 5)

    def forward(self, x):
        h = torch.relu(self.depthwise(torch.relu(self.conv(x)))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_torch_compile_fullgraph_training_step(device):
    """Conv2dSVDO (padding="same"; strided depthwise) + LinearSVDO forward, the KL and the backward
    compile with fullgraph=True and give eager's outputs and gradients under the same torch
    seed."""
    model = _Net().to(device)
    x = torch.randn(3, 2, 6, 6, device=device)

    def loss_fn(m):
        out = m(x)
        return out, out.square().sum() + 0.1 * sparsevd.loss.kl_divergence(m)

    compiled_equals_eager(model, loss_fn)
