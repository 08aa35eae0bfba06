"""The ``native`` backend of ``kl_sparse_vd`` (csrc/cpu/kl_cpu.cpp, sparsevd/ops/kl/native.py) against
the naive math (the reference backend, called directly) and fp64: what is particular to the
compiled CPU kernel. Every kernel set this CPU runs (``isa``): accuracy per log α band, the lanes
near and at the clamp bit for bit, the per-layer non-finite flags, bf16 and non-contiguous
parameters, thread counts, the eager C++ autograd path against the custom op, argument checks.
The tests every backend passes are in test_kl.py.
"""
import math

import pytest
import torch
from conftest import PassThrough, assert_close, close, scale_of
from sample_inputs import F64, KEPT_THRESHOLDS, KL_SHAPES, kept_layer, kl_params, linear_inputs, nonfinite_kept_layer

import sparsevd.functional as SF
from sparsevd.ops.kl import kl_sparse_vd, naive_kept_count, naive_kl_sparse_vd

N = pytest.importorskip("sparsevd.ops.kl.native", reason="native backend unavailable")


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "native")


def test_equals_fp64_reference(isa):
    params = [kl_params(s) for s in KL_SHAPES]
    ws = [p[0] for p in params]
    ss = [p[1] for p in params]
    kl_r, gw_r, gs_r = naive_kl_sparse_vd(ws, ss, True)
    kl, gw, gs = N.native_kl_sparse_vd(ws, ss, True)
    assert kl.dtype == F64 and kl.shape == ()
    close(kl, kl_r, 1e-12, "kl fp64")
    for i, (a, e) in enumerate(zip(gw + gs, gw_r + gs_r)):
        assert a.shape == e.shape and a.dtype == e.dtype
        close(a, e, 1e-10, f"fp64 grad {i}")
    # fp32 against the fp64 reference on the fp32-rounded inputs. Measured max relative errors:
    # KL sum 5e-8, gradients 1.5e-6 (the fp32 reference: the same), set by rounding log α in fp32.
    w32, s32 = [w.float() for w in ws], [s.float() for s in ss]
    kl_o, gw_o, gs_o = naive_kl_sparse_vd([w.double() for w in w32], [s.double() for s in s32], True)
    kl32, gw32, gs32 = N.native_kl_sparse_vd(w32, s32, True)
    assert kl32.dtype == torch.float32
    close(kl32, kl_o, 1e-6, "kl fp32")
    for i, (a, e) in enumerate(zip(gw32 + gs32, gw_o + gs_o)):
        assert a.dtype == torch.float32
        assert_close(a, e, rtol=5e-6, atol=1e-6 * scale_of(e), name=f"fp32 grad {i}")
    # Value only: the same value, no gradients.
    kl_v, gw_v, gs_v = N.native_kl_sparse_vd(w32, s32, False)
    assert gw_v == [] and gs_v == []
    assert float(kl_v) == pytest.approx(float(kl32), rel=1e-6)


@pytest.mark.parametrize("la", [-11.0, -9.0, -5.0, -2.0, -0.5, 0.0, 0.5, 2.0, 5.0, 9.0, 11.0])
def test_fp32_accuracy_per_log_alpha_band(isa, la):
    """fp32 KL of 4096 weights with log α near one value against fp64: a systematic error of a
    term (which a spread of log α would average out) shows up here. Measured: |rel| <= 1e-7."""
    w = 0.3 * (1 + 0.01 * torch.randn(4096))
    s = la + 0.01 * torch.randn(4096) + torch.log(w * w + 1e-8)
    kl64 = naive_kl_sparse_vd([w.double()], [s.double()], False)[0]
    kl, gw, gs = N.native_kl_sparse_vd([w], [s], True)
    assert abs(float(kl) - float(kl64)) <= 3e-7 * float(kl64)
    _, gw64, gs64 = naive_kl_sparse_vd([w.double()], [s.double()], True)
    assert_close(gs[0], gs64[0], rtol=5e-6, atol=1e-7 * scale_of(gs64[0]), name="grad log_sigma2")
    assert_close(gw[0], gw64[0], rtol=5e-6, atol=1e-7 * scale_of(gw64[0]), name="grad weight")


