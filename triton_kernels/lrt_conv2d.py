"""Triton kernels of the LRT convolution (Molchanov, Ashukha, Vetrov, ICML 2017, sec. 4.2).

Forward (one kernel), per output pixel and channel::

    μ = conv(x, θ) + b,   s² = conv(x ⊙ x, σ²),   std = sqrt(s² + 1e-8),   y = μ + std ⊙ ξ

Backward (two kernels, three when the weight gradient is split), g = ∂L/∂y::

    g_s2 = g ⊙ ξ / (2·std)                                          (elementwise, ξ regenerated)
    ∂x = convᵀ(g, θ) + 2x ⊙ convᵀ(g_s2, σ²)                         (transposed convolutions)
    ∂θ = Σ_pixels g ⋆ x,   ∂log σ² = σ² ⊙ Σ_pixels g_s2 ⋆ (x ⊙ x),   ∂b = Σ_{n,h,w} g

ξ[n, c, h, w] = tl.randn(seed, ((n·C_out + c)·H_out + h)·W_out + w), the row-major index of the
output element taken modulo 2³² (bit for bit :func:`sparsevd.ops.noise.lrt_noise` of the output
shape, whatever the memory layout of y). x² and σ² = exp(log σ²) are formed in registers from the
loaded tiles of x and log σ², never stored.

Implicit GEMM (the ``*_kernel`` pair without ``direct``), per group g of ``groups``:

- forward: rows m = (n, oh, ow) of the output, columns the group's output channels, reduction over
  k = (ci, kh, kw) of the group's input channels and the taps; a tile of x is gathered from x
  through its four strides (zero outside the padding), so NCHW, channels_last and strided views
  are read in place. The order of k is channels-outer (ci, kh, kw), the memory order of a
  contiguous θ, or taps-outer (kh, kw, ci) when TAPS_OUTER, the order of channels_last x (each
  tile row then reads contiguous channels).
- ∂x: rows the input pixels, columns the group's input channels, reduction over
  j = (co, kh, kw) (taps-outer (kh, kw, co) when TAPS_OUTER_G: channels_last g). For stride s > 1 the input pixels are split into s_h·s_w phases
  ((ih + pad_h) mod s_h, (iw + pad_w) mod s_w); within a phase the output pixel of tap (kh, kw)
  is (q_h + u − t_h, q_w + v − t_w) with u, v the pixel's coordinates in the phase, so the gather
  offsets stay a sum of a row part and a column part; taps with kh·dil_h ≢ ρ_h (mod s_h) are
  masked.
- ∂θ, ∂log σ²: tiles [C_out of the group, k], reduction over the output pixels, optionally split
  into chunks whose partial sums a third kernel adds (deterministic, no atomics).

Direct convolution (``*_direct_*``), for C_in / groups = 1 (depthwise, with any channel
multiplier): elementwise products per tap on [pixels, channels] tiles, no dots.

Masked weights (train_clip): with CLIP, weights whose log α = clamp(log σ² − log(θ² + 1e-8),
−10, 10) is ≥ ``clip_threshold`` are zeroed in registers in both the mean and the variance, and
their gradients are zero (the ops' ``clip_threshold``).

Accumulation in fp32 (fp64 when ACC_F64); dot inputs of the mean in x's dtype, of the variance in
bf16 for bf16 x (VAR_LOWP / the dtype of g_s2), else fp32 (fp16 would underflow σ² ≈ e⁻¹⁰).
Pixel indices are int32 (the launcher checks that N·H·W and N·H_out·W_out fit); every memory
offset is int64. No @triton.jit helper is called inside the loops (docs/design.md,
"Interpreter-safe kernels").

Launchers and autotuning: :mod:`sparsevd.ops.lrt_conv2d.triton`.
"""
import triton
import triton.language as tl

#: Added to the LRT variance before the square root (sparsevd.reference.EPS_VAR).
EPS_VAR = tl.constexpr(1e-8)
#: log α = clamp(log σ² − log(θ² + EPS_THETA), −LA_CLAMP, LA_CLAMP) (sparsevd.reference).
EPS_THETA = tl.constexpr(1e-8)
LA_CLAMP = tl.constexpr(10.0)


