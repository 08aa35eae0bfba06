"""The ``triton`` backend of ``lrt_conv2d`` (the kernels in sparsevd.triton_kernels.lrt_conv2d,
launched by sparsevd.ops.lrt_conv2d.triton) against the family's naive math on identical noise: what
is particular to the Triton backend (tiles, the implicit-GEMM and direct kernels, every convolution
option, layouts, split weight gradients, launches, GPU compilation). The tests every backend passes
are in test_lrt_conv2d.py.

Without a GPU every kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
with tiles fitted to each problem; the odd-shape tests force 16x16x16 GEMM tiles and 16x4 direct
tiles (fixture small_tiles) and sit on, under and over them. bf16/fp16 autocast and the autotuned
GPU configs are tested on a GPU only; without one, a test compiles every kernel for sm_90.
The oracle is the naive math in fp64 with autograd, fed the noise of sparsevd.ops.noise.lrt_noise
(fp32 tests) or the kernels' own ξ (fp64 tests, to 1e-10).
"""
import os

import pytest
import torch
from conftest import NoLaunch, assert_close, train_sgvlb
from sample_inputs import (CONV_DIRECT_TILE_CASES, CONV_OPTION_CASES, CONV_SMALL_DIRECT_TILES,
                           CONV_SMALL_TILES, CONV_TILE_CASES, F64, conv_inputs,
                           op_noise)
import triton_aot

import sparsevd
import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.conv_geometry import conv2d, conv2d_out_shape, conv_padding, padding_arg
from sparsevd.ops.lrt_conv2d import naive_lrt_conv2d
from sparsevd.ops.noise import draw_seed, lrt_noise

triton = pytest.importorskip("triton")
from sparsevd.ops.lrt_conv2d import triton as TC  # noqa: E402
from sparsevd.ops.triton_common import AUTOTUNE_ENV, make_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CL = torch.channels_last
OP = torch.ops.sparsevd.lrt_conv2d.default
OP_BWD = torch.ops.sparsevd.lrt_conv2d_backward.default


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")


def make_conv(n, c_in, hw, c_out, k, groups=1, dtype=torch.float32, bias=True):
    """x (n, c_in, *hw) and a (c_out, c_in / groups, k) layer as sample_inputs.conv_inputs draws
    them (k an int or a pair)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return conv_inputs((n, c_in, *hw), (c_out, kh, kw), groups, dtype, bias, device=DEVICE)


def kernel_noise(seed, shape):
    """ξ of a conv output of ``shape`` as the kernels draw it (sample_inputs.op_noise)."""
    return op_noise(shape, seed, "lrt_conv2d")


def op_args(w, stride=1, padding=0, dilation=1, groups=1):
    """The op's (stride, padding, dilation, groups) lists, padding resolved as functional does."""
    s = [stride] * 2 if isinstance(stride, int) else list(stride)
    d = [dilation] * 2 if isinstance(dilation, int) else list(dilation)
    return s, padding_arg(conv_padding(padding, tuple(w.shape[2:]), s, d)), d, groups


def oracle(x, w, ls2, b, seed, g, args, noise_fn=lrt_noise):
    """fp64 y and gradients of the naive math on the op's noise."""
    leaves = [None if t is None else t.detach().to(F64).requires_grad_() for t in (x, w, ls2, b)]
    stride, padding, dilation, groups = args
    out_shape = conv2d_out_shape(x, w, stride, padding, dilation)
    noise = noise_fn(seed, out_shape).to(F64)
    y = naive_lrt_conv2d(*leaves, None, stride, padding, dilation, groups, noise=noise)[0]
    y.backward(g.to(F64))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def check(actual, expected, name, rtol):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=rtol * 0.1 * scale + (1e-7 if rtol > 1e-8 else 1e-13),
                 name=name)


