"""The per-weight math (sparsevd.ops.weights, re-exported by sparsevd.reference) against independent
computations: eq. 14 by the math module, log α with its clamp and its backward, the evaluation
mask. (The op families' math by hand: the tests "naive math by hand" of test_lrt_linear.py and
test_lrt_conv2d.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from sparsevd import reference
from sparsevd.ops import weights as W
from sparsevd.ops.kl import naive_kl_sparse_vd

F64 = torch.float64
K1, K2, K3 = 0.63576, 1.87320, 1.48695



def _kl(weight, log_sigma2):
    """The KL of one layer by the family's naive math (eq. 14 summed over the weights)."""
    return naive_kl_sparse_vd([weight], [log_sigma2], False)[0]


def kl_by_hand(la: float) -> float:
    """KL per weight at log α = la (eq. 14) with the math module:
    k1 − k1·σ(k2 + k3·la) + ½·log1p(e^−la)."""
    sig = 1.0 / (1.0 + math.exp(-(K2 + K3 * la)))
    return K1 - K1 * sig + 0.5 * math.log1p(math.exp(-la))


def params_with_log_alpha(la: torch.Tensor):
    """(θ, log σ²) whose log α (before the clamp) is exactly ``la``, with fresh random θ."""
    w = torch.randn(la.shape, dtype=la.dtype)
    w = torch.where(w < 0, w - 0.05, w + 0.05)  # |θ| ≥ 0.05: θ² dominates the 1e-8
    return w, la + torch.log(w * w + 1e-8)


# ------------------------------------------------------------------------------------------ KL
def test_constants_match_paper():
    assert (W.K1, W.K2, W.K3) == (K1, K2, K3)
    assert W.LOG_ALPHA_CLAMP == 10.0 and W.EPS_THETA == 1e-8 and W.EPS_VAR == 1e-8


@pytest.mark.parametrize("la", [-10.0, -7.3, -3.0, -1.0, 0.0, 0.37, 1.0, 3.0, 6.5, 10.0])
def test_kl_per_weight_at_known_log_alpha(la):
    got = -W.neg_kl_from_log_alpha(torch.tensor(la, dtype=F64)).item()
    assert got == pytest.approx(kl_by_hand(la), rel=1e-12, abs=1e-15)


def test_kl_hand_values_at_the_clamp():
    # log α = 10: k1·(1 − σ(16.74)) ≈ 3.4e-8 plus ½·log1p(e^−10) ≈ 2.27e-5.
    kl_hi = -W.neg_kl_from_log_alpha(torch.tensor(10.0, dtype=F64)).item()
    expected_hi = K1 - K1 / (1.0 + math.exp(-(K2 + K3 * 10.0))) + 0.5 * math.log1p(math.exp(-10.0))
    assert kl_hi == pytest.approx(expected_hi, rel=1e-12)
    assert 2.2e-5 < kl_hi < 2.4e-5
    # log α = −10: k1·(1 − σ(−13)) + ½·log1p(e^10) ≈ 0.63576 + 5.0000227 ≈ 5.63578.
    kl_lo = -W.neg_kl_from_log_alpha(torch.tensor(-10.0, dtype=F64)).item()
    # k2 + k3·(−10) = −12.9963
    expected_lo = K1 * (1 - 1 / (1 + math.exp(12.9963))) + 0.5 * math.log1p(math.exp(10.0))
    assert kl_lo == pytest.approx(expected_lo, rel=1e-12)
    assert 5.63 < kl_lo < 5.64


def test_kl_positive_and_strictly_decreasing_in_log_alpha():
    la = torch.linspace(-10, 10, 20001, dtype=F64)
    kl = -W.neg_kl_from_log_alpha(la)
    assert (kl > 0).all()
    assert (kl[1:] < kl[:-1]).all()
    # Tends to 0 as log α grows: beyond the clamp values keep falling towards 0.
    far = -W.neg_kl_from_log_alpha(torch.tensor([20.0, 40.0], dtype=F64))
    assert far[0] < 3e-9 and far[1] < 1e-17


def test_kl_sparse_vd_sums_per_weight_values_by_hand():
    la = torch.empty(7, 5, dtype=F64).uniform_(-9.5, 9.5)
    w, ls2 = params_with_log_alpha(la)
    got = _kl(w, ls2)
    assert got.dim() == 0 and got.dtype == F64
    expected = math.fsum(kl_by_hand(v) for v in la.reshape(-1).tolist())
    assert got.item() == pytest.approx(expected, rel=1e-11)


