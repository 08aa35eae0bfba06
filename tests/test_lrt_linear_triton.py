"""The ``triton`` backend of ``lrt_linear`` (the kernels in sparsevd.triton_kernels.lrt_linear, launched
by sparsevd.ops.lrt_linear.triton) against the family's naive math on identical noise: what is
particular to the Triton backend (tiles, launches, dot precision, dead-tile skipping under
train-time clipping, GPU compilation). The tests every backend passes (values, gradients, noise,
gradcheck, opcheck, torch.compile) are in test_lrt_linear.py.

Without a GPU every kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the shape tests use 16x32x32 tiles (fixture linear_small_tiles) and sit on, under and over them
(sample_inputs.LINEAR_TILE_CASES); one test crosses the interpreter's default 32x256x512 tiles.
bf16/fp16 autocast and the autotuned GPU configs are tested on a GPU only; without one, a test
compiles every kernel for sm_90. The oracle is the naive math in fp64 with autograd, fed the noise
of sparsevd.ops.noise.lrt_noise (the torch twin of tl.randn) or the kernels' own.
"""
import math
import os

import pytest
import torch
from conftest import NoLaunch, assert_close, train_sgvlb
from sample_inputs import (CLIP_TILE_CASES, F64, LINEAR_TILE_CASES, clip_case,
                           dead_tiles, linear_inputs, op_noise)
import triton_aot

import sparsevd
from sparsevd.ops import weights as W
from sparsevd.ops.lrt_linear import lrt_linear, lrt_linear_backward, naive_lrt_linear
from sparsevd.ops.noise import draw_seed, lrt_noise

triton = pytest.importorskip("triton")
from sparsevd.ops.lrt_linear import triton as TI  # noqa: E402
from sparsevd.ops.triton_common import AUTOTUNE_ENV, FP32_PRECISION_ENV, make_config, precision  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N_SE = 5.0  # statistical bounds, in standard errors (a false alarm about once in 10⁶ runs)
OP = torch.ops.sparsevd.lrt_linear.default
OP_BWD = torch.ops.sparsevd.lrt_linear_backward.default


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")


def make_params(n, k, bias=True, dtype=torch.float32, device=DEVICE):
    """θ, log σ², b of an (n, k) layer as sample_inputs.linear_inputs draws them."""
    return linear_inputs((1,), k, n, dtype, bias, device=device)[1:]


def kernel_noise(seed, shape):
    """ξ of an output of ``shape`` as the kernels draw it (sample_inputs.op_noise)."""
    return op_noise(shape, seed)


def oracle(x, w, ls2, b, seed, g, noise_fn=lrt_noise):
    """fp64 y and (∂x, ∂θ, ∂log σ², ∂b) of the naive math on the op's noise (from
    sparsevd.ops.noise.lrt_noise, or the kernels' own with noise_fn=kernel_noise)."""
    leaves = [None if t is None else t.detach().to(F64).requires_grad_() for t in (x, w, ls2, b)]
    noise = noise_fn(seed, (*x.shape[:-1], w.shape[0])).to(F64)
    y = naive_lrt_linear(*leaves, None, noise=noise)[0]
    y.backward(g.to(F64))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def fused(x, w, ls2, b, seed, g):
    """y, std and the gradients of the op with the triton backend."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, ls2, b)]
    y, std = OP(*leaves, seed)
    y.backward(g)
    return y.detach(), std, [None if t is None else t.grad for t in leaves]


def check(actual, expected, name, rtol=1e-4):
    """rtol on each element, atol relative to the tensor's scale (sums that cancel to ~0)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=rtol * 0.1 * scale + 1e-7, name=name)


def run_and_compare(x, w, ls2, b, rtol=1e-4, noise_fn=lrt_noise):
    seed = draw_seed(DEVICE)
    g = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    y, std, grads = fused(x, w, ls2, b, seed, g)
    y_ref, grads_ref = oracle(x, w, ls2, b, seed, g, noise_fn)
    assert y.dtype == x.dtype and std.dtype == torch.promote_types(x.dtype, w.dtype)
    check(y, y_ref, "y", rtol)
    x64 = x.detach().to(F64)
    std_ref = torch.sqrt(torch.nn.functional.linear(x64 * x64, torch.exp(ls2.detach().to(F64))) + W.EPS_VAR)
    check(std, std_ref, "std", rtol)
    for name, a, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), grads, grads_ref):
        if e is None:
            assert a is None, name
        else:
            assert a.shape == e.shape and a.dtype == x.dtype, name
            check(a, e, name, rtol)