def run_and_compare(x, w, ls2, b, args, rtol=1e-4, noise_fn=lrt_noise):
    """The op (triton) against the fp64 oracle: y, std, the four gradients, their dtypes and the
    layouts (y and std as the reference backend lays them out, ∂x as x)."""
    seed = draw_seed(DEVICE)
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, ls2, b)]
    y, std = OP(*leaves, seed, *args)
    g = torch.randn(y.shape, dtype=x.dtype, device=x.device)
    y.backward(g)
    y_ref, grads_ref = oracle(x, w, ls2, b, seed, g, args, noise_fn)
    assert y.dtype == x.dtype and std.dtype == torch.promote_types(x.dtype, w.dtype)
    with torch.no_grad():
        os.environ["SPARSEVD_BACKEND"] = "reference"  # restored by the autouse fixture
        y_rb, _ = OP(x, w, ls2, b, seed, *args)
        os.environ["SPARSEVD_BACKEND"] = "triton"
    assert y.stride() == y_rb.stride() == std.stride(), (y.stride(), y_rb.stride(), std.stride())
    check(y, y_ref, "y", rtol)
    x64, s2 = x.detach().to(F64), torch.exp(ls2.detach().to(F64))
    std_ref = torch.sqrt(conv2d(x64 * x64, s2, None, *args) + W.EPS_VAR)
    check(std, std_ref, "std", rtol)
    for name, leaf, e in zip(("grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"), leaves, grads_ref):
        if e is None:
            assert leaf is None
            continue
        assert leaf.grad.shape == e.shape and leaf.grad.dtype == leaf.dtype, name
        check(leaf.grad, e, name, rtol)
    assert leaves[0].grad.stride() == torch.empty_like(x).stride()


# ------------------------------------------------------------------------ odd shapes, tiles
@pytest.fixture
def small_tiles(monkeypatch):
    """16x16x16 GEMM tiles in groups of 2 row tiles and 16x4 direct tiles instead of the tiles
    fitted to each problem, so that small shapes span many tiles, K steps and tile groups."""
    monkeypatch.setattr(TC, "FIT_INTERPRETER_TILES", False)
    cfg = [make_config(CONV_SMALL_TILES, group_m=2)]
    bm, bc, warps = CONV_SMALL_DIRECT_TILES
    dcfg = [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps)]
    monkeypatch.setattr(TC, "_fwd_kernel", TC.autotuned_gemm(TC.KC.lrt_conv2d_fwd_kernel, "fwd", cfg))
    monkeypatch.setattr(TC, "_bwd_kernel", TC.autotuned_gemm(TC.KC.lrt_conv2d_bwd_kernel, "bwd", cfg))
    monkeypatch.setattr(TC, "_direct_fwd_kernel", TC.autotuned_direct(TC.KC.lrt_conv2d_direct_fwd_kernel, "fwd", dcfg))
    monkeypatch.setattr(TC, "_direct_bwd_kernel", TC.autotuned_direct(TC.KC.lrt_conv2d_direct_bwd_kernel, "bwd", dcfg))


@pytest.fixture
def split_weight_grad(monkeypatch):
    """Split the weight gradients' reduction over the output pixels even for tiny problems
    (chunks of 16 rows, as if the machine had 64 SMs): the partial sums and the reduce kernel."""
    monkeypatch.setattr(TC, "INTERPRETER_SMS", 64)
    monkeypatch.setattr(TC, "MIN_CHUNK_M", 16)
    monkeypatch.setattr(TC, "CHUNK_ALIGN", 16)


def _ids(shapes):
    return ["x".join(map(str, (s[0], s[1], *s[2], s[3]))) + f"-g{s[8]}" for s in shapes]


@pytest.mark.parametrize("shape", CONV_TILE_CASES + CONV_DIRECT_TILE_CASES,
                         ids=_ids(CONV_TILE_CASES + CONV_DIRECT_TILE_CASES))
def test_odd_shapes_small_tiles(small_tiles, shape):
    n, c_in, hw, c_out, k, stride, padding, dilation, groups = shape
    x, w, ls2, b = make_conv(n, c_in, hw, c_out, k, groups)
    run_and_compare(x, w, ls2, b, op_args(w, stride, padding, dilation, groups))


@pytest.mark.parametrize("direct", [False, True])
def test_split_weight_gradient(small_tiles, split_weight_grad, direct):
    """The weight gradients summed over chunks of the output pixels (partial sums, reduce kernel)
    equal the unsplit ones; ∂b too."""
    groups, c_out = (4, 8) if direct else (1, 5)
    x, w, ls2, b = make_conv(2, 4, (5, 4), c_out, 3, groups)
    args = op_args(w, 1, 1, 1, groups)
    assert TC.split_m(2 * 20, 1, torch.device(DEVICE))[0] > 1 or CUDA
    run_and_compare(x, w, ls2, b, args)