def test_kl_sparse_vd_applies_the_clamp():
    w = torch.randn(50, dtype=F64) + 3.0
    big = torch.log(w * w) + torch.empty(50, dtype=F64).uniform_(10.5, 40)   # log α > 10
    small = torch.log(w * w) - torch.empty(50, dtype=F64).uniform_(10.5, 40)  # log α < −10
    assert _kl(w, big).item() == pytest.approx(50 * kl_by_hand(10.0), rel=1e-10)
    assert _kl(w, small).item() == pytest.approx(50 * kl_by_hand(-10.0), rel=1e-10)


def test_kl_fp32_matches_fp64():
    la = torch.empty(300, dtype=F64).uniform_(-12, 12)
    w, ls2 = params_with_log_alpha(la)
    got = _kl(w.float(), ls2.float())
    assert got.dtype == torch.float32
    assert_close(got, _kl(w, ls2), rtol=1e-5, atol=1e-5, name="kl fp32")


# ---------------------------------------------------------------------------------- log alpha
def test_log_alpha_elementwise_by_hand():
    w = torch.randn(6, 9, dtype=F64)
    ls2 = torch.randn(6, 9, dtype=F64) * 8 - 4
    got = W.log_alpha(w, ls2)
    expected = torch.tensor(
        [min(max(s - math.log(t * t + 1e-8), -10.0), 10.0)
         for t, s in zip(w.reshape(-1).tolist(), ls2.reshape(-1).tolist())],
        dtype=F64,
    ).reshape(6, 9)
    assert_close(got, expected, rtol=1e-14, atol=1e-14, name="log_alpha")


def test_log_alpha_clamp_and_zero_weight():
    w = torch.tensor([0.0, 0.0, 1e-3, 5.0, -5.0], dtype=F64)
    ls2 = torch.tensor([-30.0, 0.0, -10.0, 30.0, -40.0], dtype=F64)
    got = W.log_alpha(w, ls2)
    # θ = 0: log(1e-8) = −18.42; −30 + 18.42 = −11.58 → −10; 0 + 18.42 → 10.
    expected = torch.tensor([-10.0, 10.0, -10.0 - math.log(1e-6 + 1e-8), 10.0, -10.0], dtype=F64)
    assert_close(got, expected, rtol=1e-14, atol=1e-14, name="log_alpha")
    r = W.log_alpha(torch.randn(1000), torch.randn(1000) * 30)
    assert r.min() >= -10 and r.max() <= 10 and ((r == 10).any() and (r == -10).any())


# ------------------------------------------------------------------------------ evaluation mask
@pytest.mark.parametrize("threshold", [3.0, 0.0, -2.5])
def test_eval_mask_and_masked_weight(threshold):
    w = torch.randn(8, 13)
    ls2 = torch.log(w * w) + torch.randn(8, 13) * 4  # log α spread around 0
    la = W.log_alpha(w, ls2)
    mask = W.eval_mask(w, ls2, threshold)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, la < threshold)
    assert 0 < int(mask.sum()) < mask.numel()
    manual = w.clone()
    manual[la >= threshold] = 0.0
    assert torch.equal(W.masked_weight(w, ls2, threshold), manual)
    x = torch.randn(5, 13)
    b = torch.randn(8)
    y = F.linear(x, W.masked_weight(w, ls2, threshold), b)
    y_manual = x @ manual.t() + b
    assert_close(y, y_manual, rtol=1e-5, atol=1e-5, name="masked linear")


def test_log_alpha_backward_equals_autograd():
    """The analytic log-α backward (the KL's naive gradients and the log_alpha op use it) equals
    autograd through log_alpha, zero where the clamp is active, in fp64 and fp32."""
    for dtype in (F64, torch.float32):
        w = torch.randn(200, dtype=dtype)
        ls2 = torch.log(w * w) + torch.empty(200, dtype=dtype).uniform_(-14, 14)
        g = torch.randn(200, dtype=dtype)
        leaves = [t.clone().requires_grad_() for t in (w, ls2)]
        (W.log_alpha(*leaves) * g).sum().backward()
        gw, gl = W.log_alpha_backward(w, ls2, g)
        raw = ls2 - torch.log(w * w + W.EPS_THETA)
        outside = (raw <= -10) | (raw >= 10)
        assert outside.any() and (~outside).any()
        assert torch.all(gw[outside] == 0) and torch.all(gl[outside] == 0)
        tol = 1e-12 if dtype == F64 else 1e-5
        assert_close(gw, leaves[0].grad, rtol=tol, atol=tol, name=f"grad weight {dtype}")
        assert_close(gl, leaves[1].grad, rtol=tol, atol=tol, name=f"grad log_sigma2 {dtype}")


def test_reference_reexports_the_weights_math():
    """sparsevd.reference keeps its names: each is sparsevd.ops.weights' own."""
    for name in reference.__all__:
        assert name == "conv_out_size" or getattr(reference, name) is getattr(W, name), name
