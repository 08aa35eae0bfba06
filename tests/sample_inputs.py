"""The sample inputs of every op family, in one place: the shape cases and the builders of their
tensors, shared by the tests of every backend and device (tests/test_<family>.py runs each case on
each backend against the family's naive math; tests/test_<family>_<backend>.py adds the cases
particular to a backend's kernels, named here too). Seeds come from
:func:`sparsevd.ops.noise.draw_seed` (tests seed torch per test, conftest.py).
"""
import math

import torch
from conftest import assert_close

from sparsevd.ops import weights as W
from sparsevd.ops.csr_linear.format import to_csr
from sparsevd.ops.kl import naive_kl_sparse_vd

F64 = torch.float64


# ------------------------------------------------------------------------------------- linear
#: (leading dims of x, in_features, out_features, bias, contiguous x)
LINEAR_CASES = [
    ((5,), 7, 4, True, True),
    ((1,), 1, 1, True, True),
    ((33,), 123, 17, False, True),
    ((2, 3), 16, 9, True, True),
    ((4, 5), 11, 3, False, False),
    ((6,), 10, 8, True, False),
]
#: Linear shapes at the boundaries of the native CPU kernels (test_lrt_linear_native.py): (leading
#: dims of x, in_features, out_features), each run with and without bias and contiguity.
LINEAR_BOUNDARY_CASES = [
    ((1,), 1, 1),
    ((37,), 129, 65),          # primes, just over 8/16/64-element vectors
    ((2, 3, 5), 17, 33),       # 3-D input
    ((9,), 65, 17),
    ((3,), 16, 481),           # output rows longer than a noise chunk (480)
    ((70,), 31, 300),          # M·N > the parallel grain, rows cross chunks
]


#: Ranges of ξ (numel, first index) for the generators (test_noise.py): block tails, the 2^32 wrap
#: of the counter, a multi-chunk range.
NOISE_RANGES = [
    (1, 0), (15, 3), (47, 0), (48, 1), (49, 2**31), (97, 2**32 - 50), (1000, 2**32 - 1),
    (4099, 2**32 - 4000), (4099, 2**32 - 50), (100_003, 0), (33, 2**32 + 5),
]


def linear_inputs(lead, k, n, dtype=torch.float32, with_bias=True, contiguous=True, device="cpu"):
    """x (*lead, k) (a strided, misaligned view when not ``contiguous``), θ ~ N(0, 1/k), log σ² ~ N(−3, 1)
    (σ² well away from 0, so the variance path matters), b ~ N(0, 1) or None."""
    if contiguous:
        x = torch.randn(*lead, k, dtype=dtype, device=device)
    else:
        # a strided view that also starts one element in (a misaligned data pointer)
        x = torch.randn(*lead, 2 * k + 1, dtype=dtype, device=device)[..., 1::2]
        if len(lead) > 1:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert k == 1 or not x.is_contiguous()  # a single column is contiguous
    w = torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(max(k, 1))
    ls2 = torch.randn(n, k, dtype=dtype, device=device) - 3
    b = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    return x, w, ls2, b


def op_noise(shape, seed, op: str = "lrt_linear") -> torch.Tensor:
    """ξ of an LRT output of ``shape`` exactly as the current backend's kernels of ``op`` draw it
    ("lrt_linear": (*, N); "lrt_conv2d": (N, C, H, W)): the op on x = 1 with a unit kernel,
    θ = 0, log σ² = 0 and no bias gives y = sqrt(1 + 1e-8)·ξ, which is ξ in fp32. Returned in
    fp64. (:func:`sparsevd.ops.noise.lrt_noise` is the same ξ computed outside the kernels.)"""
    shape = tuple(int(s) for s in shape)
    dev = seed.device
    if op == "lrt_linear":
        from sparsevd.ops.lrt_linear import lrt_linear

        z = torch.zeros(shape[-1], 1, device=dev)
        y, _ = lrt_linear(torch.ones(*shape[:-1], 1, device=dev), z, z, None, seed)
    else:
        from sparsevd.ops.lrt_conv2d import lrt_conv2d

        n, c, h, w = shape
        z = torch.zeros(c, 1, 1, 1, device=dev)
        y, _ = lrt_conv2d(torch.ones(n, 1, h, w, device=dev), z, z, None, seed, [1, 1], [0, 0], [1, 1], 1)
    return y.to(F64)