# ------------------------------------------------------------------------- every option, fp64
@pytest.mark.parametrize("name", list(CONV_OPTION_CASES))
def test_options_fp64(name):
    """Every option in fp64 on the kernels' own noise, to 1e-10 of the fp64 reference, with the
    layouts the reference backend returns (channels_last y and std for channels_last x or θ)."""
    n, c_in, hw, c_out, k, stride, padding, dilation, groups, layout = CONV_OPTION_CASES[name]
    x, w, ls2, b = make_conv(n, c_in, hw, c_out, k, groups, F64)
    if layout in ("x", "both"):
        x = x.to(memory_format=CL)
    if layout == "both":
        w, ls2 = w.to(memory_format=CL), ls2.to(memory_format=CL)
    if layout == "sliced":
        x = torch.randn(n, c_in + 2, hw[0], 2 * hw[1], dtype=F64, device=DEVICE)[:, 1:-1, :, ::2]
    run_and_compare(x, w, ls2, b, op_args(w, stride, padding, dilation, groups), rtol=1e-10,
                    noise_fn=kernel_noise)
    if padding == "same":
        y = SF.lrt_conv2d(x, w, ls2, b, stride, padding, dilation, groups)
        assert y.shape[2:] == x.shape[2:]


def test_same_padding_matches_torch_resolution():
    """padding="same" resolves to what nn.Conv2d pads (odd and even kernels, dilation): the
    eval-mode twin of Conv2dSVDO equals nn.Conv2d(padding="same") on the same weights."""
    for k, d in ((3, 1), (2, 1), (4, 2), ((2, 5), (3, 1))):
        dense = torch.nn.Conv2d(2, 3, k, padding="same", dilation=d, bias=False)
        sides = conv_padding("same", dense.kernel_size, 1, dense.dilation)
        rev = dense._reversed_padding_repeated_twice  # (left, right, top, bottom)
        assert sides == (rev[2], rev[3], rev[0], rev[1]), (k, d, sides, rev)


