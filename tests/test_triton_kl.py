"""The fused sparse-VD KL kernel (sparsevd.triton_kernels.kl, launched by sparsevd.ops.triton_impl)
against the reference math: value and gradients for many layers in one launch.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
import os

import pytest
import torch
from conftest import assert_close

import sparsevd
import sparsevd.functional as SF
from sparsevd import reference as R
from sparsevd.ops import reference_impl as RI

triton = pytest.importorskip("triton")
from sparsevd.ops import triton_impl as TI  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
OP = torch.ops.sparsevd.kl_sparse_vd.default


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")




@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 weights, so that small layers span several blocks and end in a partial one
    (the interpreter's default block is 65536)."""
    monkeypatch.setattr(TI, "elementwise_block", lambda dtype=torch.float32: (256, 4))


def make_layer(shape, dtype=torch.float32, spread=8.0):
    """θ ~ N(0, 0.1²) with some exact zeros and tiny values; log σ² ~ U(−spread − 8, spread − 8),
    so that log α covers both clamps (−10 and 10) and the inside."""
    w = 0.1 * torch.randn(shape, dtype=dtype, device=DEVICE)
    if w.numel() > 4:
        w.view(-1)[:2] = 0.0
        w.view(-1)[2:4] = 1e-6
    ls2 = torch.empty(shape, dtype=dtype, device=DEVICE).uniform_(-spread - 8.0, spread - 8.0)
    return w, ls2


def reference(weights, log_sigma2s):
    """fp64 KL and gradients from sparsevd.reference with autograd (the clamp masks the gradient)."""
    total, gws, gls = torch.zeros((), dtype=F64, device=DEVICE), [], []
    for w, s in zip(weights, log_sigma2s):
        w64 = w.detach().to(F64).requires_grad_()
        s64 = s.detach().to(F64).requires_grad_()
        kl = R.kl_sparse_vd(w64, s64)
        gw, gs = torch.autograd.grad(kl, (w64, s64))
        total = total + kl.detach()
        gws.append(gw)
        gls.append(gs)
    return total, gws, gls


def check(kl, grads_w, grads_l, weights, log_sigma2s, rtol=1e-4):
    kl_ref, gws_ref, gls_ref = reference(weights, log_sigma2s)
    assert kl.dim() == 0 and kl.dtype == torch.promote_types(weights[0].dtype, torch.float32)
    assert_close(kl, kl_ref, rtol=rtol, atol=0.0, name="kl")
    for i, (a, e, t) in enumerate(zip(grads_w, gws_ref, weights)):
        assert a.shape == t.shape and a.dtype == t.dtype and a.stride() == torch.empty_like(t).stride()
        assert_close(a, e, rtol=rtol, atol=rtol * 1e-2 * _amax(e) + 1e-7, name=f"grad_weight[{i}]")
    for i, (a, e) in enumerate(zip(grads_l, gls_ref)):
        assert_close(a, e, rtol=rtol, atol=1e-7, name=f"grad_log_sigma2[{i}]")


def _amax(t):
    return t.abs().max().item() if t.numel() else 0.0


SHAPES = [(300, 784), (100, 300), (10, 100), (1,), (7, 3, 5, 5), (129,), (256,)]