def clip_case(w, ls2, dead_rows=(), dead_cols=()):
    """Make ``ls2`` (in place) a train-time clipping case and return its ``clip_threshold``:
    the output rows ``dead_rows`` and input columns ``dead_cols`` (dim 1 of θ) get log σ² = 8, or
    log(θ² + 1e-8) + 10 where that is larger (|θ| > e⁻¹), so that log α clamps to 10 there: every
    weight there dropped), every other weight log α <= 9, and the threshold is the midpoint of the
    widest gap between neighbouring log α values in the middle of their range, so that about half
    the other weights are dropped and no weight sits within rounding of the threshold (with a single
    other weight, a threshold halfway between its log α and 10: it is kept)."""
    with torch.no_grad():
        # every other weight gets log α <= 9 (a θ within ~1e-3 of 0 may draw more): none of them
        # may look dead, or a case with few live weights could have none
        ls2.copy_(torch.minimum(ls2, (torch.log(w * w + 1e-8) + 9.0).to(ls2.dtype)))
        dead = torch.clamp(torch.log(w * w + 1e-8) + 10.0, min=8.0).to(ls2.dtype)
        for r in dead_rows:
            ls2[r] = dead[r]
        for c in dead_cols:
            ls2[:, c] = dead[:, c]
        la = W.log_alpha(w.double(), ls2.double()).flatten()
        la = la[la < 9.5].sort().values
        if la.numel() == 1:  # halfway to the dead weights' 10, not la + 1: la is 9 when capped
            return (float(la[0]) + 10.0) / 2
        if la.numel() < 2:
            return 0.0
        lo, hi = int(0.3 * (la.numel() - 1)), max(int(0.7 * (la.numel() - 1)), 1)
        gaps = la[lo + 1:hi + 1] - la[lo:hi]
        i = lo + int(gaps.argmax()) if gaps.numel() else 0
        return float((la[i] + la[min(i + 1, la.numel() - 1)]) / 2)


#: Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages; GROUP_M = 2) of the Triton linear kernels in the
#: tests (fixture linear_small_tiles): small, so that small shapes span many tiles, K steps and tile
#: groups, and the clipping cases several weight tiles [BLOCK_N, BLOCK_K] of θ.
LINEAR_SMALL_TILES = (16, 32, 32, 4, 1)
#: (M, K, N) against LINEAR_SMALL_TILES (test_lrt_linear_triton.py).
LINEAR_TILE_CASES = [
    (1, 1, 1),
    (37, 129, 65),  # primes and odd sizes: every tile masked
    (16, 32, 32),  # exactly one tile
    (15, 31, 31),  # just under the tile sizes
    (17, 33, 33),  # just over
    (48, 95, 97),  # three row tiles (two groups), K just under three steps, N just over three tiles
    (3, 100, 7),  # a K loop of four steps, tiny output
]
#: Linear clipping cases with whole dead weight tiles at LINEAR_SMALL_TILES: (lead, in_features,
#: out_features, dead output rows, dead input columns), as ``clip_case`` takes them.
CLIP_TILE_CASES = [
    # a dead row block (the last, partial block [64, 70) too) and a dead column block
    ((40,), 100, 70, tuple(range(32, 70)), tuple(range(0, 32))),
    # the second of two K steps dead (forward, ∂x), 3-D input
    ((2, 9), 64, 64, (), tuple(range(32, 64))),
    # the first row block dead, K just over one tile
    ((17,), 33, 40, tuple(range(32)), ()),
]


#: Train-time clipping of the linear layer on every backend (test_lrt_linear.py): (lead,
#: in_features, out_features, dead output rows, dead input columns).
LINEAR_CLIP_CASES = [
    ((5,), 7, 4, (), ()),
    ((33,), 123, 17, (0, 5, 16), (1, 2, 64, 122)),
    ((2, 3), 16, 9, (3,), (0,)),
    ((9,), 40, 20, tuple(range(0, 20, 2)), tuple(range(1, 40, 3))),
] + CLIP_TILE_CASES  # whole dead weight tiles at LINEAR_SMALL_TILES