# ------------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("groups", [1, 3])
def test_empty_batch_launches_nothing(monkeypatch, groups):
    for name in ("_fwd_kernel", "_bwd_kernel", "_direct_fwd_kernel", "_direct_bwd_kernel", "KC"):
        monkeypatch.setattr(TC, name, NoLaunch())
    x, w, ls2, b = make_conv(0, 3, (5, 5), 6, 3, groups)
    leaves = [t.requires_grad_() for t in (x, w, ls2, b)]
    y, std = OP(*leaves, draw_seed(DEVICE), *op_args(w, 1, 1, 1, groups))
    assert y.shape == std.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert leaves[0].grad.shape == x.shape
    for t in leaves[1:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_index_range_is_checked():
    """Pixel indices are int32 in the kernels: a batch whose N·H·W reaches 2³¹ is refused with an
    error naming x (no silent wrap-around)."""
    x = torch.empty(2**16, 1, 2**8, 2**8, device="meta")
    with pytest.raises(ValueError, match=r"^x: the triton backend indexes pixels in int32"):
        TC._check_index_range(x, 1)


# ----------------------------------------------------------------------------------- noise
def test_noise_is_lrt_noise_in_every_kernel_and_layout():
    """ξ of the conv kernels is sparsevd.ops.noise.lrt_noise(seed, y.shape), indexed by the row-major
    offset of the logical (N, C_out, H_out, W_out) output whatever the memory layout of y, in
    the implicit-GEMM and in the direct kernel (θ = 0, log σ² = 0 on x = 1 gives y = ξ·sqrt(1 + 1e-8)
    per tap)."""
    seed = draw_seed(DEVICE)
    shape = (2, 6, 5, 4)
    expected = lrt_noise(seed, shape).to(F64)
    assert_close(kernel_noise(seed, shape), expected, rtol=1e-5, atol=1e-5, name="xi gemm")
    x = torch.ones(2, 3, 5, 4, device=DEVICE).to(memory_format=CL)
    z = torch.zeros(6, 1, 1, 1, device=DEVICE)
    y, _ = OP(x, z, z, None, seed, [1, 1], [0, 0], [1, 1], 3)  # direct kernel, channels_last
    assert y.is_contiguous(memory_format=CL)
    assert_close(y, expected, rtol=1e-5, atol=1e-5, name="xi direct, channels_last")


# ------------------------------------------------------------------------------ train_clip
@pytest.mark.parametrize("groups", [1, 2])
def test_clip_threshold_masks_in_registers(groups):
    """The kernels' CLIP variant (for train_clip; not exposed by the ops yet): weights with
    log α ≥ threshold leave the mean and the variance, and get zero gradients."""
    x, w, ls2, b = make_conv(2, 2, (5, 4), 2 * groups, 3, groups, F64)
    ls2 = torch.log(w * w) + torch.empty_like(w).uniform_(-4.0, 4.0)  # log α in (−4, 4)
    thr = 0.5
    args = op_args(w, 1, 1, 1, groups)
    seed = draw_seed(DEVICE)
    leaves = [t.detach().requires_grad_() for t in (x, w, ls2, b)]
    y, std = TC.triton_lrt_conv2d(*leaves, seed, *args, clip_threshold=thr)
    g = torch.randn_like(y)
    grads = TC.triton_lrt_conv2d_backward(g, x, w, ls2, std, seed, *args, clip_threshold=thr)
    keep = (W.log_alpha(w, ls2) < thr).to(F64)
    assert 0 < keep.mean() < 1
    ref = [t.detach().clone().requires_grad_() for t in (x, w, ls2, b)]
    xi = kernel_noise(seed, y.shape)
    mu = torch.nn.functional.conv2d(ref[0], ref[1] * keep, ref[3], 1, 1, 1, groups)
    s2 = torch.nn.functional.conv2d(ref[0] ** 2, torch.exp(ref[2]) * keep, None, 1, 1, 1, groups)
    y_ref = mu + torch.sqrt(s2 + W.EPS_VAR) * xi
    y_ref.backward(g)
    check(y, y_ref.detach(), "y", 1e-10)
    for name, a, e in zip(("x", "weight", "log_sigma2", "bias"), grads, ref):
        check(a, e.grad, f"grad {name}", 1e-10)


# ----------------------------------------------------------------------- gradcheck, opcheck
@pytest.mark.parametrize("case", ["gemm_same_even", "direct"])
def test_gradcheck_full(case):
    """Full fp64 gradcheck through the kernels (one forward per input element), tiny shapes: the
    implicit-GEMM kernels with four-sided padding, the direct kernels. (Strides, dilation and
    groups: fast-mode gradcheck in test_lrt_conv2d.py, fp64 gradients to 1e-10 above.)"""
    if case == "gemm_same_even":
        x, w, ls2, b = make_conv(1, 1, (3, 2), 2, 2, 1, F64)
        conv = dict(padding="same")
    else:
        x, w, ls2, b = make_conv(1, 2, (2, 2), 2, (2, 1), 2, F64)
        conv = dict(padding=(1, 0), groups=2)
    seed = draw_seed(DEVICE)
    inputs = [t.requires_grad_() for t in (x, w, ls2, b)]
    assert torch.autograd.gradcheck(lambda *a: SF.lrt_conv2d(*a, **conv, seed=seed), inputs)


def test_opcheck_channels_last_asymmetric_depthwise():
    """opcheck of both ops where the fake impls have most to get right: channels_last layouts of
    y and std, four-sided padding, the direct kernels."""
    x, w, ls2, b = make_conv(1, 2, (4, 5), 4, 2, 2, F64)
    x = x.to(memory_format=CL).requires_grad_()
    for t in (w, ls2, b):
        t.requires_grad_()
    args = op_args(w, 1, "same", 1, 2)
    assert len(args[1]) == 4
    seed = draw_seed(DEVICE)
    torch.library.opcheck(OP, (x, w, ls2, b, seed, *args))
    y, std = OP(x, w, ls2, b, seed, *args)
    assert y.is_contiguous(memory_format=CL)
    torch.library.opcheck(
        OP_BWD, (torch.randn_like(y), x.detach(), w.detach(), ls2.detach(), std.detach(), seed, *args))


def test_gpu_config_pruning():
    """On a GPU the autotuner gets the union of TILES; the pruner keeps the call's dot kind, and
    SPARSEVD_TRITON_AUTOTUNE=0 keeps its first tile."""
    for kernel in ("fwd", "bwd"):
        union = [make_config(t) for kind in ("tc", "tc32", "ieee", "fp64") for t in TC.TILES[(kernel, kind)]]
        prune = TC._gemm_pruner(kernel)

        def tiles(dtype, precision, f64):
            kept = prune(union, {"x_ptr": torch.empty(1, dtype=dtype)}, PRECISION=precision, ACC_F64=f64)
            return [TC._tile(c) for c in kept]

        assert set(tiles(torch.float32, "ieee", False)) == set(TC.TILES[(kernel, "ieee")])
        assert set(tiles(torch.float32, "tf32", False)) == set(TC.TILES[(kernel, "tc32")])
        assert set(tiles(torch.bfloat16, "ieee", False)) == set(TC.TILES[(kernel, "tc")])
        assert set(tiles(torch.float64, "ieee", True)) == set(TC.TILES[(kernel, "fp64")])
        os.environ[AUTOTUNE_ENV] = "0"
        try:
            assert len(tiles(torch.float32, "ieee", False)) == 1
        finally:
            del os.environ[AUTOTUNE_ENV]


# ------------------------------------------------------------------------------ convergence
def _train_lenet5(backend_name, init_state, data, steps, monkeypatch):
    """Adam on SGVLB (β = 1) from ``init_state``; the loss per step and, at the end, the
    sparsity of each conv layer."""
    monkeypatch.setenv("SPARSEVD_BACKEND", backend_name)
    model = sparsevd.models.LeNet5(svd=True).to(DEVICE)
    model.load_state_dict(init_state)
    losses, _ = train_sgvlb(model, *data, steps, batch=2, noise_seed=7)
    convs = [m for m in model.modules() if isinstance(m, sparsevd.nn.Conv2dSVDO)]
    return losses, torch.tensor([m.sparsity for m in convs])


def test_lenet5_training_matches_reference(monkeypatch):
    """LeNet-5-Caffe trained from the same init, data and noise seeds with the Triton backend (in
    the interpreter here, batch 2) and with the reference backend: the same loss curve and conv
    sparsity within noise. Random data; the KL (train_size 10⁴) moves the loss by orders of
    magnitude within the run, so a wrong gradient anywhere shows in the curve."""
    steps = 20
    model = sparsevd.models.LeNet5(svd=True)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    xs = torch.randn(48, 1, 28, 28, device=DEVICE)
    ys = torch.randint(0, 10, (48,), device=DEVICE)
    loss_t, sp_t = _train_lenet5("triton", init, (xs, ys), steps, monkeypatch)
    loss_r, sp_r = _train_lenet5("reference", init, (xs, ys), steps, monkeypatch)
    assert loss_r[-1] < 0.5 * loss_r[0], f"the run should move the loss ({loss_r.tolist()}); too weak"
    assert_close(loss_t, loss_r, rtol=1e-2, atol=0.0, name="loss curve")
    assert_close(sp_t, sp_r, rtol=0.0, atol=0.02, name="conv sparsity")


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not CUDA, reason="bf16/fp16 dots and the autotuned configs need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(16, 64, (16, 16), 64, 3, 1), (8, 32, (9, 7), 32, 3, 32)])
def test_autocast_low_precision_gpu(dtype, layout, shape):
    """Under autocast (x in bf16/fp16, fp32 parameters): y in x's dtype, std and parameter
    gradients in fp32; error at most 2× that of PyTorch doing the same math in that precision
    plus a small floor (flash-attention's rule)."""
    n, c_in, hw, c_out, k, groups = shape
    x, w, ls2, b = make_conv(n, c_in, hw, c_out, k, groups)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=CL)
    args = op_args(w, 1, 1, 1, groups)
    seed = draw_seed(DEVICE)
    leaves = [t.detach().requires_grad_() for t in (x, w, ls2, b)]
    with torch.autocast("cuda", dtype=dtype):
        y, std = OP(*leaves, seed, *args)
        g = torch.randn(y.shape, device="cuda").to(dtype)
        y.backward(g)
    y_ref, grads_ref = oracle(x, w, ls2, b, seed, g, args)
    noise = lrt_noise(seed, y.shape, device="cuda")
    pt = [t.detach().requires_grad_() for t in (x, w, ls2, b)]
    with torch.autocast("cuda", dtype=dtype):  # PyTorch's autocast version of the math
        y_pt = naive_lrt_conv2d(*pt, None, [1, 1], [1, 1], [1, 1], groups, noise=noise.to(dtype))[0]
        y_pt.backward(g)
    assert y.dtype == dtype and std.dtype == torch.float32
    assert all(t.grad.dtype == torch.float32 for t in leaves[1:])
    for name, a, e, p in zip(("y", "grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"),
                             [y] + [t.grad for t in leaves], [y_ref] + grads_ref,
                             [y_pt] + [t.grad for t in pt]):
        err = (a.double() - e).abs().max().item()
        err_pt = (p.double() - e).abs().max().item()
        assert err <= 2.0 * err_pt + 1e-3 * e.abs().max().item(), (name, err, err_pt)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("c,hw", [(64, 32), (128, 16), (256, 8), (512, 4)])
