"""sparsevd.reference against independent computations: eq. 14 by the math module, log α with its
clamp, the LRT mean and variance by sampling (statistical bounds), and the evaluation mask."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from sparsevd import reference as R

F64 = torch.float64
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: A sample statistic may be this many standard errors from its expectation (two-sided p ≈ 6e-7
#: per statistic, so a test checking a few hundred of them fails by chance less than once in 5000).
N_SE = 5.0



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
    assert (R.K1, R.K2, R.K3) == (K1, K2, K3)
    assert R.LOG_ALPHA_CLAMP == 10.0 and R.EPS_THETA == 1e-8 and R.EPS_VAR == 1e-8


@pytest.mark.parametrize("la", [-10.0, -7.3, -3.0, -1.0, 0.0, 0.37, 1.0, 3.0, 6.5, 10.0])
def test_kl_per_weight_at_known_log_alpha(la):
    got = -R.neg_kl_from_log_alpha(torch.tensor(la, dtype=F64)).item()
    assert got == pytest.approx(kl_by_hand(la), rel=1e-12, abs=1e-15)


def test_kl_hand_values_at_the_clamp():
    # log α = 10: k1·(1 − σ(16.74)) ≈ 3.4e-8 plus ½·log1p(e^−10) ≈ 2.27e-5.
    kl_hi = -R.neg_kl_from_log_alpha(torch.tensor(10.0, dtype=F64)).item()
    expected_hi = K1 - K1 / (1.0 + math.exp(-(K2 + K3 * 10.0))) + 0.5 * math.log1p(math.exp(-10.0))
    assert kl_hi == pytest.approx(expected_hi, rel=1e-12)
    assert 2.2e-5 < kl_hi < 2.4e-5
    # log α = −10: k1·(1 − σ(−13)) + ½·log1p(e^10) ≈ 0.63576 + 5.0000227 ≈ 5.63578.
    kl_lo = -R.neg_kl_from_log_alpha(torch.tensor(-10.0, dtype=F64)).item()
    # k2 + k3·(−10) = −12.9963
    expected_lo = K1 * (1 - 1 / (1 + math.exp(12.9963))) + 0.5 * math.log1p(math.exp(10.0))
    assert kl_lo == pytest.approx(expected_lo, rel=1e-12)
    assert 5.63 < kl_lo < 5.64


def test_kl_positive_and_strictly_decreasing_in_log_alpha():
    la = torch.linspace(-10, 10, 20001, dtype=F64)
    kl = -R.neg_kl_from_log_alpha(la)
    assert (kl > 0).all()
    assert (kl[1:] < kl[:-1]).all()
    # Tends to 0 as log α grows: beyond the clamp values keep falling towards 0.
    far = -R.neg_kl_from_log_alpha(torch.tensor([20.0, 40.0], dtype=F64))
    assert far[0] < 3e-9 and far[1] < 1e-17


def test_kl_sparse_vd_sums_per_weight_values_by_hand():
    la = torch.empty(7, 5, dtype=F64).uniform_(-9.5, 9.5)
    w, ls2 = params_with_log_alpha(la)
    got = R.kl_sparse_vd(w, ls2)
    assert got.dim() == 0 and got.dtype == F64
    expected = math.fsum(kl_by_hand(v) for v in la.reshape(-1).tolist())
    assert got.item() == pytest.approx(expected, rel=1e-11)


def test_kl_sparse_vd_applies_the_clamp():
    w = torch.randn(50, dtype=F64) + 3.0
    big = torch.log(w * w) + torch.empty(50, dtype=F64).uniform_(10.5, 40)   # log α > 10
    small = torch.log(w * w) - torch.empty(50, dtype=F64).uniform_(10.5, 40)  # log α < −10
    assert R.kl_sparse_vd(w, big).item() == pytest.approx(50 * kl_by_hand(10.0), rel=1e-10)
    assert R.kl_sparse_vd(w, small).item() == pytest.approx(50 * kl_by_hand(-10.0), rel=1e-10)


def test_kl_fp32_matches_fp64():
    la = torch.empty(300, dtype=F64).uniform_(-12, 12)
    w, ls2 = params_with_log_alpha(la)
    got = R.kl_sparse_vd(w.float(), ls2.float())
    assert got.dtype == torch.float32
    assert_close(got, R.kl_sparse_vd(w, ls2), rtol=1e-5, atol=1e-5, name="kl fp32")


# ---------------------------------------------------------------------------------- log alpha
def test_log_alpha_elementwise_by_hand():
    w = torch.randn(6, 9, dtype=F64)
    ls2 = torch.randn(6, 9, dtype=F64) * 8 - 4
    got = R.log_alpha(w, ls2)
    expected = torch.tensor(
        [min(max(s - math.log(t * t + 1e-8), -10.0), 10.0)
         for t, s in zip(w.reshape(-1).tolist(), ls2.reshape(-1).tolist())],
        dtype=F64,
    ).reshape(6, 9)
    assert_close(got, expected, rtol=1e-14, atol=1e-14, name="log_alpha")


def test_log_alpha_clamp_and_zero_weight():
    w = torch.tensor([0.0, 0.0, 1e-3, 5.0, -5.0], dtype=F64)
    ls2 = torch.tensor([-30.0, 0.0, -10.0, 30.0, -40.0], dtype=F64)
    got = R.log_alpha(w, ls2)
    # θ = 0: log(1e-8) = −18.42; −30 + 18.42 = −11.58 → −10; 0 + 18.42 → 10.
    expected = torch.tensor([-10.0, 10.0, -10.0 - math.log(1e-6 + 1e-8), 10.0, -10.0], dtype=F64)
    assert_close(got, expected, rtol=1e-14, atol=1e-14, name="log_alpha")
    r = R.log_alpha(torch.randn(1000), torch.randn(1000) * 30)
    assert r.min() >= -10 and r.max() <= 10 and ((r == 10).any() and (r == -10).any())


# -------------------------------------------------------------------------------- LRT formula
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lrt_linear_given_noise_elementwise(lead, with_bias):
    k, n = 7, 4
    x = torch.randn(*lead, k, dtype=F64)
    w = torch.randn(n, k, dtype=F64)
    ls2 = torch.randn(n, k, dtype=F64) - 2
    b = torch.randn(n, dtype=F64) if with_bias else None
    xi = torch.randn(*lead, n, dtype=F64)
    got = R.lrt_linear(x, w, ls2, b, xi)
    # Independent computation: explicit sums per output element.
    xs, xis = x.reshape(-1, k), xi.reshape(-1, n)
    expected = torch.empty(xs.shape[0], n, dtype=F64)
    for r in range(xs.shape[0]):
        for j in range(n):
            mu = math.fsum(xs[r, i].item() * w[j, i].item() for i in range(k))
            mu += 0.0 if b is None else b[j].item()
            s2 = math.fsum(xs[r, i].item() ** 2 * math.exp(ls2[j, i].item()) for i in range(k))
            expected[r, j] = mu + math.sqrt(s2 + 1e-8) * xis[r, j].item()
    assert_close(got, expected.reshape(*lead, n), rtol=1e-12, atol=1e-12, name="lrt_linear")


def _check_moments(y: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, what: str):
    """y: (n_draws, *cols) draws; mu, var: (*cols) the exact mean and variance."""
    n = y.shape[0]
    mean_hat = y.mean(0)
    var_hat = y.var(0, unbiased=True)
    z_mean = (mean_hat - mu) / torch.sqrt(var / n)
    # Var of the unbiased sample variance of a normal: 2σ⁴/(n − 1).
    z_var = (var_hat - var) / (var * math.sqrt(2.0 / (n - 1)))
    assert z_mean.abs().max() < N_SE, f"{what}: sample mean {z_mean.abs().max():.2f} SE off"
    assert z_var.abs().max() < N_SE, f"{what}: sample variance {z_var.abs().max():.2f} SE off"


def test_lrt_linear_sample_moments():
    n_draws, k, n = 4000, 11, 9
    x = torch.randn(1, k, dtype=F64)
    w = torch.randn(n, k, dtype=F64)
    ls2 = torch.randn(n, k, dtype=F64) - 1
    b = 10 * torch.randn(n, dtype=F64)  # large: a bias leaking into s² would show
    y = R.lrt_linear(x.expand(n_draws, k), w, ls2, b, torch.randn(n_draws, n, dtype=F64))
    mu = torch.einsum("k,nk->n", x[0], w) + b
    s2 = torch.einsum("k,nk->n", x[0] ** 2, ls2.exp())
    _check_moments(y, mu, s2 + 1e-8, "lrt_linear")


def _conv_by_unfold(x, w, stride, padding, dilation):
    """conv2d (groups=1) as an explicit im2col product, independent of F.conv2d."""
    n, _, h, wd = x.shape
    kh, kw = w.shape[2:]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return torch.einsum("ok,nkl->nol", w.reshape(w.shape[0], -1), cols).reshape(n, -1, ho, wo)


def test_lrt_conv2d_given_noise_against_unfold():
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    w = torch.randn(4, 3, 3, 2, dtype=F64)
    ls2 = torch.randn(4, 3, 3, 2, dtype=F64) - 2
    b = torch.randn(4, dtype=F64)
    args = dict(stride=2, padding=1, dilation=2)
    mu = _conv_by_unfold(x, w, **args) + b[None, :, None, None]
    s2 = _conv_by_unfold(x * x, ls2.exp(), **args)
    xi = torch.randn_like(mu)
    got = R.lrt_conv2d(x, w, ls2, b, xi, **args)
    assert_close(got, mu + torch.sqrt(s2 + 1e-8) * xi, rtol=1e-12, atol=1e-12, name="lrt_conv2d")


def test_lrt_conv2d_groups_equals_per_group_convs():
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    w = torch.randn(6, 2, 3, 3, dtype=F64)
    ls2 = torch.randn(6, 2, 3, 3, dtype=F64) - 2
    b = torch.randn(6, dtype=F64)
    xi = torch.randn(2, 6, 6, 6, dtype=F64)
    got = R.lrt_conv2d(x, w, ls2, b, xi, padding=1, groups=2)
    halves = []
    for g in range(2):
        xg = x[:, 2 * g:2 * g + 2]
        mu = _conv_by_unfold(xg, w[3 * g:3 * g + 3], 1, 1, 1) + b[3 * g:3 * g + 3, None, None]
        s2 = _conv_by_unfold(xg * xg, ls2[3 * g:3 * g + 3].exp(), 1, 1, 1)
        halves.append(mu + torch.sqrt(s2 + 1e-8) * xi[:, 3 * g:3 * g + 3])
    assert_close(got, torch.cat(halves, 1), rtol=1e-12, atol=1e-12, name="grouped lrt_conv2d")


def test_lrt_conv2d_sample_moments():
    n_draws = 3000
    x = torch.randn(1, 2, 6, 5, dtype=F64)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    ls2 = torch.randn(3, 2, 3, 3, dtype=F64) - 1
    b = 10 * torch.randn(3, dtype=F64)
    mu = _conv_by_unfold(x, w, 1, 1, 1)[0] + b[:, None, None]
    s2 = _conv_by_unfold(x * x, ls2.exp(), 1, 1, 1)[0]
    xi = torch.randn(n_draws, *mu.shape, dtype=F64)
    y = R.lrt_conv2d(x.expand(n_draws, -1, -1, -1), w, ls2, b, xi, padding=1)
    _check_moments(y, mu, s2 + 1e-8, "lrt_conv2d")


# ------------------------------------------------------------------------------ evaluation mask
@pytest.mark.parametrize("threshold", [3.0, 0.0, -2.5])
def test_eval_mask_and_masked_weight(threshold):
    w = torch.randn(8, 13)
    ls2 = torch.log(w * w) + torch.randn(8, 13) * 4  # log α spread around 0
    la = R.log_alpha(w, ls2)
    mask = R.eval_mask(w, ls2, threshold)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, la < threshold)
    assert 0 < int(mask.sum()) < mask.numel()
    manual = w.clone()
    manual[la >= threshold] = 0.0
    assert torch.equal(R.masked_weight(w, ls2, threshold), manual)
    x = torch.randn(5, 13)
    b = torch.randn(8)
    y = F.linear(x, R.masked_weight(w, ls2, threshold), b)
    y_manual = x @ manual.t() + b
    assert_close(y, y_manual, rtol=1e-5, atol=1e-5, name="masked linear")