class _Counter:
    """Wraps a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_many_layers_one_launch(monkeypatch):
    """Layers of different shapes (LeNet-300-100's, a conv weight, single weights, one partial
    block): KL and gradients equal to the reference, in a single kernel launch."""
    counter = _Counter(TI.KK.kl_sparse_vd_kernel)
    monkeypatch.setattr(TI.KK, "kl_sparse_vd_kernel", counter)
    layers = [make_layer(s) for s in SHAPES]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = OP(ws, ls, True)
    assert counter.launches == 1
    check(kl, gws, gls, ws, ls)


def test_blocks_and_partial_blocks(small_blocks):
    """Every layer spans several blocks and ends in a partial one; an empty layer has none."""
    shapes = [(17, 31), (256,), (3, 100), (0, 5), (1,), (40, 13)]
    layers = [make_layer(s) for s in shapes]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = OP(ws, ls, True)
    check(kl, gws, gls, ws, ls)


def test_value_only():
    layers = [make_layer(s) for s in [(50, 20), (33,)]]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = OP(ws, ls, False)
    assert gws == [] and gls == []
    assert_close(kl, reference(ws, ls)[0], rtol=1e-4, atol=0.0, name="kl")


def test_clamp_masks_gradient():
    """Where log σ² − log(θ² + 1e-8) is outside (−10, 10) both gradients are exactly 0."""
    w = torch.full((64,), 0.5, device=DEVICE)
    ls2 = torch.cat([torch.full((32,), 20.0), torch.full((32,), -30.0)]).to(DEVICE)
    kl, gws, gls = OP([w], [ls2], True)
    assert torch.count_nonzero(gws[0]) == 0 and torch.count_nonzero(gls[0]) == 0
    check(kl, gws, gls, [w], [ls2])


def test_non_contiguous_and_mixed_dtypes():
    """A transposed weight (gradients come back in its layout) and an fp64 layer beside fp32 ones:
    one launch per dtype, the KL in promote(weights[0].dtype, fp32)."""
    w1, s1 = make_layer((20, 30))
    w2, s2 = make_layer((40, 9), dtype=F64)
    w3, s3 = make_layer((30, 20))
    ws, ls = [w1, w2, w3.t(), w1], [s1, s2, s3.t(), s1]
    kl, gws, gls = OP(ws, ls, True)
    assert gws[2].stride() == w3.t().stride()
    check(kl, gws, gls, ws, ls)


def test_fp64_is_computed_in_fp64():
    layers = [make_layer(s, dtype=F64) for s in [(30, 20), (11,)]]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = OP(ws, ls, True)
    check(kl, gws, gls, ws, ls, rtol=1e-10)


def test_gradcheck_fp64_through_triton():
    w, s = make_layer((3, 4), dtype=F64, spread=3.0)
    w2, s2 = make_layer((5,), dtype=F64, spread=3.0)
    inputs = [t.requires_grad_() for t in (w, s, w2, s2)]
    fn = lambda a, b, c, d: OP([a, c], [b, d], True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_opcheck():
    layers = [make_layer(s) for s in [(6, 5), (4,)]]
    ws = [w.requires_grad_() for w, _ in layers]
    ls = [s.requires_grad_() for _, s in layers]
    torch.library.opcheck(OP, (ws, ls, True))
    torch.library.opcheck(OP, (ws, ls, False), test_utils=("test_schema", "test_faketensor"))


def test_kl_divergence_of_a_model_matches_reference(monkeypatch):
    """sparsevd.kl_divergence(model) and its backward with the triton backend: equal to the fp64
    reference math (the backward scales the saved gradients by the incoming 0.5), and to the
    reference backend within the latter's fp32 error (its 1 − sigmoid cancels near log α = 10)."""
    model = torch.nn.Sequential(
        sparsevd.nn.LinearSVDO(60, 40), torch.nn.ReLU(), sparsevd.nn.LinearSVDO(40, 7),
    ).to(DEVICE)
    with torch.no_grad():
        for m in model:
            if hasattr(m, "log_sigma2"):
                m.log_sigma2.uniform_(-12.0, 4.0)
    layers = [m for m in model if hasattr(m, "log_sigma2")]
    results = {}
    for name in ("triton", "reference"):
        monkeypatch.setenv("SPARSEVD_BACKEND", name)
        model.zero_grad()
        kl = sparsevd.kl_divergence(model)
        (0.5 * kl).backward()
        results[name] = (kl.detach(), [m.weight.grad.clone() for m in layers],
                         [m.log_sigma2.grad.clone() for m in layers])
        assert all(m.bias.grad is None for m in layers)
    kl_t, gw_t, gl_t = results["triton"]
    kl_64, gw_64, gl_64 = reference([m.weight for m in layers], [m.log_sigma2 for m in layers])
    assert_close(kl_t, kl_64, rtol=1e-5, atol=0.0, name="kl")
    for a, e in zip(gw_t + gl_t, gw_64 + gl_64):
        assert_close(a, 0.5 * e, rtol=1e-4, atol=1e-7, name="grad vs fp64")
    kl_r, gw_r, gl_r = results["reference"]
    assert_close(kl_t, kl_r, rtol=1e-4, atol=0.0, name="kl vs reference backend")
    for a, e in zip(gw_t + gl_t, gw_r + gl_r):
        assert_close(a, e, rtol=1e-3, atol=1e-3 * _amax(e), name="grad vs reference backend")


def test_matches_reference_backend_impl():
    """The triton impl and the reference impl (the op's other backend) agree, lists and dtypes."""
    layers = [make_layer(s) for s in [(13, 17), (5,)]]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl_t, gw_t, gl_t = TI.kl_fwd(ws, ls, True)
    kl_r, gw_r, gl_r = RI.kl_fwd(ws, ls, True)
    assert kl_t.dtype == kl_r.dtype
    assert_close(kl_t, kl_r, rtol=1e-4, atol=0.0, name="kl")
    for a, e in zip(gw_t + gl_t, gw_r + gl_r):
        assert a.dtype == e.dtype
        assert_close(a, e, rtol=1e-3, atol=1e-3 * _amax(e), name="grad")


def test_functional_single_layer():
    w, s = make_layer((8, 9))
    assert_close(SF.kl_sparse_vd(w, s), reference([w], [s])[0], rtol=1e-4, atol=0.0, name="kl")
