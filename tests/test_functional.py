"""sparsevd.functional: argument checks (errors name the argument), seeds and reproducibility,
noise layout of 3-D / non-contiguous / unbatched inputs, the evaluation forward, autocast, empty
batches."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.kl import naive_kl_sparse_vd
from sparsevd.ops.lrt_conv2d import naive_lrt_conv2d
from sparsevd.ops.lrt_linear import lrt_linear, naive_lrt_linear



@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "reference")


def lin(k=6, n=4, dtype=torch.float32):
    w = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    return w, torch.randn(n, k, dtype=dtype) - 3, torch.randn(n, dtype=dtype)


def conv(ci=4, co=6, kh=3, kw=3, groups=1, dtype=torch.float32):
    w = torch.randn(co, ci // groups, kh, kw, dtype=dtype) / math.sqrt(ci // groups * kh * kw)
    return w, torch.randn(co, ci // groups, kh, kw, dtype=dtype) - 3, torch.randn(co, dtype=dtype)


def seed_of(v=None):
    return torch.randint(0, 2**62, (1,)) if v is None else torch.tensor([v])


# ------------------------------------------------------------------------------------ bad input
LINEAR_FNS = {
    "lrt_linear": lambda x, w, s, b, **kw: SF.lrt_linear(x, w, s, b, **kw),
    "masked_linear": lambda x, w, s, b, **kw: SF.masked_linear(x, w, s, b, 3.0),
}


@pytest.mark.parametrize("fn", list(LINEAR_FNS))
def test_linear_bad_x(fn):
    f = LINEAR_FNS[fn]
    w, s, b = lin()
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32.*float64"):
        f(torch.randn(3, 6, dtype=torch.float64), w, s, b)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor.*int64"):
        f(torch.randint(-3, 3, (3, 6)), w, s, b)
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        f([[1.0] * 6], w, s, b)
    with pytest.raises(ValueError, match=r"^x: expected a tensor on cpu.*meta"):
        f(torch.randn(3, 6, device="meta"), w, s, b)
    with pytest.raises(ValueError, match=r"^x: expected shape \(\*, in_features=6\), got \(3, 5\)"):
        f(torch.randn(3, 5), w, s, b)
    with pytest.raises(ValueError, match=r"^x: expected shape"):
        f(torch.randn(()), w, s, b)


@pytest.mark.parametrize("fn", list(LINEAR_FNS))
def test_linear_bad_parameters(fn):
    f = LINEAR_FNS[fn]
    w, s, b = lin()
    x = torch.randn(3, 6)
    bad = s.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^log_sigma2: contains NaN"):
        f(x, w, bad, b)
    bad_w = w.clone()
    bad_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^weight: contains NaN"):
        f(x, bad_w, s, b)
    with pytest.raises(ValueError, match=r"^log_sigma2: expected shape \(4, 6\)"):
        f(x, w, s[:3], b)
    with pytest.raises(TypeError, match=r"^log_sigma2: expected dtype torch.float32"):
        f(x, w, s.double(), b)
    with pytest.raises(TypeError, match=r"^log_sigma2: expected a floating-point"):
        f(x, w, s.long(), b)
    with pytest.raises(ValueError, match=r"^log_sigma2: expected a tensor on cpu"):
        f(x, w, s.to("meta"), b)
    with pytest.raises(ValueError, match=r"^weight: expected a 2-D"):
        f(x, w[None], s[None], b)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(4,\)"):
        f(x, w, s, torch.randn(6))
    with pytest.raises(TypeError, match=r"^bias: expected a floating-point"):
        f(x, w, s, torch.randint(0, 3, (4,)))
    with pytest.raises(TypeError, match=r"^bias: expected dtype torch.float32.*float64"):
        f(x, w, s, b.double())
    with pytest.raises(ValueError, match=r"^bias: expected a tensor on cpu"):
        f(x, w, s, b.to("meta"))


def test_nan_check_can_be_switched_off(monkeypatch):
    w, s, b = lin()
    s[0, 0] = float("nan")
    monkeypatch.setattr(SF, "CHECK_NAN", False)
    y = SF.lrt_linear(torch.randn(3, 6), w, s, b)
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()


@pytest.mark.parametrize("seed,exc,match", [
    (torch.tensor([1.0]), TypeError, r"^seed: expected a one-element int64 tensor"),
    (torch.tensor([1, 2]), TypeError, r"^seed: expected a one-element int64 tensor"),
    (torch.tensor([], dtype=torch.int64), TypeError, r"^seed: expected a one-element int64"),
    (torch.tensor([3], dtype=torch.int32), TypeError, r"^seed: expected a one-element int64"),
    (3, TypeError, r"^seed: expected a one-element int64 tensor"),
    (torch.tensor([3], device="meta"), ValueError, r"^seed: expected a tensor on cpu"),
])
def test_malformed_seed(seed, exc, match):
    w, s, b = lin()
    with pytest.raises(exc, match=match):
        SF.lrt_linear(torch.randn(3, 6), w, s, b, seed=seed)
    cw, cs, cb = conv()
    with pytest.raises(exc, match=match):
        SF.lrt_conv2d(torch.randn(1, 4, 5, 5), cw, cs, cb, seed=seed)


def test_conv_bad_arguments():
    w, s, b = conv(ci=4, co=6, groups=2)
    x = torch.randn(2, 4, 7, 7)
    for fn in (lambda *a, **k: SF.lrt_conv2d(*a, **k),
               lambda *a, **k: SF.masked_conv2d(*a, **k, threshold=3.0)):
        with pytest.raises(ValueError, match=r"^x: expected shape \(N, in_channels=4, H, W\)"):
            fn(torch.randn(2, 3, 7, 7), w, s, b, groups=2)
        with pytest.raises(ValueError, match=r"^x: expected shape"):
            fn(torch.randn(4, 7), w, s, b, groups=2)
        with pytest.raises(TypeError, match=r"^x: expected dtype"):
            fn(x.double(), w, s, b, groups=2)
        with pytest.raises(TypeError, match=r"^x: expected a floating-point"):
            fn(x.long(), w, s, b, groups=2)
        with pytest.raises(ValueError, match=r"^x: expected a tensor on cpu"):
            fn(x.to("meta"), w, s, b, groups=2)
        with pytest.raises(ValueError, match=r"^weight: expected a 4-D"):
            fn(x, w[0], s[0], b, groups=2)
        for groups in (0, -2, 4, 2.0, True):
            with pytest.raises(ValueError, match=r"^groups: expected a positive int"):
                fn(x, w, s, b, groups=groups)
        for name, bad in (("stride", 0), ("stride", (1, 2, 3)), ("padding", -1),
                          ("padding", "full"), ("dilation", (1, 0)), ("dilation", (1.0, 1))):
            with pytest.raises(ValueError, match=rf"^{name}: "):
                fn(x, w, s, b, groups=2, **{name: bad})
        with pytest.raises(ValueError, match=r"^stride: padding='same' needs stride 1"):
            fn(x, w, s, b, groups=2, padding="same", stride=(1, 2))
        with pytest.raises(ValueError, match=r"^x: the padded input is smaller than the dilated kernel"):
            fn(torch.randn(2, 4, 2, 7), w, s, b, groups=2, dilation=(1, 2))
        bad = s.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"^log_sigma2: contains NaN"):
            fn(x, w, bad, b, groups=2)


def test_kl_and_log_alpha_bad_arguments():
    w, s, _ = lin()
    bad = s.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^log_sigma2: contains NaN"):
        SF.kl_sparse_vd(w, bad)
    with pytest.raises(ValueError, match=r"^log_sigma2: contains NaN"):
        SF.log_alpha(w, bad)
    with pytest.raises(ValueError, match=r"^log_sigma2: expected shape"):
        SF.kl_sparse_vd(w, s.t())
    with pytest.raises(ValueError, match=r"^log_sigma2s: expected 1 tensors"):
        SF.kl_sparse_vd_many([w], [s, s])
    with pytest.raises(TypeError, match=r"^weight: expected a floating-point"):
        SF.kl_sparse_vd_many([w.long()], [s])
    assert SF.kl_sparse_vd_many([], []).item() == 0.0


# ----------------------------------------------------------------------- seeds and noise layout
def test_same_seed_same_output_and_manual_seed_reproducible():
    w, s, b = lin()
    x = torch.randn(5, 6)
    seed = seed_of()
    assert torch.equal(SF.lrt_linear(x, w, s, b, seed=seed), SF.lrt_linear(x, w, s, b, seed=seed))
    y1 = SF.lrt_linear(x, w, s, b, seed=seed)
    y2 = SF.lrt_linear(x, w, s, b, seed=seed + 1)
    assert (y1 != y2).all()
    torch.manual_seed(1234)
    a = SF.lrt_linear(x, w, s, b)
    a2 = SF.lrt_linear(x, w, s, b)
    torch.manual_seed(1234)
    assert torch.equal(SF.lrt_linear(x, w, s, b), a)
    assert (a != a2).all()  # seed=None draws a new seed per call


def test_draw_seed():
    a = SF.draw_seed()
    assert a.shape == (1,) and a.dtype == torch.int64 and 0 <= int(a) < 2**62
    seeds = torch.cat([SF.draw_seed("cpu") for _ in range(64)])
    assert len(set(seeds.tolist())) == 64


def test_lrt_linear_noise_is_indexed_by_output_element():
    """3-D and non-contiguous x give what the flattened, contiguous x gives with the same seed."""
    w, s, b = lin(k=5, n=3)
    seed = seed_of()
    x3 = torch.randn(4, 3, 10)[..., ::2].transpose(0, 1)  # (3, 4, 5), non-contiguous
    assert not x3.is_contiguous()
    y3 = SF.lrt_linear(x3, w, s, b, seed=seed)
    assert y3.shape == (3, 4, 3)
    y2 = SF.lrt_linear(x3.reshape(12, 5), w, s, b, seed=seed)
    assert_close(y3.reshape(12, 3), y2, rtol=1e-6, atol=1e-6)  # same noise element for element
    expected = naive_lrt_linear(x3.double(), w.double(), s.double(), b.double(), seed)[0]
    assert_close(y3, expected, rtol=1e-4, atol=1e-5)
    y1 = SF.lrt_linear(x3[0, 0], w, s, b, seed=seed)  # 1-D input: (in_features,) → (out_features,)
    assert_close(y1, expected[0, 0], rtol=1e-4, atol=1e-5)


def test_lrt_conv2d_unbatched_and_noncontiguous():
    w, s, b = conv(ci=3, co=5)
    seed = seed_of()
    x = torch.randn(3, 8, 8)
    y = SF.lrt_conv2d(x, w, s, b, padding=1, seed=seed)
    assert y.shape == (5, 8, 8)
    assert torch.equal(y, SF.lrt_conv2d(x[None], w, s, b, padding=1, seed=seed)[0])
    xs = torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)  # channels-last memory
    assert not xs.is_contiguous()
    y_nc = SF.lrt_conv2d(xs, w, s, b, stride=2, seed=seed)
    # Same noise element for element (channels-last convs may round differently).
    assert_close(y_nc, SF.lrt_conv2d(xs.contiguous(), w, s, b, stride=2, seed=seed), rtol=1e-5,
                 atol=1e-6)
    expected = naive_lrt_conv2d(xs.double(), w.double(), s.double(), b.double(), seed, [2, 2], [0, 0],
                                [1, 1], 1)[0]
    assert_close(y_nc, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- evaluation forward
def test_masked_linear_equals_dense_of_masked_weight():
    w = torch.randn(7, 9)
    s = torch.log(w * w) + torch.randn(7, 9) * 4
    b = torch.randn(7)
    x = torch.randn(2, 5, 9)
    for threshold in (3.0, 0.0):
        manual = w.clone()
        manual[W.log_alpha(w, s) >= threshold] = 0.0
        assert 0 < int((manual == 0).sum()) < manual.numel()
        expected = F.linear(x.double(), manual.double(), b.double())
        y = SF.masked_linear(x, w, s, b, threshold)
        assert_close(y, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(y, SF.masked_linear(x, w, s, b, threshold))
    assert_close(SF.masked_linear(x, w, s, None, 3.0),
                 F.linear(x.double(), W.masked_weight(w, s, 3.0).double()), rtol=1e-5, atol=1e-6)


def test_masked_conv2d_equals_dense_of_masked_weight():
    w = torch.randn(4, 1, 3, 3)
    s = torch.log(w * w) + torch.randn(4, 1, 3, 3) * 4
    b = torch.randn(4)
    x = torch.randn(2, 2, 7, 6)
    manual = w.clone()
    manual[W.log_alpha(w, s) >= 3.0] = 0.0
    expected = F.conv2d(x.double(), manual.double(), b.double(), 2, 1, 1, 2)
    y = SF.masked_conv2d(x, w, s, b, 2, 1, 1, 2, threshold=3.0)
    assert_close(y, expected, rtol=1e-5, atol=1e-6)
    y_unbatched = SF.masked_conv2d(x[1], w, s, b, 2, 1, 1, 2, threshold=3.0)
    assert_close(y_unbatched, expected[1], rtol=1e-5, atol=1e-6)


def test_masked_linear_gradients_only_reach_kept_weights():
    w = torch.randn(5, 6)
    s = torch.log(w * w) + torch.randn(5, 6) * 4
    w.requires_grad_()
    x = torch.randn(3, 6)
    SF.masked_linear(x, w, s, None, 3.0).sum().backward()
    keep = W.log_alpha(w.detach(), s) < 3.0
    assert_close(w.grad, keep.float() * x.sum(0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- autocast
def test_autocast_bf16_linear_and_conv():
    w, s, b = lin(k=8, n=5)
    params = [t.requires_grad_() for t in (w, s, b)]
    x = torch.randn(4, 8, requires_grad=True)
    seed = seed_of()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = SF.lrt_linear(x, *params, seed=seed)
        ym = SF.masked_linear(x, *params, 3.0)
        # The op computes in fp32 (its fake impl promises an fp32 std) even under autocast.
        std = lrt_linear(x.bfloat16(), w, s, b, seed)[1]
    assert y.dtype == torch.bfloat16 and ym.dtype == torch.bfloat16
    assert std.dtype == torch.float32
    expected = naive_lrt_linear(x.detach().bfloat16().double(), w.detach().double(),
                                s.detach().double(), b.detach().double(), seed)[0]
    # bf16 output: one rounding of a value computed in fp32 (2⁻⁸ relative).
    assert_close(y, expected, rtol=2 ** -8, atol=1e-3)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params)
    cw, cs, cb = conv(ci=2, co=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc = SF.lrt_conv2d(torch.randn(2, 2, 6, 6), cw, cs, cb)
    assert yc.dtype == torch.bfloat16 and yc.shape == (2, 3, 4, 4)


# -------------------------------------------------------------------------------- empty batches
def test_empty_batch_linear_and_conv_forward_and_backward():
    w, s, b = lin()
    params = [t.requires_grad_() for t in (w, s, b)]
    x = torch.randn(0, 6, requires_grad=True)
    for f in (lambda: SF.lrt_linear(x, *params), lambda: SF.masked_linear(x, *params, 3.0)):
        y = f()
        assert y.shape == (0, 4)
        y.sum().backward()
        assert x.grad.shape == (0, 6)
        assert all(p.grad is None or (p.grad == 0).all() for p in params)
    cw, cs, cb = conv(ci=2, co=3)
    cparams = [t.requires_grad_() for t in (cw, cs, cb)]
    xc = torch.randn(0, 2, 5, 5, requires_grad=True)
    y = SF.lrt_conv2d(xc, *cparams, padding=1)
    assert y.shape == (0, 3, 5, 5)
    y.sum().backward()
    assert xc.grad.shape == xc.shape
    assert all((p.grad == 0).all() for p in cparams)


# ----------------------------------------------------------------------------------- KL, log α
def test_kl_and_log_alpha_values():
    w, s, _ = lin(k=30, n=20)
    s = s * 4
    assert_close(SF.kl_sparse_vd(w, s), naive_kl_sparse_vd([w.double()], [s.double()], False)[0], rtol=1e-5,
                 atol=1e-5)
    w2, s2 = torch.randn(3, 2, 3, 3), torch.randn(3, 2, 3, 3)
    assert_close(SF.kl_sparse_vd_many([w, w2], [s, s2]),
                 naive_kl_sparse_vd([w.double(), w2.double()], [s.double(), s2.double()], False)[0],
                 rtol=1e-5, atol=1e-5)
    assert_close(SF.log_alpha(w, s), W.log_alpha(w.double(), s.double()), rtol=1e-5, atol=1e-5)
    assert SF.kl_sparse_vd(w.double(), s.double()).dtype == torch.float64
    assert SF.kl_sparse_vd(w, s).dtype == torch.float32
