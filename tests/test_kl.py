"""The op family ``kl`` (sparsevd/ops/kl: ``sparsevd::kl_sparse_vd``, the sparse-VD KL of many layers
with its gradients in one pass, and ``sparsevd::log_alpha``) on every backend and device that run
here (conftest.py: ``backend``, ``device``), against the family's naive math (sparsevd.ops.kl.naive,
eq. 14) in fp64.

Backend-only tests (kernel sets, flags, launch counts, blocks): test_kl_native.py,
test_kl_triton.py; the per-weight math by hand: test_weights.py.
"""
import pytest
import torch
from conftest import assert_close
from sample_inputs import (F64, KEPT_THRESHOLDS, KL_SHAPES, check_kl, kept_layer, kl_layer, kl_params,
                           kl_reference, nonfinite_kept_layer)

import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.kl import kl_sparse_vd, kl_sparse_vd_kept, log_alpha, naive_kl_sparse_vd
from sparsevd.ops.kl.naive import naive_kept_mask

OP = "kl_sparse_vd"
KL_OP = torch.ops.sparsevd.kl_sparse_vd.default
KEPT_OP = torch.ops.sparsevd.kl_sparse_vd_kept.default


def _naive_kl(weights, log_sigma2s):
    """The KL value of the naive math (differentiable by autograd)."""
    return naive_kl_sparse_vd(weights, log_sigma2s, False)[0]


def test_many_layers(device):
    """Layers of different shapes (LeNet-300-100's, a conv weight, single weights, partial
    blocks): the KL and both gradients equal the fp64 reference."""
    layers = [kl_layer(s, device=device) for s in KL_SHAPES]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = KL_OP(ws, ls, True)
    check_kl(kl, gws, gls, ws, ls)


def test_value_only(device):
    layers = [kl_layer(s, device=device) for s in [(50, 20), (33,)]]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = KL_OP(ws, ls, False)
    assert gws == [] and gls == []
    assert_close(kl, kl_reference(ws, ls)[0], rtol=1e-4, atol=0.0, name="kl")


def test_clamp_masks_gradient(device):
    """Where log σ² − log(θ² + 1e-8) is outside (−10, 10) both gradients are exactly 0."""
    w = torch.full((64,), 0.5, device=device)
    ls2 = torch.cat([torch.full((32,), 20.0), torch.full((32,), -30.0)]).to(device)
    kl, gws, gls = KL_OP([w], [ls2], True)
    assert torch.count_nonzero(gws[0]) == 0 and torch.count_nonzero(gls[0]) == 0
    check_kl(kl, gws, gls, [w], [ls2])


def test_non_contiguous_and_mixed_dtypes(device):
    """A transposed weight (gradients come back in its layout) and an fp64 layer beside fp32 ones:
    one launch per dtype, the KL in promote(weights[0].dtype, fp32)."""
    w1, s1 = kl_layer((20, 30), device=device)
    w2, s2 = kl_layer((40, 9), dtype=F64, device=device)
    w3, s3 = kl_layer((30, 20), device=device)
    ws, ls = [w1, w2, w3.t(), w1], [s1, s2, s3.t(), s1]
    kl, gws, gls = KL_OP(ws, ls, True)
    assert gws[2].stride() == w3.t().stride()
    check_kl(kl, gws, gls, ws, ls)


def test_fp64_is_computed_in_fp64(device):
    layers = [kl_layer(s, dtype=F64, device=device) for s in [(30, 20), (11,)]]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = KL_OP(ws, ls, True)
    check_kl(kl, gws, gls, ws, ls, rtol=1e-10)


def test_functional_single_layer(device):
    w, s = kl_layer((8, 9), device=device)
    assert_close(SF.kl_sparse_vd(w, s), kl_reference([w], [s])[0], rtol=1e-4, atol=0.0, name="kl")


def test_gradcheck_kl_sparse_vd(device):
    w1, s1 = kl_params((4, 3), device=device)
    w2, s2 = kl_params((2, 1, 2, 2), device=device)
    inputs = [t.requires_grad_() for t in (w1, s1, w2, s2)]
    assert torch.autograd.gradcheck(SF.kl_sparse_vd, inputs[:2])
    assert torch.autograd.gradcheck(lambda a, b, c, d: SF.kl_sparse_vd_many([a, c], [b, d]), inputs)
    assert torch.autograd.gradcheck(lambda a, b, c, d: kl_sparse_vd([a, c], [b, d], True)[0],
                                    inputs)


def test_gradcheck_log_alpha(device):
    w, ls2 = kl_params((5, 4), device=device)
    inputs = [t.requires_grad_() for t in (w, ls2)]
    assert torch.autograd.gradcheck(log_alpha, inputs)
    assert torch.autograd.gradcheck(SF.log_alpha, inputs)