@triton.jit
def lrt_conv2d_fwd_kernel(
    x_ptr, w_ptr, ls2_ptr, b_ptr, seed_ptr, y_ptr, std_ptr,
    M, C_OUT, CIN_G, COUT_G, K, H, W, H_OUT, W_OUT, KH, KW,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_lo, stride_li, stride_lh, stride_lw, stride_b,
    stride_yn, stride_yc, stride_yh, stride_yw,
    clip_threshold,
    M_KEY,  # autotune key only: next power of two of M
    HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, VAR_LOWP: tl.constexpr,
    TAPS_OUTER: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of the LRT convolution forward, implicit GEMM.

    Rows m = (n, oh, ow) of the M = N·H_out·W_out output pixels, columns the output channels
    co of group program_id(1); μ = Σ_k x[n, ci, oh·s_h − p_h + kh·d_h, ow·s_w − p_w + kw·d_w]·θ[co, k]
    and s² = Σ_k x²·exp(log σ²[co, k]) over k = (ci, kh, kw), K = C_in/groups·kH·kW, from the same
    gathered tile of x; then y = μ + b + sqrt(s² + 1e-8)·ξ. y and std share their strides.
    Grid: (cdiv(M, BLOCK_M)·cdiv(C_out/groups, BLOCK_N), groups).
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    XDT = x_ptr.dtype.element_ty

    pid = tl.program_id(0)
    grp = tl.program_id(1)
    n_tm = tl.cdiv(M, BLOCK_M)
    n_tn = tl.cdiv(COUT_G, BLOCK_N)
    per_group = GROUP_M * n_tn
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_tm - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixels
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels in the group
    m_m = o_m < M
    m_n = o_n < COUT_G
    hw_out = H_OUT * W_OUT
    o_b = o_m // hw_out
    o_p = o_m % hw_out
    o_oh = o_p // W_OUT
    o_ow = o_p % W_OUT
    o_ih = o_oh * conv_sh - pad_h  # [BLOCK_M] input row of tap (0, 0)
    o_iw = o_ow * conv_sw - pad_w
    # the tap offset d is inside the image iff lo <= d < hi (comparisons, no [BLOCK_M, BLOCK_K]
    # integer arithmetic: cheaper on the GPU, and not overflow-checked op by op in the interpreter)
    lo_h = pad_h - o_oh * conv_sh  # [BLOCK_M]
    hi_h = lo_h + H
    lo_w = pad_w - o_ow * conv_sw
    hi_w = lo_w + W
    o_co = grp * COUT_G + o_n  # [BLOCK_N]
    o_xm = (o_b.to(tl.int64) * stride_xn + o_ih.to(tl.int64) * stride_xh + o_iw.to(tl.int64) * stride_xw
            + (grp * CIN_G).to(tl.int64) * stride_xc)  # [BLOCK_M]
    o_wn = o_co.to(tl.int64) * stride_wo  # [BLOCK_N]
    o_ln = o_co.to(tl.int64) * stride_lo
    khw = KH * KW

    acc_mu = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)  # [BLOCK_M, BLOCK_N]
    acc_s2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] flattened (ci, kh, kw)
        m_k = o_k < K
        if TAPS_OUTER:
            o_r = o_k // CIN_G
            o_ci = o_k % CIN_G
        else:
            o_ci = o_k // khw
            o_r = o_k % khw
        o_kh = o_r // KW
        o_kw = o_r % KW
        o_dh = o_kh * dil_h
        o_dw = o_kw * dil_w
        o_xk = o_ci.to(tl.int64) * stride_xc + o_dh.to(tl.int64) * stride_xh + o_dw.to(tl.int64) * stride_xw
        m_x = ((m_m[:, None] & m_k[None, :]) & ((o_dh[None, :] >= lo_h[:, None]) & (o_dh[None, :] < hi_h[:, None]))
               & ((o_dw[None, :] >= lo_w[:, None]) & (o_dw[None, :] < hi_w[:, None])))  # [BLOCK_M, BLOCK_K]
        b_x = tl.load(x_ptr + (o_xm[:, None] + o_xk[None, :]), mask=m_x, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_K]
        o_wk = o_ci.to(tl.int64) * stride_wi + o_kh.to(tl.int64) * stride_wh + o_kw.to(tl.int64) * stride_ww
        o_lk = o_ci.to(tl.int64) * stride_li + o_kh.to(tl.int64) * stride_lh + o_kw.to(tl.int64) * stride_lw
        m_w = m_k[:, None] & m_n[None, :]
        b_w = tl.load(w_ptr + (o_wk[:, None] + o_wn[None, :]), mask=m_w, other=0.0).to(CDT)  # [BLOCK_K, BLOCK_N]
        b_l = tl.load(ls2_ptr + (o_lk[:, None] + o_ln[None, :]), mask=m_w, other=0.0).to(CDT)  # [BLOCK_K, BLOCK_N]
        b_s2 = tl.exp(b_l)
        if CLIP:
            b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
            b_keep = b_la < clip_threshold
            b_w = tl.where(b_keep, b_w, 0.0)
            b_s2 = tl.where(b_keep, b_s2, 0.0)
        b_x2 = b_x * b_x
        if VAR_LOWP:
            b_x2 = b_x2.to(tl.bfloat16)
            b_s2 = b_s2.to(tl.bfloat16)
        acc_mu = tl.dot(b_x.to(XDT), b_w.to(XDT), acc_mu, input_precision=PRECISION)
        acc_s2 = tl.dot(b_x2, b_s2, acc_s2, input_precision=PRECISION)

    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_co.to(tl.int64) * stride_b, mask=m_n, other=0.0).to(CDT)  # [BLOCK_N]
        acc_mu += b_b[None, :]
    if ACC_F64:
        b_std = tl.sqrt(acc_s2 + EPS_VAR)
    else:
        b_std = tl.sqrt_rn(acc_s2 + EPS_VAR)
    # ξ index ((n·C_out + co)·H_out + oh)·W_out + ow = (n·C_out·H_out·W_out + p) + co·H_out·W_out
    o_xi = (o_b.to(tl.int64) * C_OUT * hw_out + o_p)[:, None] + (o_co.to(tl.int64) * hw_out)[None, :]
    b_xi = tl.randn(tl.load(seed_ptr), o_xi.to(tl.uint32)).to(CDT)  # [BLOCK_M, BLOCK_N]
    b_y = acc_mu + b_std * b_xi
    o_y = ((o_b.to(tl.int64) * stride_yn + o_oh.to(tl.int64) * stride_yh + o_ow.to(tl.int64) * stride_yw)[:, None]
           + (o_co.to(tl.int64) * stride_yc)[None, :])  # [BLOCK_M, BLOCK_N]
    m_y = m_m[:, None] & m_n[None, :]
    tl.store(y_ptr + o_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)
    tl.store(std_ptr + o_y, b_std.to(std_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def lrt_conv2d_direct_fwd_kernel(
    x_ptr, w_ptr, ls2_ptr, b_ptr, seed_ptr, y_ptr, std_ptr,
    M, C_OUT, COUT_G, H, W, H_OUT, W_OUT, KH, KW,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wh, stride_ww, stride_lo, stride_lh, stride_lw, stride_b,
    stride_yn, stride_yc, stride_yh, stride_yw,
    clip_threshold,
    M_KEY,  # autotune key only
    HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, CLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_C] tile of the LRT convolution forward for C_in/groups = 1 (depthwise,
    channel multiplier C_out/groups): output channel co reads input channel ci = co // (C_out/groups),
    μ = Σ_taps x[n, ci, ih, iw]·θ[co, 0, kh, kw], s² = Σ_taps x²·σ², accumulated elementwise per tap;
    y = μ + b + sqrt(s² + 1e-8)·ξ as :func:`lrt_conv2d_fwd_kernel`.
    Grid: (cdiv(N·H_out·W_out, BLOCK_M), cdiv(C_out, BLOCK_C)).
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixels
    o_co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] output channels
    m_m = o_m < M
    m_c = o_co < C_OUT
    hw_out = H_OUT * W_OUT
    o_b = o_m // hw_out
    o_p = o_m % hw_out
    o_oh = o_p // W_OUT
    o_ow = o_p % W_OUT
    o_ih = o_oh * conv_sh - pad_h
    o_iw = o_ow * conv_sw - pad_w
    o_xc = (o_co // COUT_G).to(tl.int64) * stride_xc  # [BLOCK_C] input channel
    o_xb = o_b.to(tl.int64) * stride_xn  # [BLOCK_M]
    o_wc = o_co.to(tl.int64) * stride_wo
    o_lc = o_co.to(tl.int64) * stride_lo

    acc_mu = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)  # [BLOCK_M, BLOCK_C]
    acc_s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)
    for r in range(0, KH * KW):
        kh = r // KW
        kw = r % KW
        ih = o_ih + kh * dil_h  # [BLOCK_M]
        iw = o_iw + kw * dil_w
        m_p = m_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        o_x = (o_xb + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None] + o_xc[None, :]
        b_x = tl.load(x_ptr + o_x, mask=m_p[:, None] & m_c[None, :], other=0.0).to(CDT)  # [BLOCK_M, BLOCK_C]
        b_w = tl.load(w_ptr + (o_wc + kh.to(tl.int64) * stride_wh + kw.to(tl.int64) * stride_ww),
                      mask=m_c, other=0.0).to(CDT)  # [BLOCK_C]
        b_l = tl.load(ls2_ptr + (o_lc + kh.to(tl.int64) * stride_lh + kw.to(tl.int64) * stride_lw),
                      mask=m_c, other=0.0).to(CDT)  # [BLOCK_C]
        b_s2 = tl.exp(b_l)
        if CLIP:
            b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
            b_keep = b_la < clip_threshold
            b_w = tl.where(b_keep, b_w, 0.0)
            b_s2 = tl.where(b_keep, b_s2, 0.0)
        acc_mu += b_x * b_w[None, :]
        acc_s2 += (b_x * b_x) * b_s2[None, :]

    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_co.to(tl.int64) * stride_b, mask=m_c, other=0.0).to(CDT)  # [BLOCK_C]
        acc_mu += b_b[None, :]
    if ACC_F64:
        b_std = tl.sqrt(acc_s2 + EPS_VAR)
    else:
        b_std = tl.sqrt_rn(acc_s2 + EPS_VAR)
    o_xi = (o_b.to(tl.int64) * C_OUT * hw_out + o_p)[:, None] + (o_co.to(tl.int64) * hw_out)[None, :]
    b_xi = tl.randn(tl.load(seed_ptr), o_xi.to(tl.uint32)).to(CDT)  # [BLOCK_M, BLOCK_C]
    b_y = acc_mu + b_std * b_xi
    o_y = ((o_b.to(tl.int64) * stride_yn + o_oh.to(tl.int64) * stride_yh + o_ow.to(tl.int64) * stride_yw)[:, None]
           + (o_co.to(tl.int64) * stride_yc)[None, :])
    m_y = m_m[:, None] & m_c[None, :]
    tl.store(y_ptr + o_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)
    tl.store(std_ptr + o_y, b_std.to(std_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def lrt_conv2d_bwd_gs2_kernel(
    g_ptr, std_ptr, seed_ptr, gs2_ptr,
    P, C, HW, W_OUT,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_sn, stride_sc, stride_sh, stride_sw,
    ACC_F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """g_s2 = g ⊙ ξ / (2·std) over the (N, C_out, H_out, W_out) output, ξ regenerated from the seed
    at the row-major index; g and std read through their strides, g_s2 written with g's strides in
    its own dtype (the dot-input dtype of the variance products). Read by both kinds of programs
    of the backward, so ξ is drawn once per element instead of once per tile that reads it.
    Grid: (cdiv(N·H_out·W_out, BLOCK_P), cdiv(C_out, BLOCK_C))."""
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    o_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] pixels (n, h, w)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    m = (o_p < P)[:, None] & (o_c < C)[None, :]
    o_b = (o_p // HW).to(tl.int64)
    o_q = o_p % HW
    o_h = (o_q // W_OUT).to(tl.int64)
    o_w = (o_q % W_OUT).to(tl.int64)
    o_c64 = o_c.to(tl.int64)
    o_g = (o_b * stride_gn + o_h * stride_gh + o_w * stride_gw)[:, None] + (o_c64 * stride_gc)[None, :]
    o_s = (o_b * stride_sn + o_h * stride_sh + o_w * stride_sw)[:, None] + (o_c64 * stride_sc)[None, :]
    o_xi = (o_b * C * HW + o_q)[:, None] + (o_c64 * HW)[None, :]  # [BLOCK_P, BLOCK_C]
    b_g = tl.load(g_ptr + o_g, mask=m, other=0.0).to(CDT)
    b_std = tl.load(std_ptr + o_s, mask=m, other=1.0).to(CDT)
    b_xi = tl.randn(tl.load(seed_ptr), o_xi.to(tl.uint32)).to(CDT)
    tl.store(gs2_ptr + o_g, (b_g * b_xi / (2.0 * b_std)).to(gs2_ptr.dtype.element_ty), mask=m)


@triton.jit
def lrt_conv2d_bwd_kernel(
    g_ptr, gs2_ptr, x_ptr, w_ptr, ls2_ptr, gx_ptr, pw_ptr, pl_ptr, pb_ptr,
    NB, M, CIN_G, COUT_G, K, H, W, H_OUT, W_OUT, KH, KW,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_gxn, stride_gxc, stride_gxh, stride_gxw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_lo, stride_li, stride_lh, stride_lw,
    stride_pws, stride_pwo, stride_pwi, stride_pwh, stride_pww,
    stride_pls, stride_plo, stride_pli, stride_plh, stride_plw,
    stride_pbs, stride_pbo,
    chunk_m, n_split, clip_threshold,
    M_KEY,  # autotune key only: next power of two of M
    ACC_F64: tl.constexpr, WITH_DX: tl.constexpr, TAPS_OUTER_X: tl.constexpr, TAPS_OUTER_G: tl.constexpr,
    CLIP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The LRT convolution backward after :func:`lrt_conv2d_bwd_gs2_kernel`, implicit GEMM: one
    launch, two kinds of programs per group program_id(1) (g_s2 has g's strides; without WITH_DX
    only the second kind, for an x that needs no gradient):

    - programs [0, P_x), P_x = s_h·s_w·cdiv(N·⌈H/s_h⌉·⌈W/s_w⌉, BLOCK_M)·cdiv(C_in/groups, BLOCK_K):
      one [BLOCK_M, BLOCK_K] tile of ∂x = convᵀ(g, θ) + 2x ⊙ convᵀ(g_s2, σ²) each, rows the input
      pixels of one stride phase, reducing over j = (co, kh, kw) in steps of BLOCK_N;
    - the next n_split·cdiv(C_out/groups, BLOCK_N)·cdiv(K, BLOCK_K) programs: one [BLOCK_N, BLOCK_K]
      tile of ∂θ = Σ_m gᵀ x_col and ∂log σ² = σ² ⊙ Σ_m g_s2ᵀ x_col² (k = (ci, kh, kw)) each,
      reducing over chunk ``split`` of the M output pixels (chunk_m rows) from one gathered x tile
      for both; those of the first K tile also write ∂b = Σ g. They write into pw / pl / pb at
      split·stride_*s: the gradients themselves when n_split = 1, else partial sums that
      :func:`lrt_conv2d_bwd_reduce_kernel` adds.
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    XDT = x_ptr.dtype.element_ty
    VDT = gs2_ptr.dtype.element_ty
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    khw = KH * KW
    hp = tl.cdiv(H, conv_sh)  # rows of the largest stride phase
    wp = tl.cdiv(W, conv_sw)
    n_tmx = tl.cdiv(NB * hp * wp, BLOCK_M)
    n_tkx = tl.cdiv(CIN_G, BLOCK_K)
    if WITH_DX:
        n_dx = conv_sh * conv_sw * n_tmx * n_tkx
    else:
        n_dx = 0
    if pid < n_dx:
        # --------------------------------------- ∂x tile [BLOCK_M, BLOCK_K], loop over (co, kh, kw)
        per_phase = n_tmx * n_tkx
        phase = pid // per_phase
        q = pid % per_phase
        per_group = GROUP_M * n_tkx
        first_m = (q // per_group) * GROUP_M
        group_m = tl.minimum(n_tmx - first_m, GROUP_M)
        pid_m = first_m + (q % per_group) % group_m
        pid_k = (q % per_group) // group_m
        rho_h = phase // conv_sw  # (ih + pad_h) mod s_h of every pixel of this phase
        rho_w = phase % conv_sw
        ih_first = (rho_h + conv_sh - pad_h % conv_sh) % conv_sh  # first input row of the phase
        iw_first = (rho_w + conv_sw - pad_w % conv_sw) % conv_sw
        h_ph = (H - ih_first + conv_sh - 1) // conv_sh  # rows of the phase
        w_ph = (W - iw_first + conv_sw - 1) // conv_sw
        q_h = (ih_first + pad_h - rho_h) // conv_sh  # output row of (u, tap offset 0) at u = 0
        q_w = (iw_first + pad_w - rho_w) // conv_sw
        hw_ph = tl.maximum(h_ph * w_ph, 1)
        w_ph1 = tl.maximum(w_ph, 1)

        o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] pixels (n, u, v) of the phase
        m_m = o_m < NB * h_ph * w_ph
        o_b = o_m // hw_ph
        o_u = (o_m % hw_ph) // w_ph1
        o_v = (o_m % hw_ph) % w_ph1
        # output row of tap offset t_h: oh = q_h + u − t_h = o_uh − t1_h with t1_h = t_h + 1; valid
        # iff o_uh − H_out < t1_h <= o_uh (comparisons only, see the forward)
        o_uh = q_h + 1 + o_u  # [BLOCK_M]
        o_vw = q_w + 1 + o_v
        o_uhm = o_uh - H_OUT
        o_vwm = o_vw - W_OUT
        o_gm = o_b.to(tl.int64) * stride_gn + o_uh.to(tl.int64) * stride_gh + o_vw.to(tl.int64) * stride_gw
        c_h = conv_sh - rho_h
        c_w = conv_sw - rho_w
        o_cg = grp * COUT_G
        o_ci = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K] input channels in the group
        m_ci = o_ci < CIN_G
        o_wk = o_ci.to(tl.int64) * stride_wi  # [BLOCK_K]
        o_lk = o_ci.to(tl.int64) * stride_li

        acc_g = tl.zeros([BLOCK_M, BLOCK_K], dtype=CDT)  # convᵀ(g, θ)
        acc_v = tl.zeros([BLOCK_M, BLOCK_K], dtype=CDT)  # convᵀ(g_s2, σ²)
        n_j = COUT_G * khw
        for j0 in range(0, n_j, BLOCK_N):
            o_j = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] flattened (co, kh, kw)
            m_j = o_j < n_j
            if TAPS_OUTER_G:
                o_r = o_j // COUT_G
                o_co = o_j % COUT_G
            else:
                o_co = o_j // khw
                o_r = o_j % khw
            o_kh = o_r // KW
            o_kw = o_r % KW
            e_h = o_kh * dil_h + c_h  # ≥ 1; the tap hits this phase iff e_h ≡ 0 (mod s_h)
            e_w = o_kw * dil_w + c_w
            t1_h = e_h // conv_sh  # [BLOCK_N] t_h + 1
            t1_w = e_w // conv_sw
            m_tap = m_j & (e_h % conv_sh == 0) & (e_w % conv_sw == 0)
            m_g = ((m_m[:, None] & m_tap[None, :])
                   & ((t1_h[None, :] <= o_uh[:, None]) & (t1_h[None, :] > o_uhm[:, None]))
                   & ((t1_w[None, :] <= o_vw[:, None]) & (t1_w[None, :] > o_vwm[:, None])))  # [BLOCK_M, BLOCK_N]
            o_coa = (o_cg + o_co).to(tl.int64)
            o_gj = o_coa * stride_gc - t1_h.to(tl.int64) * stride_gh - t1_w.to(tl.int64) * stride_gw
            o_g = o_gm[:, None] + o_gj[None, :]
            b_g = tl.load(g_ptr + o_g, mask=m_g, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            b_gs = tl.load(gs2_ptr + o_g, mask=m_g, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            o_wj = o_coa * stride_wo + o_kh.to(tl.int64) * stride_wh + o_kw.to(tl.int64) * stride_ww
            o_lj = o_coa * stride_lo + o_kh.to(tl.int64) * stride_lh + o_kw.to(tl.int64) * stride_lw
            m_w = m_j[:, None] & m_ci[None, :]
            b_w = tl.load(w_ptr + (o_wj[:, None] + o_wk[None, :]), mask=m_w, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
            b_l = tl.load(ls2_ptr + (o_lj[:, None] + o_lk[None, :]), mask=m_w, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
            b_s2 = tl.exp(b_l)
            if CLIP:
                b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
                b_keep = b_la < clip_threshold
                b_w = tl.where(b_keep, b_w, 0.0)
                b_s2 = tl.where(b_keep, b_s2, 0.0)
            acc_g = tl.dot(b_g.to(XDT), b_w.to(XDT), acc_g, input_precision=PRECISION)
            acc_v = tl.dot(b_gs.to(VDT), b_s2.to(VDT), acc_v, input_precision=PRECISION)

        o_ih = ih_first + o_u * conv_sh  # [BLOCK_M]
        o_iw = iw_first + o_v * conv_sw
        o_cia = (grp * CIN_G + o_ci).to(tl.int64)
        m_out = m_m[:, None] & m_ci[None, :]
        o_x = ((o_b.to(tl.int64) * stride_xn + o_ih.to(tl.int64) * stride_xh + o_iw.to(tl.int64) * stride_xw)[:, None]
               + (o_cia * stride_xc)[None, :])
        b_x = tl.load(x_ptr + o_x, mask=m_out, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_K]
        b_gx = acc_g + 2.0 * b_x * acc_v
        o_gx = ((o_b.to(tl.int64) * stride_gxn + o_ih.to(tl.int64) * stride_gxh + o_iw.to(tl.int64) * stride_gxw)[:, None]
                + (o_cia * stride_gxc)[None, :])
        tl.store(gx_ptr + o_gx, b_gx.to(gx_ptr.dtype.element_ty), mask=m_out)
    else:
        # ------------------------- ∂θ, ∂log σ² tiles [BLOCK_N, BLOCK_K], loop over a chunk of M
        pid = pid - n_dx
        n_tn = tl.cdiv(COUT_G, BLOCK_N)
        n_tk = tl.cdiv(K, BLOCK_K)
        per_split = n_tn * n_tk
        split = pid // per_split
        q = pid % per_split
        per_group = GROUP_M * n_tk
        first_n = (q // per_group) * GROUP_M
        group_n = tl.minimum(n_tn - first_n, GROUP_M)
        pid_n = first_n + (q % per_group) % group_n
        pid_k = (q % per_group) // group_n
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels in the group
        m_n = o_n < COUT_G
        o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K] flattened (ci, kh, kw)
        m_k = o_k < K
        if TAPS_OUTER_X:
            o_r = o_k // CIN_G
            o_ci = o_k % CIN_G
        else:
            o_ci = o_k // khw
            o_r = o_k % khw
        o_kh = o_r // KW
        o_kw = o_r % KW
        o_dh = o_kh * dil_h
        o_dw = o_kw * dil_w
        o_xk = ((grp * CIN_G + o_ci).to(tl.int64) * stride_xc + o_dh.to(tl.int64) * stride_xh
                + o_dw.to(tl.int64) * stride_xw)  # [BLOCK_K]
        o_coa = (grp * COUT_G + o_n).to(tl.int64)
        o_gn = o_coa * stride_gc  # [BLOCK_N]
        hw_out = H_OUT * W_OUT

        acc_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=CDT)  # Σ gᵀ x_col
        acc_l = tl.zeros([BLOCK_N, BLOCK_K], dtype=CDT)  # Σ g_s2ᵀ x_col²
        acc_b = tl.zeros([BLOCK_N], dtype=CDT)  # Σ g
        m_lo = split * chunk_m
        m_hi = tl.minimum(M, m_lo + chunk_m)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixels
            m_m = o_m < m_hi
            o_b = o_m // hw_out
            o_p = o_m % hw_out
            o_oh = o_p // W_OUT
            o_ow = o_p % W_OUT
            o_g = (o_b.to(tl.int64) * stride_gn + o_oh.to(tl.int64) * stride_gh
                   + o_ow.to(tl.int64) * stride_gw)[:, None] + o_gn[None, :]  # [BLOCK_M, BLOCK_N]
            m_g = m_m[:, None] & m_n[None, :]
            b_g = tl.load(g_ptr + o_g, mask=m_g, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            b_gs = tl.load(gs2_ptr + o_g, mask=m_g, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            lo_h = pad_h - o_oh * conv_sh  # [BLOCK_M] tap offsets lo <= d < hi are inside the image
            hi_h = lo_h + H
            lo_w = pad_w - o_ow * conv_sw
            hi_w = lo_w + W
            m_x = ((m_m[:, None] & m_k[None, :]) & ((o_dh[None, :] >= lo_h[:, None]) & (o_dh[None, :] < hi_h[:, None]))
                   & ((o_dw[None, :] >= lo_w[:, None]) & (o_dw[None, :] < hi_w[:, None])))  # [BLOCK_M, BLOCK_K]
            o_xm = o_b.to(tl.int64) * stride_xn - lo_h.to(tl.int64) * stride_xh - lo_w.to(tl.int64) * stride_xw
            b_x = tl.load(x_ptr + (o_xm[:, None] + o_xk[None, :]), mask=m_x, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_K]
            acc_w = tl.dot(tl.trans(b_g.to(XDT)), b_x.to(XDT), acc_w, input_precision=PRECISION)
            acc_l = tl.dot(tl.trans(b_gs.to(VDT)), (b_x * b_x).to(VDT), acc_l, input_precision=PRECISION)
            acc_b += tl.sum(b_g, axis=0)

        m_nk = m_n[:, None] & m_k[None, :]
        o_kh64 = o_kh.to(tl.int64)
        o_kw64 = o_kw.to(tl.int64)
        o_ci64 = o_ci.to(tl.int64)
        o_l = (o_coa * stride_lo)[:, None] + (o_ci64 * stride_li + o_kh64 * stride_lh + o_kw64 * stride_lw)[None, :]
        b_l = tl.load(ls2_ptr + o_l, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
        b_gl = tl.exp(b_l) * acc_l
        if CLIP:
            o_w = (o_coa * stride_wo)[:, None] + (o_ci64 * stride_wi + o_kh64 * stride_wh + o_kw64 * stride_ww)[None, :]
            b_w = tl.load(w_ptr + o_w, mask=m_nk, other=0.0).to(CDT)
            b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
            b_keep = b_la < clip_threshold
            acc_w = tl.where(b_keep, acc_w, 0.0)
            b_gl = tl.where(b_keep, b_gl, 0.0)
        split64 = split.to(tl.int64)
        o_pw = (split64 * stride_pws + (o_coa * stride_pwo)[:, None]
                + (o_ci64 * stride_pwi + o_kh64 * stride_pwh + o_kw64 * stride_pww)[None, :])
        o_pl = (split64 * stride_pls + (o_coa * stride_plo)[:, None]
                + (o_ci64 * stride_pli + o_kh64 * stride_plh + o_kw64 * stride_plw)[None, :])
        tl.store(pw_ptr + o_pw, acc_w.to(pw_ptr.dtype.element_ty), mask=m_nk)
        tl.store(pl_ptr + o_pl, b_gl.to(pl_ptr.dtype.element_ty), mask=m_nk)
        if pid_k == 0:
            tl.store(pb_ptr + (split64 * stride_pbs + o_coa * stride_pbo), acc_b.to(pb_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def lrt_conv2d_direct_bwd_kernel(
    g_ptr, gs2_ptr, x_ptr, w_ptr, ls2_ptr, gx_ptr, pw_ptr, pl_ptr, pb_ptr,
    NB, M, C_IN, C_OUT, COUT_G, H, W, H_OUT, W_OUT, KH, KW,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_gxn, stride_gxc, stride_gxh, stride_gxw,
    stride_wo, stride_wh, stride_ww, stride_lo, stride_lh, stride_lw,
    stride_pws, stride_pwo, stride_pwh, stride_pww,
    stride_pls, stride_plo, stride_plh, stride_plw,
    stride_pbs, stride_pbo,
    chunk_m, n_split, clip_threshold,
    M_KEY,  # autotune key only
    ACC_F64: tl.constexpr, WITH_DX: tl.constexpr, CLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The LRT convolution backward for C_in/groups = 1 (depthwise, channel multiplier
    COUT_G = C_out/groups), after :func:`lrt_conv2d_bwd_gs2_kernel`; one launch, two kinds of
    programs (the first kind only WITH_DX), elementwise products, no dots:

    - programs [0, P_x), P_x = cdiv(N·H·W, BLOCK_M)·cdiv(C_in, BLOCK_C): a [BLOCK_M, BLOCK_C] tile
      of ∂x = Σ_{taps, co of ci} g·θ + 2x ⊙ Σ g_s2·σ² each (the output pixel of a tap is masked
      unless (ih + p − kh·d) is a multiple of the stride);
    - the next n_split·kH·kW·cdiv(C_out, BLOCK_C) programs: ∂θ[co, 0, kh, kw], ∂log σ² and (tap 0)
      ∂b of BLOCK_C output channels for one tap, summed over chunk ``split`` of the output pixels
      into [BLOCK_M, BLOCK_C] accumulators reduced once at the end; written as
      :func:`lrt_conv2d_bwd_kernel` writes them.
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    pid = tl.program_id(0)
    khw = KH * KW
    if WITH_DX:
        n_dx = tl.cdiv(NB * H * W, BLOCK_M) * tl.cdiv(C_IN, BLOCK_C)
    else:
        n_dx = 0
    if pid < n_dx:
        # --------------------------------------------------- ∂x tile [BLOCK_M, BLOCK_C], loop over taps
        n_tc = tl.cdiv(C_IN, BLOCK_C)
        pid_m = pid // n_tc
        pid_c = pid % n_tc
        o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] input pixels
        o_ci = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] input channels
        m_m = o_m < NB * H * W
        m_c = o_ci < C_IN
        o_b = o_m // (H * W)
        o_ih = (o_m % (H * W)) // W
        o_iw = (o_m % (H * W)) % W
        o_gb = o_b.to(tl.int64) * stride_gn
        acc_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)
        acc_v = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)
        for t in range(0, khw * COUT_G):
            r = t // COUT_G
            kh = r // KW
            kw = r % KW
            o_co = o_ci * COUT_G + t % COUT_G  # [BLOCK_C]
            nh = o_ih + pad_h - kh * dil_h  # [BLOCK_M] oh·s_h
            nw = o_iw + pad_w - kw * dil_w
            nh0 = tl.maximum(nh, 0)
            nw0 = tl.maximum(nw, 0)
            oh = nh0 // conv_sh
            ow = nw0 // conv_sw
            m_p = m_m & (nh >= 0) & (nw >= 0) & (nh0 % conv_sh == 0) & (nw0 % conv_sw == 0) \
                & (oh < H_OUT) & (ow < W_OUT)
            o_co64 = o_co.to(tl.int64)
            o_g = (o_gb + oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw)[:, None] + (o_co64 * stride_gc)[None, :]
            m_g = m_p[:, None] & m_c[None, :]
            b_g = tl.load(g_ptr + o_g, mask=m_g, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_C]
            b_gs = tl.load(gs2_ptr + o_g, mask=m_g, other=0.0).to(CDT)
            b_w = tl.load(w_ptr + (o_co64 * stride_wo + kh.to(tl.int64) * stride_wh + kw.to(tl.int64) * stride_ww),
                          mask=m_c, other=0.0).to(CDT)  # [BLOCK_C]
            b_l = tl.load(ls2_ptr + (o_co64 * stride_lo + kh.to(tl.int64) * stride_lh + kw.to(tl.int64) * stride_lw),
                          mask=m_c, other=0.0).to(CDT)
            b_s2 = tl.exp(b_l)
            if CLIP:
                b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
                b_keep = b_la < clip_threshold
                b_w = tl.where(b_keep, b_w, 0.0)
                b_s2 = tl.where(b_keep, b_s2, 0.0)
            acc_g += b_g * b_w[None, :]
            acc_v += b_gs * b_s2[None, :]
        o_ci64 = o_ci.to(tl.int64)
        m_out = m_m[:, None] & m_c[None, :]
        o_x = ((o_b.to(tl.int64) * stride_xn + o_ih.to(tl.int64) * stride_xh + o_iw.to(tl.int64) * stride_xw)[:, None]
               + (o_ci64 * stride_xc)[None, :])
        b_x = tl.load(x_ptr + o_x, mask=m_out, other=0.0).to(CDT)
        o_gx = ((o_b.to(tl.int64) * stride_gxn + o_ih.to(tl.int64) * stride_gxh + o_iw.to(tl.int64) * stride_gxw)[:, None]
                + (o_ci64 * stride_gxc)[None, :])
        tl.store(gx_ptr + o_gx, (acc_g + 2.0 * b_x * acc_v).to(gx_ptr.dtype.element_ty), mask=m_out)
    else:
        # ------------------------------- ∂θ, ∂log σ², ∂b of [BLOCK_C] channels, one tap, one chunk
        pid = pid - n_dx
        n_tc = tl.cdiv(C_OUT, BLOCK_C)
        per_split = n_tc * khw
        split = pid // per_split
        q = pid % per_split
        r = q // n_tc
        pid_c = q % n_tc
        kh = r // KW
        kw = r % KW
        o_co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] output channels
        m_c = o_co < C_OUT
        o_co64 = o_co.to(tl.int64)
        o_xc = (o_co // COUT_G).to(tl.int64) * stride_xc
        hw_out = H_OUT * W_OUT
        acc_w = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)
        acc_l = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)
        acc_b = tl.zeros([BLOCK_M, BLOCK_C], dtype=CDT)
        m_lo = split * chunk_m
        m_hi = tl.minimum(M, m_lo + chunk_m)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixels
            m_m = o_m < m_hi
            o_b = o_m // hw_out
            o_p = o_m % hw_out
            o_oh = o_p // W_OUT
            o_ow = o_p % W_OUT
            ih = o_oh * conv_sh - pad_h + kh * dil_h
            iw = o_ow * conv_sw - pad_w + kw * dil_w
            m_p = m_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            o_b64 = o_b.to(tl.int64)
            o_g = (o_b64 * stride_gn + o_oh.to(tl.int64) * stride_gh + o_ow.to(tl.int64) * stride_gw)[:, None] \
                + (o_co64 * stride_gc)[None, :]
            m_g = m_m[:, None] & m_c[None, :]
            b_g = tl.load(g_ptr + o_g, mask=m_g, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_C]
            b_gs = tl.load(gs2_ptr + o_g, mask=m_g, other=0.0).to(CDT)
            o_x = (o_b64 * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None] + o_xc[None, :]
            b_x = tl.load(x_ptr + o_x, mask=m_p[:, None] & m_c[None, :], other=0.0).to(CDT)
            acc_w += b_g * b_x
            acc_l += b_gs * (b_x * b_x)
            acc_b += b_g
        b_l = tl.load(ls2_ptr + (o_co64 * stride_lo + kh.to(tl.int64) * stride_lh + kw.to(tl.int64) * stride_lw),
                      mask=m_c, other=0.0).to(CDT)  # [BLOCK_C]
        s_w = tl.sum(acc_w, axis=0)
        s_l = tl.exp(b_l) * tl.sum(acc_l, axis=0)
        if CLIP:
            b_w = tl.load(w_ptr + (o_co64 * stride_wo + kh.to(tl.int64) * stride_wh + kw.to(tl.int64) * stride_ww),
                          mask=m_c, other=0.0).to(CDT)
            b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
            b_keep = b_la < clip_threshold
            s_w = tl.where(b_keep, s_w, 0.0)
            s_l = tl.where(b_keep, s_l, 0.0)
        split64 = split.to(tl.int64)
        o_pw = split64 * stride_pws + o_co64 * stride_pwo + kh.to(tl.int64) * stride_pwh + kw.to(tl.int64) * stride_pww
        o_pl = split64 * stride_pls + o_co64 * stride_plo + kh.to(tl.int64) * stride_plh + kw.to(tl.int64) * stride_plw
        tl.store(pw_ptr + o_pw, s_w.to(pw_ptr.dtype.element_ty), mask=m_c)
        tl.store(pl_ptr + o_pl, s_l.to(pl_ptr.dtype.element_ty), mask=m_c)
        if r == 0:
            tl.store(pb_ptr + (split64 * stride_pbs + o_co64 * stride_pbo),
                     tl.sum(acc_b, axis=0).to(pb_ptr.dtype.element_ty), mask=m_c)


@triton.jit
def lrt_conv2d_bwd_reduce_kernel(
    pw_ptr, pl_ptr, pb_ptr, gw_ptr, gl_ptr, gb_ptr,
    NUMEL_W, C_OUT, n_split, CIN_G, KH, KW,
    stride_gwo, stride_gwi, stride_gwh, stride_gww,
    stride_glo, stride_gli, stride_glh, stride_glw, stride_gb,
    ACC_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sums the n_split partial weight gradients of the backward (contiguous (n_split, C_out,
    C_in/groups, kH, kW) buffers pw, pl and (n_split, C_out) pb) into ∂θ, ∂log σ² and ∂b, written
    through their strides in their dtypes. Programs [0, cdiv(NUMEL_W, BLOCK)) take the weights,
    the rest the bias. Grid: cdiv(NUMEL_W, BLOCK) + cdiv(C_out, BLOCK)."""
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    pid = tl.program_id(0)
    n_pw = tl.cdiv(NUMEL_W, BLOCK)
    if pid < n_pw:
        o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] weight elements
        m = o < NUMEL_W
        acc_w = tl.zeros([BLOCK], dtype=CDT)
        acc_l = tl.zeros([BLOCK], dtype=CDT)
        p_w = pw_ptr + o
        p_l = pl_ptr + o
        for _ in range(0, n_split):
            acc_w += tl.load(p_w, mask=m, other=0.0).to(CDT)
            acc_l += tl.load(p_l, mask=m, other=0.0).to(CDT)
            p_w += NUMEL_W
            p_l += NUMEL_W
        khw = KH * KW
        o_co = o // (CIN_G * khw)
        o_ci = (o // khw) % CIN_G
        o_kh = (o % khw) // KW
        o_kw = o % KW
        tl.store(gw_ptr + (o_co * stride_gwo + o_ci * stride_gwi + o_kh * stride_gwh + o_kw * stride_gww),
                 acc_w.to(gw_ptr.dtype.element_ty), mask=m)
        tl.store(gl_ptr + (o_co * stride_glo + o_ci * stride_gli + o_kh * stride_glh + o_kw * stride_glw),
                 acc_l.to(gl_ptr.dtype.element_ty), mask=m)
    else:
        o = (pid - n_pw).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] output channels
        m = o < C_OUT
        acc_b = tl.zeros([BLOCK], dtype=CDT)
        p_b = pb_ptr + o
        for _ in range(0, n_split):
            acc_b += tl.load(p_b, mask=m, other=0.0).to(CDT)
            p_b += C_OUT
        tl.store(gb_ptr + o * stride_gb, acc_b.to(gb_ptr.dtype.element_ty), mask=m)