def test_vgg_layers_gpu(c, hw):
    """The benchmark's VGG-like layers (3x3, padding 1) at batch 32, fp32, split weight gradients
    included."""
    x, w, ls2, b = make_conv(32, c, (hw, hw), c, 3)
    run_and_compare(x, w, ls2, b, op_args(w, 1, 1, 1, 1),
                    rtol=1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4)


# ------------------------------------------------------------------- GPU compile, without a GPU
_AOT = """
from sparsevd.triton_kernels import lrt_conv2d as KC

tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)
direct = dict(BLOCK_M=64, BLOCK_C=16)
f32 = dict(clip_threshold="fp32")
# (x, g_s2, precision, fp64, reduction order taps-outer, CLIP): every kind of dot (fp32 FMA,
# bf16, fp16 with TF32 variance products, fp64), both orders and the CLIP variant.
variants = [("fp32", "fp32", "ieee", False, False, False), ("bf16", "bf16", "ieee", False, True, True),
            ("fp16", "fp32", "tf32", False, False, False), ("fp64", "fp64", "ieee", True, False, False)]
for x, v, prec, f64, taps, clip in variants:
    w = "fp64" if f64 else "fp32"
    build(KC.lrt_conv2d_fwd_kernel,
          dict(x_ptr="*" + x, w_ptr="*" + w, ls2_ptr="*" + w, b_ptr="*" + w, seed_ptr="*i64",
               y_ptr="*" + x, std_ptr="*" + w, **f32),
          dict(HAS_BIAS=True, ACC_F64=f64, VAR_LOWP=x == "bf16", TAPS_OUTER=taps, CLIP=clip,
               PRECISION=prec, **tiles), 4, 2)
    build(KC.lrt_conv2d_bwd_kernel,
          dict(g_ptr="*" + x, gs2_ptr="*" + v, x_ptr="*" + x, w_ptr="*" + w, ls2_ptr="*" + w,
               gx_ptr="*" + x, pw_ptr="*" + w, pl_ptr="*" + w, pb_ptr="*" + w, **f32),
          dict(ACC_F64=f64, WITH_DX=True, TAPS_OUTER_X=taps, TAPS_OUTER_G=taps, CLIP=clip,
               PRECISION=prec, **tiles), 4, 2)
for x, f64, clip in [("bf16", False, True), ("fp64", True, False)]:  # no dots: bf16; fp64 forward
    w = v = "fp64" if f64 else "fp32"
    v = "bf16" if x == "bf16" else v
    build(KC.lrt_conv2d_direct_fwd_kernel,
          dict(x_ptr="*" + x, w_ptr="*" + w, ls2_ptr="*" + w, b_ptr="*" + w, seed_ptr="*i64",
               y_ptr="*" + x, std_ptr="*" + w, **f32),
          dict(HAS_BIAS=True, ACC_F64=f64, CLIP=clip, **direct), 4, 2)
    if f64:  # the other kernels without dots have no fp64-specific code
        continue
    build(KC.lrt_conv2d_direct_bwd_kernel,
          dict(g_ptr="*" + x, gs2_ptr="*" + v, x_ptr="*" + x, w_ptr="*" + w, ls2_ptr="*" + w,
               gx_ptr="*" + x, pw_ptr="*" + w, pl_ptr="*" + w, pb_ptr="*" + w, **f32),
          dict(ACC_F64=f64, WITH_DX=True, CLIP=clip, **direct), 4, 2)
    build(KC.lrt_conv2d_bwd_gs2_kernel,
          dict(g_ptr="*" + x, std_ptr="*" + w, seed_ptr="*i64", gs2_ptr="*" + v),
          dict(ACC_F64=f64, BLOCK_P=64, BLOCK_C=32), 8, 2)
    build(KC.lrt_conv2d_bwd_reduce_kernel,
          dict(pw_ptr="*" + w, pl_ptr="*" + w, pb_ptr="*" + w, gw_ptr="*" + w, gl_ptr="*" + w,
               gb_ptr="*" + w),
          dict(ACC_F64=f64, BLOCK=1024), 4, 2)
"""
triton_aot.register("lrt_conv2d", _AOT)


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run the kernels")
def test_conv_kernels_compile_for_gpu_without_a_gpu():
    """Every conv kernel lowers to a cubin for sm_90 (tests/triton_aot.py), the GEMM kernels for
    every kind of dot (fp32 FMA, bf16, fp16 with TF32 variance products, fp64; both reduction
    orders; the CLIP variant), the others in a low-precision and an fp64 variant (small tiles)."""
    assert triton_aot.compiled_for_gpu("lrt_conv2d") == 13