def dead_tiles(mask: torch.Tensor, block_n: int, block_k: int) -> int:
    """The number of [block_n, block_k] tiles of the (N, K) keep-mask with no kept weight."""
    n, k = mask.shape
    tn, tk = -(-n // block_n), -(-k // block_k)
    padded = torch.zeros(tn * block_n, tk * block_k, dtype=torch.bool, device=mask.device)
    padded[:n, :k] = mask.bool()
    live = padded.view(tn, block_n, tk, block_k).any(3).any(1)
    return int((~live).sum())


#: Train-time clipping of the linear layer by structure, for the backends that compact what is
#: dead (test_lrt_linear_native.py): (lead, in_features, out_features, dead output rows, dead input columns).
CLIP_STRUCTURE_CASES = [
    ((5,), 7, 4, (), ()),                                              # no whole row or column dead
    ((33,), 123, 17, (0, 5, 16), (1, 2, 64, 122)),                     # dead rows and columns
    ((9,), 40, 20, tuple(range(0, 20, 2)), tuple(range(1, 40, 3))),    # half the rows, a third of the columns
    ((70,), 31, 300, tuple(range(0, 300, 3)), ()),                     # dead rows only; M·N > a parallel grain
    ((2, 3), 50, 6, (), tuple(range(0, 50, 2))),                       # dead columns only, 3-D x
    ((4,), 16, 9, tuple(range(1, 9)), tuple(range(1, 16))),            # one row and one column alive
]


# --------------------------------------------------------------------------------------- conv
#: (N, C_in, H, W), (C_out, kH, kW), stride, padding, dilation, groups
CONV_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1),
    ((2, 3, 8, 7), (5, 3, 3), 2, 1, 1, 1),
    ((1, 2, 9, 10), (3, 2, 3), 1, 2, 2, 1),
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((3, 4, 5, 5), (4, 3, 3), 1, 1, 1, 4),
    ((1, 1, 4, 4), (1, 1, 1), 1, 0, 1, 1),
]
#: Conv shapes particular to the native CPU kernels (test_lrt_conv2d_native.py), as CONV_CASES.
CONV_BOUNDARY_CASES = [
    ((3, 6, 9, 9), (6, 3, 3), 1, 1, 1, 6),     # depthwise
    ((2, 5, 23, 23), (17, 5, 5), 1, 0, 1, 1),  # planes 19x19, C_out prime
]


#: Train-time clipping of conv2d on every backend (test_lrt_conv2d.py): x shape, (C_out, kH, kW),
#: stride, padding, dilation, groups, dead output channels, dead input channels (dim 1 of θ).
CONV_CLIP_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1, (), ()),
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2, (0, 5), (1,)),
    ((3, 4, 5, 5), (4, 3, 3), 1, 1, 1, 4, (2,), ()),
    ((1, 5, 6, 6), (7, 3, 3), 1, 1, 1, 1, (1, 2, 6), (0, 3)),
]
#: Train-time clipping of conv2d by structure (test_lrt_conv2d_native.py): x shape, (C_out, kH, kW), stride,
#: padding, dilation, groups, dead output channels, dead input channels (dim 1 of θ).
CLIP_CONV_STRUCTURE_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0, 1, 1, (), ()),
    ((1, 5, 6, 6), (7, 3, 3), 1, 1, 1, 1, (1, 2, 6), (0, 3)),
    ((2, 6, 9, 8), (8, 3, 3), 2, 1, 1, 1, tuple(range(7)), (1, 2, 3, 4, 5)),  # one channel of each alive
    ((2, 4, 8, 9), (6, 3, 2), (2, 1), (1, 0), (1, 2), 2, (0, 5), (1,)),       # groups = 2
    ((2, 4, 8, 8), (5, 2, 2), 1, (0, 1, 0, 1), 1, 1, (2,), (1,)),            # per-side padding ("same")
]