def test_near_the_clamp_and_tiny_weights():
    """log α just inside/outside ±10 (gradient zero outside), θ = 0 and tiny θ (θ² ≪ 1e-8)."""
    la = torch.tensor([-10.5, -10.0001, -9.9999, -5.0, 0.0, 5.0, 9.9999, 10.0001, 10.5] * 4, dtype=F64)
    w = torch.tensor([0.0, 1e-9, 1e-5, 0.3, -2.0, 1e-3, 7.0, -1e-4, 0.05] * 4, dtype=F64)
    s = la + torch.log(w * w + 1e-8)
    for dtype, rtol in ((F64, 1e-10), (torch.float32, 5e-6)):
        kl_o, gw_o, gs_o = naive_kl_sparse_vd([w], [s], True)
        kl, gw, gs = N.native_kl_sparse_vd([w.to(dtype)], [s.to(dtype)], True)
        close(kl, kl_o, rtol, f"kl {dtype}")
        inside = (la.abs() < 10)
        assert (gs[0][~inside] == 0).all() and (gw[0][~inside] == 0).all()
        assert_close(gs[0], gs_o[0], rtol=rtol, atol=rtol * scale_of(gs_o[0]), name=f"gls2 {dtype}")
        assert_close(gw[0], gw_o[0], rtol=rtol, atol=rtol * scale_of(gw_o[0]), name=f"gw {dtype}")


def test_lanes_near_the_clamp_have_the_full_lanes_bits(isa):
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
    kl, gw, gs = N.native_kl_sparse_vd([w], [s], True)
    kl_r, _, _ = naive_kl_sparse_vd([w.double()], [s.double()], True)
    close(kl, kl_r, 1e-6, "kl")
    _, gw_d, gs_d = N.native_kl_sparse_vd([w], [dense], True)
    for a, e, name in ((gw[0], gw_d[0], "gw"), (gs[0], gs_d[0], "gls2")):
        assert torch.equal(a.view(torch.int32)[edge], e.view(torch.int32)[edge]), name
    inside = gs[0][edge] != 0
    assert inside.any() and (~inside).any(), "both sides of the clamp"


def test_clamped_lanes_have_the_full_lanes_bits(isa):
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
        kl, gw, gs = N.native_kl_sparse_vd([w], [s], True)
        kl_r, gw_r, gs_r = naive_kl_sparse_vd([w.double()], [s.double()], True)
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
    kl, gw, gs = N.native_kl_sparse_vd([w_nan], [variants["clamped"] + log_w2], True)
    assert math.isnan(float(kl)) and N.nonfinite_layers().tolist() == [True]
    assert math.isnan(float(gw[0][100])) and math.isnan(float(gs[0][100]))
    others = torch.ones(n, dtype=torch.bool)
    others[100] = False
    assert torch.equal(gw[0].view(torch.int32)[others], got["clamped"][0][others])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_nonfinite_flags(isa, dtype):
    """NaN / ±inf in θ or log σ² of some of several layers: the flags say which, the clean layers'
    gradients are the reference's, and the glue exposes the flags of the last call."""
    shapes = [(30, 17), (300, 100), (5,), (64, 33), (1000,)]
    params = [kl_params(s, dtype) for s in shapes]
    ws = [p[0].clone() for p in params]
    ss = [p[1].clone() for p in params]
    ws[1].view(-1)[12345] = float("nan")        # in the vectorized body of a multi-chunk layer
    ss[2][4] = float("inf")                     # the scalar tail of a tiny layer
    ws[3].view(-1)[-1] = float("-inf")          # the last element
    ss[4][999] = float("nan")
    kl, gw, gs = N.native_kl_sparse_vd(ws, ss, True)
    flags = N.nonfinite_layers()
    assert flags.dtype == torch.bool and flags.tolist() == [False, True, True, True, True]
    assert N.last_nonfinite is flags
    assert math.isnan(float(kl))
    _, gw_r, gs_r = naive_kl_sparse_vd(ws[:1], ss[:1], True)
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
    assert N.nonfinite_layers().tolist() == [False, True, True, True, True]
    kl_sparse_vd([p[0] for p in params], [p[1] for p in params], False)
    assert N.nonfinite_layers().tolist() == [False] * 5