def test_kl_op_value_and_gradients_equal_reference(device):
    shapes = [(7, 5), (3, 2, 3, 3), (1, 1)]
    params = [kl_params(s, device=device) for s in shapes]
    ws = [p[0].requires_grad_() for p in params]
    ss = [p[1].requires_grad_() for p in params]
    kl = kl_sparse_vd(ws, ss, True)[0]
    g_op = torch.autograd.grad(kl * 1.7, ws + ss)
    kl_ref = _naive_kl(ws, ss)
    g_ref = torch.autograd.grad(kl_ref * 1.7, ws + ss)
    assert_close(kl, kl_ref, rtol=1e-12, atol=1e-12, name="kl")
    for i, (a, e) in enumerate(zip(g_op, g_ref)):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {i}")
    # with_grad=False: the same value, no gradients, and differentiating it is an error.
    kl_ng, gw, gs = kl_sparse_vd([w.detach() for w in ws], [s.detach() for s in ss], False)
    assert gw == [] and gs == []
    assert_close(kl_ng, kl_ref, rtol=1e-12, atol=1e-12, name="kl without grad")
    with pytest.raises(RuntimeError, match="with_grad=True"):
        kl_sparse_vd(ws, ss, False)[0].backward()


def test_kl_op_fp32_against_fp64(device):
    w, s = kl_params((40, 30), device=device)
    kl32 = kl_sparse_vd([w.float()], [s.float()], False)[0]
    assert kl32.dtype == torch.float32
    assert_close(kl32, _naive_kl([w], [s]), rtol=1e-5, atol=1e-5, name="kl fp32")


def test_log_alpha_op_equals_reference(device):
    w = torch.randn(9, 8, device=device)
    ls2 = torch.randn(9, 8, device=device) * 12
    assert_close(log_alpha(w, ls2), W.log_alpha(w.double(), ls2.double()), rtol=1e-5,
                 atol=1e-5, name="log_alpha")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_opcheck_kl_sparse_vd(device, dtype):
    p1, p2 = kl_params((4, 3), device=device), kl_params((2, 1, 2, 2), device=device)
    ws = [p1[0].to(dtype), p2[0].to(dtype)]
    ss = [p1[1].to(dtype), p2[1].to(dtype)]
    torch.library.opcheck(kl_sparse_vd, (ws, ss, False))
    ws = [w.requires_grad_() for w in ws]
    ss = [s.requires_grad_() for s in ss]
    torch.library.opcheck(kl_sparse_vd, (ws, ss, True))


def test_opcheck_log_alpha(device):
    w, ls2 = kl_params((5, 4), device=device)
    torch.library.opcheck(log_alpha, (w.requires_grad_(), ls2.requires_grad_()))
    torch.library.opcheck(log_alpha, (w.detach().float(), ls2.detach().float()))


# ------------------------------------------------------------- the kept count (kl_sparse_vd_kept)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kept_count_equals_eval_mask(device, dtype):
    """The count the KL's pass adds, per layer, against eval_mask (the pruning rule) and
    kept_count on the same fresh parameters: log α spread around each threshold, a quarter within
    ±0.15 of it, clamped weights, exact ties (θ = ±1, log σ² = threshold and one step below: fp32);
    several layers (their own thresholds) in one call, vectors' tails and multi-chunk layers."""
    shapes = [(300, 784), (7, 3, 5, 5), (129,), (17, 5), (1, 1)]
    for thr in KEPT_THRESHOLDS:
        thrs = [thr, thr - 0.25, thr, 2.0, thr]
        layers = [kept_layer(s, t, dtype, device) for s, t in zip(shapes, thrs)]
        ws, ls = [w for w, _ in layers], [s for _, s in layers]
        kl, gws, gls, kept = KEPT_OP(ws, ls, False, thrs)
        assert kept.dtype == torch.int64 and kept.shape == (len(shapes),) and kept.device == ws[0].device
        expected = [int(W.eval_mask(w, s, t).sum()) for w, s, t in zip(ws, ls, thrs)]
        assert kept.tolist() == expected, thr
        assert kept.tolist() == [SF.kept_count(w.cpu(), s.cpu(), t) for w, s, t in zip(ws, ls, thrs)], thr
        if -10 < thr < 10:
            assert 0 < expected[0] < ws[0].numel()


def test_kept_count_exact_ties_decide_both_ways(device):
    """θ = 1 in fp32: log α = log σ² exactly, so log σ² = threshold is dropped and one fp32 step
    below it kept, on every backend."""
    thr = torch.tensor(3.0)
    ls2 = torch.stack([thr, torch.nextafter(thr, torch.tensor(0.0))]).repeat(20).to(device)
    w = torch.ones(40, device=device)
    _, _, _, kept = KEPT_OP([w], [ls2], True, [3.0])
    assert kept.tolist() == [20]