def conv_inputs(xs, ws, groups, dtype=torch.float32, with_bias=True, contiguous=True, device="cpu"):
    """x (N, C_in, H, W) (a strided view when not ``contiguous``), θ ~ N(0, 1/fan_in),
    log σ² ~ N(−3, 1), b ~ N(0, 1) or None."""
    n, c, h, wd = xs
    co, kh, kw = ws
    x = torch.randn(n, c, h, wd, dtype=dtype, device=device)
    if not contiguous:
        x = torch.randn(n, c, h, 2 * wd, dtype=dtype, device=device)[..., 1::2]
        assert not x.is_contiguous()
    fan_in = c // groups * kh * kw
    w = torch.randn(co, c // groups, kh, kw, dtype=dtype, device=device) / math.sqrt(fan_in)
    ls2 = torch.randn(co, c // groups, kh, kw, dtype=dtype, device=device) - 3
    b = torch.randn(co, dtype=dtype, device=device) if with_bias else None
    return x, w, ls2, b


#: Tiles of the Triton conv kernels in the odd-shape tests (test_lrt_conv2d_triton.py, fixture small_tiles):
#: implicit GEMM (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages; GROUP_M = 2) and direct (BLOCK_M,
#: BLOCK_C, warps).
CONV_SMALL_TILES = (16, 16, 16, 4, 1)
CONV_SMALL_DIRECT_TILES = (16, 4, 4)
#: (N, C_in, (H, W), C_out, kernel, stride, padding, dilation, groups) against CONV_SMALL_TILES:
#: the implicit-GEMM kernels, then the direct ones.
CONV_TILE_CASES = [
    (1, 1, (1, 1), 1, 1, 1, 0, 1, 1),  # everything 1
    (2, 17, (5, 3), 17, 3, 1, 1, 1, 1),  # channels just over a tile; K = 153: ten K steps
    (1, 3, (13, 11), 19, (3, 2), 2, (1, 0), 1, 1),  # primes, M = 42 (three row tiles, two groups)
    (3, 5, (4, 4), 33, 1, 1, 0, 1, 1),  # 1x1 conv, C_out just over two tiles
    (2, 6, (9, 7), 4, (2, 3), 3, 2, 2, 2),  # stride 3 (9 phases) with dilation 2, groups 2
]
CONV_DIRECT_TILE_CASES = [
    (1, 5, (7, 6), 5, 3, 1, 1, 1, 5),  # depthwise
    (1, 3, (6, 5), 6, 3, 2, 1, 2, 3),  # channel multiplier 2, stride 2, dilation 2
    (2, 17, (4, 3), 17, (1, 3), 1, (0, 1), 1, 17),  # channels just over 4 tiles of 4
]



#: Every convolution option, fp64 (test_lrt_conv2d_triton.py): name -> (N, C_in, (H, W), C_out,
#: kernel, stride, padding, dilation, groups, layout: None, "x" channels_last, "both" x and θ
#: channels_last, "sliced" a strided view of x).
CONV_OPTION_CASES = {
    "stride_pair": (2, 3, (7, 8), 4, 3, (2, 3), 1, 1, 1, None),
    "padding_int": (1, 2, (5, 5), 3, 3, 1, 2, 1, 1, None),
    "padding_pair": (1, 2, (5, 6), 3, 3, 1, (2, 0), 1, 1, None),
    "same_odd": (2, 3, (6, 5), 4, 3, 1, "same", 1, 1, None),
    "same_even_dilated": (1, 3, (6, 7), 2, (2, 4), 1, "same", (1, 2), 1, None),
    "same_even_depthwise": (1, 4, (5, 6), 4, 2, 1, "same", 1, 4, None),
    "valid": (2, 2, (5, 4), 3, 2, 1, "valid", 1, 1, None),
    "dilation": (1, 2, (9, 8), 3, 3, 1, 1, (2, 3), 1, None),
    "groups": (2, 6, (5, 5), 9, 3, 1, 1, 1, 3, None),
    "depthwise": (2, 4, (6, 6), 4, 3, 2, 1, 1, 4, None),
    "channels_last": (2, 4, (5, 6), 5, 3, 1, 1, 1, 1, "x"),
    "channels_last_model": (2, 4, (5, 6), 5, 3, 2, 1, 1, 1, "both"),
    "channels_last_depthwise": (1, 3, (5, 4), 6, 3, 1, 1, 1, 3, "both"),
    "sliced_input": (2, 3, (6, 5), 4, 3, 1, 1, 1, 1, "sliced"),
    "batch_1": (1, 3, (4, 4), 2, 3, 1, 1, 1, 1, None),
}


#: Conv1d: (N, C_in, L), (C_out, k), stride, padding, dilation, groups
CONV1D_CASES = [
    ((2, 3, 11), (4, 3), 1, 0, 1, 1),
    ((3, 4, 16), (6, 4), 1, "same", 2, 2),
    ((1, 5, 9), (5, 3), 2, 1, 1, 5),
    ((2, 2, 7), (3, 1), 1, "valid", 1, 1),
]


def conv1d_inputs(xs, ws, groups, dtype=torch.float32, with_bias=True, contiguous=True,
                  device="cpu"):
    """x (N, C_in, L), θ (C_out, C_in/groups, k), log σ², b as :func:`conv_inputs` draws them."""
    n, c, length = xs
    co, k = ws
    x, w, ls2, b = conv_inputs((n, c, 1, length), (co, 1, k), groups, dtype, with_bias,
                               contiguous, device)
    return x.squeeze(2), w.squeeze(2), ls2.squeeze(2), b


def as_list(v):
    """An int or pair as the [a, b] list the conv ops take."""
    return [v, v] if isinstance(v, int) else list(v)


# ----------------------------------------------------------------------------------------- KL
#: Layer shapes of the KL tests: LeNet-300-100's, a conv weight, single weights, partial blocks and
#: vectors (of the kernels' 16-lane vectors, blocks of 256 or 1024).
KL_SHAPES = [(300, 784), (100, 300), (10, 100), (1,), (7, 3, 5, 5), (129,), (256,)]


#: Layers that span several blocks of 256 weights and end in a partial one, and an empty one
#: (test_kl_triton.py, fixture small_blocks).
KL_BLOCK_CASES = [(17, 31), (256,), (3, 100), (0, 5), (1,), (40, 13)]


def kl_layer(shape, dtype=torch.float32, spread=8.0, device="cpu"):
    """θ ~ N(0, 0.1²) with some exact zeros and tiny values; log σ² ~ U(−spread − 8, spread − 8),
    so that log α covers both clamps (−10 and 10) and the inside."""
    w = 0.1 * torch.randn(shape, dtype=dtype, device=device)
    if w.numel() > 4:
        w.view(-1)[:2] = 0.0
        w.view(-1)[2:4] = 1e-6
    ls2 = torch.empty(shape, dtype=dtype, device=device).uniform_(-spread - 8.0, spread - 8.0)
    return w, ls2


def kl_params(shape, dtype=F64, device="cpu"):
    """θ and log σ² with log α spread over (−12, 12) but away from the clamp edges ±10 (for
    gradcheck, which needs a differentiable neighbourhood)."""
    w = torch.randn(shape, dtype=F64)
    w = torch.where(w < 0, w - 0.1, w + 0.1)
    la = torch.empty(shape, dtype=F64).uniform_(-12, 12)
    la = torch.where((la.abs() - 10).abs() < 0.05, la * 0.9, la)
    return w.to(device, dtype), (la + torch.log(w * w + 1e-8)).to(device, dtype)


#: Thresholds of the kept-count tests (the KL op's by-product, ``kl_sparse_vd_kept``): the paper's
#: 3, others inside the clamp, and at and beyond its edges (log α = ±10 is then kept or dropped as
#: a whole band).
KEPT_THRESHOLDS = [3.0, -2.0, 0.5, 9.95, 10.0, 10.5, -10.0]


def kept_layer(shape, threshold, dtype=torch.float32, device="cpu"):
    """θ and log σ² whose log α spreads around ``threshold``: most within ±4 of it, a quarter
    within ±0.15 (the band where the native fp32 KL computes log α instead of bracketing it), a
    few beyond the clamp (raw log α ±20: log α = ±10 exactly). No weight's log α lies within 1e-4
    of the threshold (where the kernels' log and torch's, both within an ulp, may fall on either
    side), except exact ties: where θ = ±1 (θ² + 1e-8 = 1 in fp32, log α = log σ² exactly), some
    log σ² equal the threshold (dropped) or lie one step below it (kept; a threshold of 0 would
    make that step a subnormal, which the native kernels flush to 0)."""
    n = math.prod(shape)
    w = torch.randn(n, dtype=F64) * 0.3
    u = torch.empty(n, dtype=F64).uniform_(-4, 4)
    near = torch.rand(n) < 0.25
    u[near] = torch.empty(int(near.sum()), dtype=F64).uniform_(-0.15, 0.15)
    u = u + torch.where(u < 0, -2e-4, 2e-4)  # |u| ≥ 2e-4
    la = torch.clamp(threshold + u, -11.0, 11.0)  # beyond ±10 for thresholds at the edges
    if n > 8:
        la[3:5] = torch.tensor([20.0, -20.0], dtype=F64)
    ls2 = (la + torch.log(w * w + 1e-8)).to(dtype)
    w = w.to(dtype)
    raw = ls2.double() - torch.log(w.double() ** 2 + 1e-8)
    ls2[(raw - threshold).abs() < 1e-4] += 0.01  # clear of the ulp ties the roundings made
    if n > 8 and dtype == torch.float32:
        thr = torch.tensor(threshold, dtype=dtype)
        w[5:8] = torch.tensor([1.0, -1.0, 1.0], dtype=dtype)
        ls2[5:8] = torch.stack([thr, thr, torch.nextafter(thr, torch.tensor(-math.inf, dtype=dtype))])
    return w.reshape(shape).to(device), ls2.reshape(shape).to(device)


def nonfinite_kept_layer(dtype=torch.float32, device="cpu"):
    """A (5, 40) layer whose finite weights are all dropped at threshold 0 (log α = 8), with θ NaN,
    ±inf and 1e20 (θ² = inf in fp32), log σ² NaN, ±inf and 100 (e^{log σ²} = inf in fp32):
    the non-finite rule of the kept count (:func:`sparsevd.ops.kl.naive.naive_kept_mask`)."""
    w = torch.randn(5, 40, dtype=dtype)
    ls2 = 8.0 + torch.log(w * w + 1e-8)
    w[0, 7], w[0, 9], w[2, 0], w[2, 39] = math.nan, math.inf, -math.inf, 1e20
    ls2[1, 2], ls2[3, 4], ls2[3, 5], ls2[4, 20] = math.nan, math.inf, -math.inf, 100.0
    return w.to(device), ls2.to(device)


def kl_reference(weights, log_sigma2s):
    """fp64 KL and gradients of the naive math by autograd (the clamp masks the gradient).

    Which weights sit inside the clamp (−10 < raw log α < 10) is decided in the parameters' own
    dtype, as the backends decide it: a raw log α within an fp32 rounding of ±10 falls on either
    side, and the gradient there jumps from its full value to 0."""
    total, gws, gls = torch.zeros((), dtype=F64, device=weights[0].device), [], []
    for w, s in zip(weights, log_sigma2s):
        w64 = w.detach().to(F64).requires_grad_()
        s64 = s.detach().to(F64).requires_grad_()
        kl = naive_kl_sparse_vd([w64], [s64], False)[0]
        gw, gs = torch.autograd.grad(kl, (w64, s64))
        raw = (s.detach() - torch.log(w.detach() * w.detach() + W.EPS_THETA))
        raw64 = s64.detach() - torch.log(w64.detach() ** 2 + W.EPS_THETA)
        inside = (raw > -W.LOG_ALPHA_CLAMP) & (raw < W.LOG_ALPHA_CLAMP)
        inside64 = (raw64 > -W.LOG_ALPHA_CLAMP) & (raw64 < W.LOG_ALPHA_CLAMP)
        if not torch.equal(inside, inside64):  # recompute the gradient on the dtype's side
            la = torch.clamp(raw64, -W.LOG_ALPHA_CLAMP, W.LOG_ALPHA_CLAMP)
            z = W.K2 + W.K3 * la
            dla = -(W.K1 * W.K3 * torch.sigmoid(z) * torch.sigmoid(-z) + 0.5 * torch.sigmoid(-la))
            dla = dla * inside.to(F64)
            gs = dla
            gw = dla * (-2.0 * w64.detach() / (w64.detach() ** 2 + W.EPS_THETA))
        total = total + kl.detach()
        gws.append(gw)
        gls.append(gs)
    return total, gws, gls


def check_kl(kl, grads_w, grads_l, weights, log_sigma2s, rtol=1e-4):
    kl_ref, gws_ref, gls_ref = kl_reference(weights, log_sigma2s)
    assert kl.dim() == 0 and kl.dtype == torch.promote_types(weights[0].dtype, torch.float32)
    assert_close(kl, kl_ref, rtol=rtol, atol=0.0, name="kl")
    for i, (a, e, t) in enumerate(zip(grads_w, gws_ref, weights)):
        assert a.shape == t.shape and a.dtype == t.dtype and a.stride() == torch.empty_like(t).stride()
        assert_close(a, e, rtol=rtol, atol=rtol * 1e-2 * amax(e) + 1e-7, name=f"grad_weight[{i}]")
    for i, (a, e) in enumerate(zip(grads_l, gls_ref)):
        assert_close(a, e, rtol=rtol, atol=1e-7, name=f"grad_log_sigma2[{i}]")


def amax(t) -> float:
    """max |t| (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


# --------------------------------------------------------------------------------- csr_linear
#: (out_features, in_features, density, empty rows) of the CSR weights every implementation runs
#: (tests/test_csr_linear.py), with their ids.
CSR_CASES = [(1, 1, 1.0, 0), (37, 123, 0.1, 5), (123, 300, 0.05, 40), (64, 257, 0.0, 0), (33, 70, 1.0, 0),
             (300, 784, 0.3, 3), (1024, 4096, 0.02, 0)]
CSR_CASE_IDS = ["1x1", "sparse", "empty_rows", "all_zero", "fully_dense", "lenet_fc1", "4096_98pct"]
#: Batch sizes per device: the CPU kernels' tile widths, the CUDA kernels' warp and block widths.
CSR_BATCHES = {"cpu": (1, 7, 64), "cuda": (1, 3, 16, 64, 257)}
#: (rtol, atol) of csr_linear per dtype; fp16/bf16 accumulate in fp32 and round once.
CSR_TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10), torch.float16: (1e-2, 1e-2),
           torch.bfloat16: (2e-2, 2e-2)}


def csr_dtypes(backend, device):
    """The value dtypes csr_linear's tests run per (implementation, device): fp32 and fp64 on the
    CPU (fp16/bf16 there: test_half_precision), fp32/fp16/bf16 in the CUDA kernels, fp32 in
    torch.sparse on CUDA."""
    if device == "cpu":
        return (torch.float32, torch.float64)
    return (torch.float32, torch.float16, torch.bfloat16) if backend == "native" else (torch.float32,)


def csr_weight(n, k, density, dtype=torch.float32, empty_rows=0, device="cpu"):
    """W (n, k) with about ``density`` of its entries nonzero and ``empty_rows`` rows all zero
    (drawn on the CPU, then moved to ``device``)."""
    w = torch.randn(n, k, dtype=dtype) * (torch.rand(n, k) < density)
    if empty_rows:
        w[torch.randperm(n)[:empty_rows]] = 0
    return w.to(device)


def csr_of(w, col_dtype=None, crow_dtype=torch.int32):
    """(crow_indices, col_indices, values) of W (:func:`sparsevd.ops.csr_linear.format.to_csr`,
    column indices of ``col_dtype``, row pointers of ``crow_dtype``)."""
    crow, col, val = to_csr(w, col_dtype)
    return crow.to(crow_dtype), col, val


def dense_product(x, w, b=None):
    """F.linear(x, W, b) computed (and returned) in fp32, fp64 for fp64 inputs: what csr_linear
    computes (the zero-filled W, IEEE arithmetic) before rounding to x's dtype, the oracle of
    every implementation."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.nn.functional.linear(x.to(ct), w.to(ct), None if b is None else b.to(ct))


#: The non-finite values the deployed layers' tests put into inputs.
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def structured_weight(n, k, dtype=torch.float32, device="cpu"):
    """W (n, k) with three kinds of columns: unused (all zero), partial (zero in about half the
    rows) and full (nonzero in every row); returns W (drawn on the CPU, then moved to ``device``)
    and the three index sets (CPU)."""
    w = torch.randn(n, k, dtype=dtype)
    perm = torch.randperm(k)
    unused, partial, full = perm[: k // 4], perm[k // 4: k // 2], perm[k // 2:]
    w[:, unused] = 0
    drop = torch.zeros(n, k, dtype=torch.bool)
    drop[:, partial] = torch.rand(n, partial.numel()) < 0.5
    w[drop] = 0
    return w.to(device), {"unused": unused, "partial": partial, "full": full}


def inject_nonfinite(x, cols, where):
    """Rows 0, 2, ... of x (*, K) get 1-3 values from NaN, +inf, -inf at columns of kind ``where``
    (``"mixed"``: any kind); the other rows stay finite. Returns a new tensor."""
    x = x.clone()
    flat = x.view(-1, x.shape[-1])
    kinds = list(cols) if where == "mixed" else [where]
    for b in range(0, flat.shape[0], 2):
        for _ in range(int(torch.randint(1, 4, ()))):
            c = cols[kinds[int(torch.randint(len(kinds), ()))]]
            flat[b, c[int(torch.randint(c.numel(), ()))]] = NONFINITE[int(torch.randint(3, ()))]
    return x