def test_bf16_parameters():
    w, s = kl_params((33, 17), torch.bfloat16)
    kl_r, gw_r, gs_r = naive_kl_sparse_vd([w], [s], True)
    kl, gw, gs = N.native_kl_sparse_vd([w], [s], True)
    assert kl.dtype == torch.float32 and gw[0].dtype == torch.bfloat16 and gs[0].dtype == torch.bfloat16
    close(kl, kl_r, 1e-5, "kl")
    assert_close(gw[0], gw_r[0], rtol=2**-7, atol=2**-7 * scale_of(gw_r[0]), name="gw")
    assert_close(gs[0], gs_r[0], rtol=2**-7, atol=2**-7 * scale_of(gs_r[0]), name="gs")


def test_noncontiguous_parameters_keep_their_strides():
    w, s = kl_params((12, 9), torch.float32)
    wt, st = w.t(), s.t()
    kl_r, gw_r, gs_r = naive_kl_sparse_vd([wt], [st], True)
    kl, gw, gs = N.native_kl_sparse_vd([wt], [st], True)
    assert gw[0].stride() == wt.stride() and gs[0].stride() == st.stride()
    close(kl, kl_r, 1e-6, "kl")
    close(gw[0], gw_r[0], 5e-6, "gw")


@pytest.mark.parametrize("beta", [1.0, 0.37])
def test_eager_kl_equals_custom_op_bitwise(beta):
    """The KL's eager path: the same value and gradients as the custom op, at β = 1 (the backward
    hands out the forward's gradients as they are) and β ≠ 1 (scaled); repeated backward with
    retain_graph accumulates correctly; the non-finite flags are set."""
    shapes = [(30, 17), (300, 100), (5,)]
    params = [kl_params(s, torch.float32) for s in shapes]
    res = {}
    for path in ("eager", "custom_op"):
        ws = [p[0].clone().requires_grad_() for p in params]
        ss = [p[1].clone().requires_grad_() for p in params]
        if path == "eager":
            kl = SF.kl_sparse_vd_many(ws, ss)
        else:
            with PassThrough():
                kl = SF.kl_sparse_vd_many(ws, ss)
        (beta * kl).backward(retain_graph=True)
        first = [t.grad.clone() for t in (*ws, *ss)]
        (beta * kl).backward()
        res[path] = (kl.detach(), first, [t.grad for t in (*ws, *ss)])
    assert torch.equal(res["eager"][0], res["custom_op"][0])
    for a, e, twice in zip(res["eager"][1], res["custom_op"][1], res["eager"][2]):
        assert torch.equal(a, e)
        assert torch.equal(twice, a + a)
    assert N.nonfinite_layers().tolist() == [False] * 3



def test_thread_count_does_not_change_the_sum():
    """The KL's per-thread chunks are summed in a fixed order: the same sum on 1 and 2 threads."""
    threads = torch.get_num_threads()
    try:
        params = [kl_params(s, torch.float32) for s in KL_SHAPES]
        torch.set_num_threads(2)
        kl2 = N.native_kl_sparse_vd([p[0] for p in params], [p[1] for p in params], True)
        torch.set_num_threads(1)
        kl1 = N.native_kl_sparse_vd([p[0] for p in params], [p[1] for p in params], True)
        assert torch.equal(kl1[0], kl2[0]), "the KL sum does not depend on the thread count"
    finally:
        torch.set_num_threads(threads)


