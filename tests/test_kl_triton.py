"""The ``triton`` backend of ``kl_sparse_vd`` (the fused kernel in sparsevd.triton_kernels.kl, launched
by sparsevd.ops.kl.triton): what is particular to the Triton backend (one launch for many layers,
blocks and partial blocks, GPU compilation). The tests every backend passes are in test_kl.py.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch
from conftest import assert_close
from sample_inputs import F64, KL_BLOCK_CASES, KL_SHAPES, amax, check_kl, kept_layer, kl_layer, kl_reference
import triton_aot

import sparsevd
from sparsevd.ops.kl import naive_kept_count, naive_kl_sparse_vd

triton = pytest.importorskip("triton")
from sparsevd.ops.kl import triton as TI  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OP = torch.ops.sparsevd.kl_sparse_vd.default
OP_KEPT = torch.ops.sparsevd.kl_sparse_vd_kept.default


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 weights, so that small layers span several blocks and end in a partial one
    (the interpreter's default block is 65536)."""
    monkeypatch.setattr(TI, "elementwise_block", lambda dtype=torch.float32: (256, 4))


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
    layers = [kl_layer(s, device=DEVICE) for s in KL_SHAPES]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = OP(ws, ls, True)
    assert counter.launches == 1
    check_kl(kl, gws, gls, ws, ls)


def test_blocks_and_partial_blocks(small_blocks):
    """Every layer spans several blocks and ends in a partial one; an empty layer has none."""
    layers = [kl_layer(s, device=DEVICE) for s in KL_BLOCK_CASES]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl, gws, gls = OP(ws, ls, True)
    check_kl(kl, gws, gls, ws, ls)


def test_kept_count_over_blocks_and_dtypes(small_blocks, monkeypatch):
    """The kept count when layers span several blocks (each program adds its block's count to its
    layer's) and an empty layer has none, and with fp32 and fp64 layers in one call (one launch per
    dtype, the counts put back in the layers' order): the reference's, one launch per dtype."""
    counter = _Counter(TI.KK.kl_sparse_vd_kernel)
    monkeypatch.setattr(TI.KK, "kl_sparse_vd_kernel", counter)
    layers = [kept_layer(s, 3.0, device=DEVICE) if 0 not in s else kl_layer(s, device=DEVICE)
              for s in KL_BLOCK_CASES]
    layers.insert(2, kept_layer((40, 9), 1.0, F64, device=DEVICE))
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    thrs = [3.0, 3.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    kl, gws, gls, kept = OP_KEPT(ws, ls, True, thrs)
    assert counter.launches == 2
    assert kept.tolist() == naive_kept_count(ws, ls, thrs).tolist()
    assert kept[4] == 0  # the empty layer (0, 5)
    check_kl(kl, gws, gls, ws, ls)


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
    kl_64, gw_64, gl_64 = kl_reference([m.weight for m in layers], [m.log_sigma2 for m in layers])
    assert_close(kl_t, kl_64, rtol=1e-5, atol=0.0, name="kl")
    for a, e in zip(gw_t + gl_t, gw_64 + gl_64):
        assert_close(a, 0.5 * e, rtol=1e-4, atol=1e-7, name="grad vs fp64")
    kl_r, gw_r, gl_r = results["reference"]
    assert_close(kl_t, kl_r, rtol=1e-4, atol=0.0, name="kl vs reference backend")
    for a, e in zip(gw_t + gl_t, gw_r + gl_r):
        assert_close(a, e, rtol=1e-3, atol=1e-3 * amax(e), name="grad vs reference backend")


def test_matches_reference_backend_impl():
    """The triton implementation and the naive math (the reference backend) agree, lists and
    dtypes."""
    layers = [kl_layer(s, device=DEVICE) for s in [(13, 17), (5,)]]
    ws, ls = [w for w, _ in layers], [s for _, s in layers]
    kl_t, gw_t, gl_t = TI.triton_kl_sparse_vd(ws, ls, True)
    kl_r, gw_r, gl_r = naive_kl_sparse_vd(ws, ls, True)
    assert kl_t.dtype == kl_r.dtype
    assert_close(kl_t, kl_r, rtol=1e-4, atol=0.0, name="kl")
    for a, e in zip(gw_t + gl_t, gw_r + gl_r):
        assert a.dtype == e.dtype
        assert_close(a, e, rtol=1e-3, atol=1e-3 * amax(e), name="grad")


_AOT = """
from sparsevd.triton_kernels import kl as KK

for dt in ("fp32", "bf16", "fp64"):
    acc = "*fp64" if dt == "fp64" else "*fp32"
    build(KK.kl_sparse_vd_kernel,
          dict(base_ptr="*" + dt, table_ptr="*i64", partial_ptr=acc, thr_ptr=acc, kept_ptr="*i64"),
          dict(ACC_F64=dt == "fp64", WITH_GRAD=True, ALIGN=4, L_PAD=4, BLOCK=1024, COUNT=True), 8, 3)
"""
triton_aot.register("kl", _AOT)


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run the kernel")
def test_kernel_compiles_for_gpu_without_a_gpu():
    """The KL kernel, for fp32, bf16 and fp64 parameters, lowers to a cubin for sm_90
    (tests/triton_aot.py)."""
    assert triton_aot.compiled_for_gpu("kl") == 3