def test_kept_count_nonfinite_rule(device):
    """NaN / ±inf θ (and θ² = inf), NaN / +inf log σ² and log σ² = 100 (e^{log σ²} = inf) count as
    kept, the rule of functional.kept_count; log σ² = −inf is log α = −10, kept at threshold 0."""
    w, ls2 = nonfinite_kept_layer(device=device)
    w2, ls22 = nonfinite_kept_layer(F64, device=device)
    _, _, _, kept = KEPT_OP([w, w2], [ls2, ls22], False, [0.0, 0.0])
    assert kept.tolist()[0] == SF.kept_count(w.cpu(), ls2.cpu(), 0.0) == int(naive_kept_mask(w, ls2, 0.0).sum()) == 8
    assert kept.tolist()[1] == int(naive_kept_mask(w2, ls22, 0.0).sum()) == 7  # e^100 is finite in fp64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kept_count_half_precision_counts_sigma2_in_fp32(dtype):
    """A half-precision layer whose log σ² is above fp16's exp range (≈ 11.1) is dropped, not
    counted as a non-finite (kept) weight: kept_count's σ² is at least fp32, as the KL's count."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    w = (torch.rand(64, 32, generator=g) + 0.5).to(dtype)  # |θ| in [0.5, 1.5): log θ² < 0.82
    # log α in [−8, 20], at least 0.3 from the threshold (bf16 rounds log σ² near 16 by 0.06)
    la = torch.empty(64, 32).uniform_(-8.0, 20.0, generator=g)
    la = torch.where((la - 3.0).abs() < 0.3, la + 0.6 * torch.sign(la - 3.0), la)
    ls2 = (la + torch.log(w.float() ** 2)).to(dtype)
    expected = int(W.eval_mask(w.float(), ls2.float(), 3.0).sum())
    assert 0 < expected < w.numel() and (ls2.float() > 11.5).any()
    assert SF.kept_count(w, ls2, 3.0) == expected
    _, _, _, kept = KEPT_OP([w.float()], [ls2.float()], False, [3.0])
    assert kept.tolist() == [expected]


def test_kept_op_leaves_the_kl_unchanged(device):
    """kl_sparse_vd_kept's KL and gradients are kl_sparse_vd's, bit for bit (the same pass), with
    and without gradients, through autograd (β ≠ 1) and the functional API."""
    layers = [kl_layer(s, device=device) for s in KL_SHAPES]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    thrs = [3.0] * len(ws)
    for with_grad in (True, False):
        a = KL_OP(ws, ls, with_grad)
        b = KEPT_OP(ws, ls, with_grad, thrs)
        assert torch.equal(a[0], b[0])
        for x, y in zip(a[1] + a[2], b[1] + b[2]):
            assert torch.equal(x, y)
    grads = {}
    for name in ("many", "kept"):
        wr = [w.clone().requires_grad_() for w in ws]
        lr = [s.clone().requires_grad_() for s in ls]
        if name == "many":
            kl = SF.kl_sparse_vd_many(wr, lr)
        else:
            kl, kept = SF.kl_sparse_vd_kept(wr, lr, thrs)
            assert not kept.requires_grad
            assert kept.tolist() == [int(W.eval_mask(w, s, 3.0).sum()) for w, s in zip(ws, ls)]
        (0.37 * kl).backward()
        grads[name] = (kl.detach(), [t.grad for t in wr + lr])
    assert torch.equal(grads["many"][0], grads["kept"][0])
    for x, y in zip(grads["many"][1], grads["kept"][1]):
        assert torch.equal(x, y)


def test_kept_op_gradcheck_and_opcheck(device):
    w1, s1 = kl_params((4, 3), device=device)
    w2, s2 = kl_params((2, 1, 2, 2), device=device)
    inputs = [t.requires_grad_() for t in (w1, s1, w2, s2)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: kl_sparse_vd_kept([a, c], [b, d], True, [3.0, 0.0])[0],
                                    inputs)
    assert torch.autograd.gradcheck(lambda a, b, c, d: SF.kl_sparse_vd_kept([a, c], [b, d], [3.0, 0.0])[0],
                                    inputs)
    for dtype in (F64, torch.float32):
        ws = [w1.detach().to(dtype), w2.detach().to(dtype)]
        ss = [s1.detach().to(dtype), s2.detach().to(dtype)]
        torch.library.opcheck(kl_sparse_vd_kept, (ws, ss, False, [3.0, 1.0]))
        torch.library.opcheck(kl_sparse_vd_kept, ([w.requires_grad_() for w in ws],
                                                  [s.requires_grad_() for s in ss], True, [3.0, 1.0]))


def test_kept_functional_checks_name_the_argument(device):
    w, s = kl_params((4, 3), device=device)
    with pytest.raises(ValueError, match="thresholds: expected 1 values"):
        SF.kl_sparse_vd_kept([w], [s], [3.0, 3.0])
    with pytest.raises(ValueError, match="thresholds"):
        SF.kl_sparse_vd_kept([w], [s], [float("nan")])
    with pytest.raises(ValueError, match="log_sigma2s"):
        SF.kl_sparse_vd_kept([w, w], [s], [3.0, 3.0])