def test_eager_without_grad_inference_and_double_backward():
    """The eager path with grad mode off, in inference mode (the forward alone), and a second
    derivative, which raises as through the custom op."""
    _, w, ls2, _ = linear_inputs((4,), 8, 3)
    with torch.inference_mode():
        kl = SF.kl_sparse_vd_many([w], [ls2])
    assert torch.equal(kl, N.native_kl_sparse_vd([w], [ls2], False)[0])
    w.requires_grad_()
    kl = SF.kl_sparse_vd_many([w], [ls2])
    (gw,) = torch.autograd.grad(kl, w, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gw.sum().backward()


def test_cpp_argument_checks_name_the_argument():
    _, w, ls2, _ = linear_inputs((3,), 4, 5)
    K = torch.ops.sparsevd.native_kl_sparse_vd
    cases = [
        (lambda: K([w, w], [ls2], True), "log_sigma2s"),
        (lambda: K([w], [ls2[:2]], True), "log_sigma2s"),
        (lambda: K([w], [ls2.double()], True), "log_sigma2s"),
        (lambda: K([w.int()], [ls2.int()], True), "weights"),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError, match=name):
            fn()


def test_kept_count_on_every_kernel_set(isa):
    """The kept count of the native KL on each kernel set (AVX-512, AVX2, portable; fp32 vectors,
    gathered band lanes, classified clamped lanes, scalar tails; fp64) against the reference
    count, with and without gradients, on 1 and 2 threads (chunks of 16384 weights)."""
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for dtype in (torch.float32, F64):
                for thr in KEPT_THRESHOLDS:
                    layers = [kept_layer(s, thr, dtype) for s in ((300, 784), (129,), (3, 5))]
                    ws, ls = [w for w, _ in layers], [s for _, s in layers]
                    expected = naive_kept_count(ws, ls, [thr] * 3)
                    for with_grad in (True, False):
                        *_, kept = N.native_kl_sparse_vd_kept(ws, ls, with_grad, [thr] * 3)
                        assert torch.equal(kept, expected), (nt, dtype, thr, with_grad)
            w, ls2 = nonfinite_kept_layer()
            *_, kept = N.native_kl_sparse_vd_kept([w], [ls2], True, [0.0])
            assert kept.tolist() == [8] and N.nonfinite_layers().tolist() == [True]
    finally:
        torch.set_num_threads(threads)


def test_kept_count_of_clamped_blocks(isa):
    """Blocks whose lanes are almost all clamped (classified without the log: log α = ±10 exactly)
    with a few band lanes among them, at thresholds that keep or drop each clamp: the count is
    the reference's."""
    n = 16 * 16 * 20 + 5
    w = 0.3 * torch.randn(n)
    raw = torch.where(torch.rand(n) < 0.5, 12 + torch.rand(n), -12 - torch.rand(n))
    raw[::37] = 4 * torch.rand(n)[::37] - 2
    raw[::53] = 10 + 0.1 * (torch.rand(n)[::53] - 0.5)
    ls2 = raw + torch.log(w * w + 1e-8)
    ls2[::101] = 95.0  # e^{log σ²} = inf: kept
    for thr in (-10.5, -10.0, -1.0, 3.0, 10.0, 10.5):
        raw32 = ls2.double() - torch.log(w.double() ** 2 + 1e-8)
        clear = ls2.clone()
        clear[(raw32 - thr).abs() < 1e-4] += 0.01
        *_, kept = N.native_kl_sparse_vd_kept([w], [clear], False, [thr])
        assert kept.tolist() == naive_kept_count([w], [clear], [thr]).tolist(), thr


def test_eager_kept_equals_custom_op():
    """The eager C++ autograd path with thresholds: the KL, gradients and counts of the custom op."""
    params = [kl_params(s, torch.float32) for s in [(30, 17), (300, 100), (5,)]]
    res = {}
    for path in ("eager", "custom_op"):
        ws = [p[0].clone().requires_grad_() for p in params]
        ss = [p[1].clone().requires_grad_() for p in params]
        if path == "eager":
            kl, kept = SF.kl_sparse_vd_kept(ws, ss, [3.0, 0.0, 1.0])
        else:
            with PassThrough():
                kl, kept = SF.kl_sparse_vd_kept(ws, ss, [3.0, 0.0, 1.0])
        (0.5 * kl).backward()
        res[path] = (kl.detach(), kept, [t.grad for t in (*ws, *ss)])
    assert torch.equal(res["eager"][0], res["custom_op"][0])
    assert torch.equal(res["eager"][1], res["custom_op"][1])
    for a, e in zip(res["eager"][2], res["custom_op"][2]):
        assert torch.equal(a, e)
    with torch.inference_mode():
        kl, kept = SF.kl_sparse_vd_kept([p[0] for p in params], [p[1] for p in params], [3.0, 0.0, 1.0])
    assert torch.equal(kept, res["eager"][1])
    with pytest.raises(RuntimeError, match="thresholds"):
        torch.ops.sparsevd.native_kl_sparse_vd([params[0][0]], [params[0][1]], False, [3.0, 3.0])