# ------------------------------------------------------------------------------ values, fp32
@pytest.mark.parametrize("m,k,n", LINEAR_TILE_CASES, ids=[f"{m}x{k}x{n}" for m, k, n in LINEAR_TILE_CASES])
def test_forward_and_gradients_match_reference(linear_small_tiles, m, k, n):
    x = torch.randn(m, k, device=DEVICE)
    run_and_compare(x, *make_params(n, k))


def test_default_interpreter_tiles():
    """The interpreter's own config (32x256x512): a shape just over it in every dimension."""
    assert TI.INTERPRETER_TILES[:3] == (32, 256, 512) or CUDA
    x = torch.randn(33, 513, device=DEVICE)
    run_and_compare(x, *make_params(257, 513))


def test_no_bias(linear_small_tiles):
    x = torch.randn(19, 70, device=DEVICE)
    run_and_compare(x, *make_params(33, 70, bias=False))


def _expanded(m, k):
    return torch.randn(1, k, device=DEVICE).expand(m, k)  # stride 0 along the rows


LAYOUTS = {
    "3d": lambda k: torch.randn(2, 5, k, device=DEVICE),
    "1d": lambda k: torch.randn(k, device=DEVICE),
    "transposed": lambda k: torch.randn(k, 21, device=DEVICE).t(),
    "sliced": lambda k: torch.randn(21, 2 * k, device=DEVICE)[:, ::2],
    "3d_permuted": lambda k: torch.randn(5, 3, k, device=DEVICE).transpose(0, 1),
    "4d": lambda k: torch.randn(2, 3, 2, k, device=DEVICE),
    "4d_permuted": lambda k: torch.randn(3, 2, 2, k, device=DEVICE).permute(1, 0, 2, 3),
    "expanded": lambda k: _expanded(9, k),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_input_layouts(linear_small_tiles, layout):
    """Any leading shape and non-contiguous x: read through its strides (one or two leading dims)
    or, for more leading dims that do not flatten, through a copy; ∂x comes back in x's layout."""
    k, n = 37, 11
    x = LAYOUTS[layout](k)
    run_and_compare(x, *make_params(n, k))


def test_non_contiguous_parameters(linear_small_tiles):
    x = torch.randn(13, 40, device=DEVICE)
    w, ls2, b = make_params(40, 17)
    w, ls2, b = w.t(), ls2.t(), torch.randn(34, device=DEVICE)[::2]  # (17, 40) views, strided bias
    run_and_compare(x, w, ls2, b)


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch_launches_nothing(monkeypatch, lead):
    monkeypatch.setattr(TI, "_fwd_kernel", NoLaunch())
    monkeypatch.setattr(TI, "_bwd_kernel", NoLaunch())
    monkeypatch.setattr(TI, "K", NoLaunch())
    w, ls2, b = make_params(7, 5)
    x = torch.randn(*lead, 5, device=DEVICE, requires_grad=True)
    leaves = [t.requires_grad_() for t in (w, ls2, b)]
    y, std = OP(x, *leaves, draw_seed(DEVICE))
    assert y.shape == (*lead, 7) and std.shape == (*lead, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in leaves:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_zero_out_features(monkeypatch):
    """N = 0: empty y and std, ∂x = 0, empty ∂θ, ∂log σ², ∂b; nothing launched."""
    monkeypatch.setattr(TI, "_fwd_kernel", NoLaunch())
    monkeypatch.setattr(TI, "_bwd_kernel", NoLaunch())
    monkeypatch.setattr(TI, "K", NoLaunch())
    w, ls2, b = (t.requires_grad_() for t in make_params(0, 5))
    x = torch.randn(2, 3, 5, device=DEVICE, requires_grad=True)
    y, std = OP(x, w, ls2, b, draw_seed(DEVICE))
    assert y.shape == std.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and w.grad.shape == (0, 5) and b.grad.shape == (0,)


def test_tf32_flag_path():
    """allow_tf32 selects input_precision="tf32" (identical to IEEE in the interpreter; on a GPU the
    error is the TF32 one)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert precision(torch.empty(1)) == "tf32"
        x = torch.randn(9, 33, device=DEVICE)
        run_and_compare(x, *make_params(10, 33), rtol=1e-4 if not CUDA else 3e-2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert precision(torch.empty(1)) == ("tf32" if old else "ieee")


def test_fp32_precision_override(monkeypatch):
    """SPARSEVD_FP32_PRECISION=tf32x3 (about fp32 accuracy on tensor cores) runs; bad values raise."""
    monkeypatch.setenv(FP32_PRECISION_ENV, "tf32x3")
    assert precision(torch.empty(1)) == "tf32x3"
    assert precision(torch.empty(1, dtype=torch.bfloat16)) == "ieee"
    x = torch.randn(9, 33, device=DEVICE)
    run_and_compare(x, *make_params(10, 33), rtol=1e-4 if not CUDA else 1e-3)
    monkeypatch.setenv(FP32_PRECISION_ENV, "fast")
    with pytest.raises(ValueError, match="SPARSEVD_FP32_PRECISION"):
        precision(torch.empty(1))


def test_gpu_config_pruning():
    """On a GPU the autotuner gets the union of TILES; the pruner keeps the set of the call's dot
    kind (IEEE fp32 FMA tiles have BLOCK_K ≤ 16; fp64 tiles are small) and only row tiles ≤ 32
    for batches ≤ 32."""
    for kernel in ("fwd", "bwd"):
        union = [make_config(t) for kind in ("tc", "tc32", "ieee", "fp64") for t in TI.TILES[(kernel, kind)]]
        prune = TI._pruner(kernel)

        def tiles(dtype, precision, f64, m_key):
            args = {"x_ptr": torch.empty(1, dtype=dtype), "M_KEY": m_key}
            kept = prune(union, args, PRECISION=precision, ACC_F64=f64)
            return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                    for c in kept}

        assert tiles(torch.float32, "ieee", False, 256) == set(TI.TILES[(kernel, "ieee")])
        assert all(t[2] <= 16 for t in tiles(torch.float32, "ieee", False, 256))
        assert tiles(torch.float32, "tf32", False, 256) == set(TI.TILES[(kernel, "tc32")])
        assert tiles(torch.bfloat16, "ieee", False, 8192) == set(TI.TILES[(kernel, "tc")])
        assert tiles(torch.float64, "ieee", True, 8) == set(TI.TILES[(kernel, "fp64")])
        small = tiles(torch.bfloat16, "ieee", False, 16)
        assert small and all(t[0] <= 32 for t in small)
        assert prune(union[:1], {}, PRECISION="ieee", ACC_F64=False) == union[:1]
        os.environ[AUTOTUNE_ENV] = "0"  # restored below
        try:
            assert tiles(torch.float32, "ieee", False, 256) == {TI.TILES[(kernel, "ieee")][0]}
        finally:
            del os.environ[AUTOTUNE_ENV]


# ---------------------------------------------------------------------------- fp64, gradcheck
def test_fp64_is_computed_in_fp64():
    """fp64 inputs run the kernels with fp64 tiles and accumulators: equal to the fp64 oracle to
    1e-10, which an fp32 computation could not reach. ξ itself is fp32 (tl.randn); the oracle takes
    the kernels' own ξ here, since the torch twin may differ from it in the last fp32 ulp."""
    x = torch.randn(7, 45, dtype=F64, device=DEVICE)
    run_and_compare(x, *make_params(9, 45, dtype=F64), rtol=1e-10, noise_fn=kernel_noise)


# ----------------------------------------------------------- train-time clipping: dead tiles
def _nan_alloc(monkeypatch):
    """Every floating tensor that torch.empty, torch.empty_like and Tensor.new_empty allocate
    from now on starts as NaN: outputs a kernel leaves unwritten show up."""
    def filled(fn):
        def alloc(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return alloc

    monkeypatch.setattr(torch, "empty", filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", filled(torch.Tensor.new_empty))


def _clip_run(x, w, ls2, b, seed, thr, g, need_grad_x=True):
    y, std = lrt_linear(x, w, ls2, b, seed, thr)
    return (y, std, *lrt_linear_backward(g, x, w, ls2, std, seed, need_grad_x, thr))


@pytest.mark.parametrize("need_grad_x", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("lead,k,n,dead_rows,dead_cols", CLIP_TILE_CASES + [((5,), 7, 4, (), ())])
def test_clip_tile_skipping_equals_no_skipping(linear_small_tiles, monkeypatch, need_grad_x,
                                               lead, k, n, dead_rows, dead_cols):
    """Triton: skipping the all-dropped weight tiles (default) gives bit for bit what the kernels
    give without skipping (SPARSEVD_TRITON_CLIP_SKIP=0); the skipping path is taken exactly for
    the dead tiles (count_skipped_tiles: forward K steps and ∂x N steps once per row tile, dead
    ∂θ programs once each); every element of every output is written (NaN-filled allocations)
    and the dropped weights' gradients are exactly 0."""
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, True, True, DEVICE)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    keep = W.eval_mask(w, ls2, thr)
    seed = draw_seed(DEVICE)
    g = torch.randn(*lead, n, device=DEVICE)
    _nan_alloc(monkeypatch)
    monkeypatch.setenv(TI.CLIP_SKIP_ENV, "1")
    with TI.count_skipped_tiles(DEVICE) as skipped:
        out = _clip_run(x, w, ls2, b, seed, thr, g, need_grad_x)
    monkeypatch.setenv(TI.CLIP_SKIP_ENV, "0")
    with TI.count_skipped_tiles(DEVICE) as not_skipped:
        out_ref = _clip_run(x, w, ls2, b, seed, thr, g, need_grad_x)
    names = ("y", "std", "grad x", "grad weight", "grad log_sigma2", "grad bias")
    for name, a, e in zip(names, out, out_ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
        assert torch.equal(a, e), f"{name}: skipping changed the result"
    assert torch.all(out[3][~keep] == 0) and torch.all(out[4][~keep] == 0)
    bm, bn, bk = linear_small_tiles[:3]
    dead = dead_tiles(keep, bn, bk)
    row_tiles = -(-math.prod(lead) // bm)
    assert (dead > 0) == bool(dead_rows or dead_cols)  # the cases are what they claim
    assert skipped.tolist() == [row_tiles * dead, row_tiles * dead * need_grad_x, dead]
    assert not_skipped.tolist() == [0, 0, 0]


def test_clip_tile_skipping_all_dead_and_none_dead(linear_small_tiles):
    """Triton: every tile dead (threshold −11: y = b + 1e-4 ξ, ∂x = ∂θ = ∂log σ² = 0, ∂b = Σ g)
    and no tile dead (threshold 11: the unclipped kernels' results, bit for bit)."""
    lead, k, n = (20,), 70, 40
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, True, True, DEVICE)
    seed = draw_seed(DEVICE)
    g = torch.randn(*lead, n, device=DEVICE)
    bm, bn, bk = linear_small_tiles[:3]
    tiles = -(-n // bn) * -(-k // bk)
    with TI.count_skipped_tiles(DEVICE) as skipped:
        y, std, gx, gw, gl, gb = _clip_run(x, w, ls2, b, seed, -11.0, g)
    assert skipped.tolist() == [2 * tiles, 2 * tiles, tiles]
    xi = op_noise(y.shape, seed)
    assert_close(y, b + math.sqrt(1e-8) * xi, rtol=1e-6, atol=1e-7, name="all dead")
    assert torch.all(gx == 0) and torch.all(gw == 0) and torch.all(gl == 0)
    assert_close(gb, g.sum(0), rtol=1e-5, atol=1e-6, name="grad bias")
    with TI.count_skipped_tiles(DEVICE) as skipped:
        clipped = _clip_run(x, w, ls2, b, seed, 11.0, g)
    assert skipped.tolist() == [0, 0, 0]
    for a, e in zip(clipped, _clip_run(x, w, ls2, b, seed, None, g)):
        assert torch.equal(a, e)


def test_clip_skip_env_is_validated(monkeypatch):
    """Triton: SPARSEVD_TRITON_CLIP_SKIP takes 0 or 1; another value is an error naming it (only
    clipped calls read it)."""
    x, w, ls2, b = linear_inputs((3,), 4, 2, torch.float32, True, True, DEVICE)
    monkeypatch.setenv(TI.CLIP_SKIP_ENV, "yes")
    with pytest.raises(ValueError, match=TI.CLIP_SKIP_ENV):
        lrt_linear(x, w, ls2, b, draw_seed(DEVICE), 0.0)
    lrt_linear(x, w, ls2, b, draw_seed(DEVICE))  # unclipped: not read


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0·inf
def test_clip_tile_skipping_keeps_nonfinite_inputs(linear_small_tiles, monkeypatch):
    """Triton: an inf in x (or g) that meets only dropped weights still makes its rows NaN, as
    0·inf does in the dots without skipping and in the reference (F.linear with θ ⊙ m)."""
    lead, k, n, dead_rows, dead_cols = CLIP_TILE_CASES[0]
    x, w, ls2, b = linear_inputs(lead, k, n, torch.float32, True, True, DEVICE)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    x[3, 5] = float("inf")  # column 5: in the dead column block
    seed = draw_seed(DEVICE)
    g = torch.randn(*lead, n, device=DEVICE)
    g[7, 40] = float("inf")  # output 40: in the dead row block
    outs = []
    for skip in ("1", "0"):
        monkeypatch.setenv(TI.CLIP_SKIP_ENV, skip)
        outs.append(_clip_run(x, w, ls2, b, seed, thr, g))
    for a, e in zip(*outs):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num())
    y, gx = outs[0][0], outs[0][2]
    wm, s2m = W.clip_parameters(w, ls2, thr)
    y_ref = torch.nn.functional.linear(x, wm, b)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y[3].isnan().all()
    assert gx[7].isnan().all()


@pytest.mark.parametrize("case", [0, 2])
def test_clip_tile_gradcheck_and_opcheck(linear_small_tiles, case):
    """fp64 gradcheck (fast mode: random projections) and opcheck through the kernels on cases
    with whole dead weight tiles."""
    lead, k, n, dead_rows, dead_cols = CLIP_TILE_CASES[case]
    lead = (3,)  # few rows: the check's cost grows with the batch
    x, w, ls2, b = linear_inputs(lead, k, n, F64, True, True, DEVICE)
    thr = clip_case(w, ls2, dead_rows, dead_cols)
    seed = draw_seed(DEVICE)
    leaves = tuple(t.requires_grad_() for t in (x, w, ls2, b))
    assert torch.autograd.gradcheck(lambda *a: lrt_linear(*a, seed, thr)[0], leaves,
                                    fast_mode=True)
    if case == 0:
        torch.library.opcheck(lrt_linear, (*leaves, seed, thr))
        y, std = lrt_linear(*leaves, seed, thr)
        torch.library.opcheck(lrt_linear_backward,
                              (torch.randn_like(y), *(t.detach() for t in leaves[:3]), std.detach(),
                               seed, False, thr))


# ------------------------------------------------------------------------------ convergence
def _lenet300():
    try:
        from sparsevd.models import LeNet300
    except ImportError:
        LeNet300 = None
    if LeNet300 is not None:
        return LeNet300(svd=True)
    L = sparsevd.nn.LinearSVDO
    return torch.nn.Sequential(L(784, 300), torch.nn.ReLU(), L(300, 100), torch.nn.ReLU(), L(100, 10))


def _train(backend_name, init_state, data, steps, monkeypatch):
    """Adam on SGVLB (β = 1) from ``init_state``; returns the loss per step and the sparsity of
    each layer every 10 steps."""
    monkeypatch.setenv("SPARSEVD_BACKEND", backend_name)
    model = _lenet300().to(DEVICE)
    model.load_state_dict(init_state)
    layers = [m for m in model.modules() if isinstance(m, sparsevd.nn.LinearSVDO)]
    losses, sparsities = train_sgvlb(model, *data, steps, batch=25, noise_seed=99,
                                     every=(10, lambda m: [layer.sparsity for layer in layers]))
    return losses, torch.tensor(sparsities)


def test_lenet300_training_matches_reference(monkeypatch):
    """LeNet-300-100 trained from the same init, data and noise seeds with the fused kernels (in
    the interpreter here: ~60 steps fit in about a minute) and with the reference backend: the
    same loss curve and the same per-layer sparsity every 10 steps, within noise. Random data, batch
    25; the KL drives the layers from ~5 % to 80-100 % sparsity within the run."""
    steps = 60
    model = _lenet300()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    xs = torch.randn(200, 784, device=DEVICE)
    ys = torch.randint(0, 10, (200,), device=DEVICE)
    loss_t, sparsity_t = _train("triton", init, (xs, ys), steps, monkeypatch)
    loss_r, sparsity_r = _train("reference", init, (xs, ys), steps, monkeypatch)
    assert 0.3 < sparsity_r[1].mean() < 0.9 and sparsity_r[-1].mean() > 0.7, (
        f"the run should sparsify gradually (sparsities {sparsity_r.tolist()}); the test is too weak")
    assert_close(loss_t, loss_r, rtol=1e-2, atol=0.0, name="loss curve")
    assert_close(sparsity_t, sparsity_r, rtol=0.0, atol=0.02, name="sparsity per layer")


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not CUDA, reason="bf16/fp16 dots and the autotuned configs need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(100, 784, 300), (37, 129, 65), (256, 1024, 1024)])
def test_autocast_low_precision_gpu(dtype, m, k, n):
    """Under autocast (x in bf16/fp16, fp32 parameters): y in x's dtype, std and parameter
    gradients in fp32; error at most 2× that of PyTorch doing the same math in that precision
    (flash-attention's rule) plus a small floor."""
    w, ls2, b = make_params(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)  # the activations the op receives
    seed = draw_seed(DEVICE)
    g = torch.randn(m, n, device="cuda").to(dtype)
    y_ref, grads_ref = oracle(x, w, ls2, b, seed, g)  # fp64 math on the same rounded inputs
    with torch.autocast("cuda", dtype=dtype):
        y, std, grads = fused(x, w, ls2, b, seed, g)
        leaves = [t.detach().requires_grad_() for t in (x, w, ls2, b)]
        noise = lrt_noise(seed, (m, n), device="cuda")
        y_pt = naive_lrt_linear(*leaves, None, noise=noise.to(dtype))[0]  # PyTorch's autocast version
        y_pt.backward(g)
    assert y.dtype == dtype and std.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in grads[1:])
    for name, a, e, p in zip(("y", "grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"),
                             [y] + grads, [y_ref] + grads_ref, [y_pt] + [t.grad for t in leaves]):
        err = (a.double() - e).abs().max().item()
        err_pt = (p.double() - e).abs().max().item()
        assert err <= 2.0 * err_pt + 1e-3 * e.abs().max().item(), (name, err, err_pt)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_large_shapes_gpu():
    x = torch.randn(512, 1024, device="cuda")
    run_and_compare(x, *make_params(1000, 1024), rtol=1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4)


# ------------------------------------------------------------------- GPU compile, without a GPU
_AOT = """
from sparsevd.triton_kernels import lrt_linear as K

ones = dict(stride_xk=1, stride_wk=1, stride_lk=1, stride_b=1, stride_gxk=1, stride_gwk=1, stride_glk=1)
clip_types = dict(clip_threshold="fp64", cnt_ptr="*i64")
unclipped = dict(CLIP=False, SKIP_DEAD=False, COUNT_SKIPS=False)
for x, v, prec, f64, clips in [
        ("fp32", "fp32", "ieee", False, [unclipped, dict(CLIP=True, SKIP_DEAD=True, COUNT_SKIPS=False)]),
        ("bf16", "bf16", "ieee", False, [unclipped, dict(CLIP=True, SKIP_DEAD=True, COUNT_SKIPS=True)]),
        ("fp16", "fp32", "tf32", False, [unclipped]), ("fp64", "fp64", "ieee", True, [unclipped])]:
    w = "fp64" if f64 else "fp32"
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)
    fwd = {k: v_ for k, v_ in ones.items() if k in K.lrt_linear_fwd_kernel.arg_names}
    bwd = {k: v_ for k, v_ in ones.items() if k in K.lrt_linear_bwd_kernel.arg_names}
    for clip in clips:
        build(K.lrt_linear_fwd_kernel,
              dict(x_ptr="*" + x, w_ptr="*" + w, ls2_ptr="*" + w, b_ptr="*" + w, seed_ptr="*i64",
                   y_ptr="*" + x, std_ptr="*" + w, **clip_types),
              dict(HAS_BIAS=True, ACC_F64=f64, VAR_LOWP=x == "bf16", PRECISION=prec, **clip, **tiles,
                   **fwd), 4, 3)
        build(K.lrt_linear_bwd_kernel,
              dict(g_ptr="*" + x, gs2_ptr="*" + v, x_ptr="*" + x, w_ptr="*" + w, ls2_ptr="*" + w,
                   gx_ptr="*" + x, gw_ptr="*" + w, gl_ptr="*" + w, gb_ptr="*" + w, **clip_types),
              dict(ACC_F64=f64, PRECISION=prec, WITH_DX=True, **clip, **tiles, **bwd), 4, 3)
    build(K.lrt_linear_bwd_gs2_kernel,
          dict(g_ptr="*" + x, std_ptr="*" + w, seed_ptr="*i64", gs2_ptr="*" + v),
          dict(ACC_F64=f64, BLOCK=1024), 4, 3)
"""
triton_aot.register("lrt_linear", _AOT)


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_gpu_without_a_gpu():
    """Every lrt_linear kernel, in every dtype variant (and the clipped kernels, with their
    dead-tile branches and, in bf16, the skip counter's atomics), lowers to a cubin for sm_90
    (tests/triton_aot.py; small tiles, to stay fast)."""
    assert triton_aot.compiled_for_gpu("lrt_linear") == 16
