"""Triton kernels of the LRT linear layer (Molchanov, Ashukha, Vetrov, ICML 2017, sec. 4.2).

Forward (one kernel)::

    μ = x θᵀ + b,   s² = (x ⊙ x)(σ²)ᵀ,   std = sqrt(s² + 1e-8),   y = μ + std ⊙ ξ

Backward (two kernels), g = ∂L/∂y::

    g_s2 = g ⊙ ξ / (2·std)                                   (elementwise, ξ regenerated)
    ∂x = g θ + 2x ⊙ (g_s2 σ²),   ∂θ = gᵀ x,   ∂log σ² = σ² ⊙ (g_s2ᵀ (x ⊙ x)),   ∂b = Σ_rows g

ξ[m, n] = tl.randn(seed, m·N + n), the row-major index of the output element taken modulo 2³²
(bit for bit :func:`sparsevd.ops.noise.lrt_noise`). x² and σ² = exp(log σ²) are formed in
registers from the loaded tiles of x and log σ², never stored.

Argument conventions (all kernels): x is (M, K) with one or two flattened leading dims (row m sits at
(m // D1)·stride_0 + (m % D1)·stride_1, so transposed, sliced, expanded and permuted 3-D inputs are
read in place), θ and log σ² are (N, K) with
their strides, y, std, g and g_s2 are contiguous (M, N). Accumulation in fp32 (fp64 when
ACC_F64); the dot inputs of the mean are in x's dtype (bf16/fp16 under autocast, like
nn.Linear under autocast), those of the variance in bf16 only for bf16 x (VAR_LOWP) and in
fp32 otherwise (fp16 would underflow σ² ≈ e⁻¹⁰).

Tiles map onto 1-D grids in groups of GROUP_M row tiles (Triton matmul tutorial) for L2 reuse.
No @triton.jit helper is called from these kernels: Triton's interpreter re-patches the language on
every call of a jit function (milliseconds each), which made helper calls in the K loops dominate the
CPU test time.

Train-time clipping (CLIP, issue 11): the mask m = [log α < clip_threshold], log α =
clamp(log σ² − log(θ² + 1e-8), −10, 10) as :func:`sparsevd.reference.clip_mask` computes it
(θ = 0 included), is formed in registers from the θ and log σ² tiles the kernels load anyway;
θ ⊙ m and σ² ⊙ m enter the products and ∂θ, ∂log σ² are zero where m = 0. With SKIP_DEAD the
kernels skip the products of weight tiles whose every weight is dropped. The test is a max
over the tile's mask, which is in registers already; a per-tile occupancy array computed once
per step would also spare the forward and ∂x programs the dead tiles' loads and mask
arithmetic, but costs a launch per step, a tile size shared by the separately tuned forward and
backward, and a second copy of the mask that must match it (benchmarks/NOTES.md, "Triton
train-time clip and tile skipping"). The forward's K steps and the ∂x programs' N steps add,
in place of the two dots, the row sums of x·0 (resp. g·0), which are ±0 for finite values and
NaN where the dots would have met an inf or NaN, so the result is bit for bit the one without
skipping; the ∂θ programs of a dead tile run no M step (except the
first K column, which still sums ∂b = Σ g) and write zeros. COUNT_SKIPS (tests) adds the
skipped tiles to cnt_ptr[0..2] (forward K steps, ∂x N steps, dead ∂θ tiles). Without CLIP the
kernels are the unclipped ones (every CLIP branch is a compile-time one).

Launchers and autotuning: :mod:`sparsevd.ops.lrt_linear.triton`.
"""
import triton
import triton.language as tl

#: Added to the LRT variance before the square root (sparsevd.reference.EPS_VAR).
EPS_VAR = tl.constexpr(1e-8)
#: log α = clamp(log σ² − log(θ² + EPS_THETA), −LA_CLAMP, LA_CLAMP) (sparsevd.reference).
EPS_THETA = tl.constexpr(1e-8)
LA_CLAMP = tl.constexpr(10.0)


@triton.jit
def lrt_linear_fwd_kernel(
    x_ptr, w_ptr, ls2_ptr, b_ptr, seed_ptr, y_ptr, std_ptr,
    M, N, K, D1,
    stride_x0, stride_x1, stride_xk,
    stride_wn, stride_wk, stride_ln, stride_lk, stride_b,
    clip_threshold: tl.float64, cnt_ptr,
    M_KEY,  # autotune key only: next power of two of M
    HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, VAR_LOWP: tl.constexpr,
    PRECISION: tl.constexpr, CLIP: tl.constexpr, SKIP_DEAD: tl.constexpr, COUNT_SKIPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of the LRT linear forward.

    μ = x θᵀ + b and s² = (x⊙x)(exp(log σ²))ᵀ accumulate over K from the same loaded tiles of x,
    θ and log σ²; then std = sqrt(s² + 1e-8), ξ = tl.randn(seed, m·N + n), y = μ + std·ξ.
    Writes y (y's dtype) and std (std's dtype). Grid: cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N).
    CLIP: θ ⊙ m and σ² ⊙ m in the products; SKIP_DEAD: K steps whose [BLOCK_N, BLOCK_K] weight
    tile is all dropped add the row sums of x·0 and x²·0 instead of the dots (module docstring).
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    XDT = x_ptr.dtype.element_ty

    pid = tl.program_id(0)
    n_tm = tl.cdiv(M, BLOCK_M)
    n_tn = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_tn
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_tm - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    o_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_m = o_m < M
    m_n = o_n < N
    o_m64 = o_m.to(tl.int64)
    o_n64 = o_n.to(tl.int64)

    o_k64 = o_k.to(tl.int64)
    p_x = x_ptr + ((o_m64 // D1) * stride_x0 + (o_m64 % D1) * stride_x1)[:, None] + o_k64[None, :] * stride_xk
    p_w = w_ptr + o_n64[:, None] * stride_wn + o_k64[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    p_l = ls2_ptr + o_n64[:, None] * stride_ln + o_k64[None, :] * stride_lk  # [BLOCK_N, BLOCK_K]
    step_x = tl.full([], BLOCK_K, tl.int64) * stride_xk
    step_w = tl.full([], BLOCK_K, tl.int64) * stride_wk
    step_l = tl.full([], BLOCK_K, tl.int64) * stride_lk

    if CLIP:  # the threshold in the compute dtype, as torch compares a tensor with a Python float
        b_thr = tl.full([], clip_threshold, CDT)
    acc_mu = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)  # [BLOCK_M, BLOCK_N]
    acc_s2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        m_k = o_k < K - k0
        m_nk = m_n[:, None] & m_k[None, :]
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0).to(CDT)  # [BLOCK_M, BLOCK_K]
        b_w = tl.load(p_w, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
        b_l = tl.load(p_l, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
        b_s2 = tl.exp(b_l)
        if CLIP:
            b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
            b_keep = b_la < b_thr
            b_w = tl.where(b_keep, b_w, 0.0)
            b_s2 = tl.where(b_keep, b_s2, 0.0)
        b_x2 = b_x * b_x
        if VAR_LOWP:
            b_x2 = b_x2.to(tl.bfloat16)
            b_s2 = b_s2.to(tl.bfloat16)
        # compile-time True without CLIP or SKIP_DEAD; else: does the tile keep any weight?
        if (not CLIP) or (not SKIP_DEAD) or (tl.max((b_keep & m_nk).to(tl.int32)) > 0):
            acc_mu = tl.dot(b_x.to(XDT), tl.trans(b_w.to(XDT)), acc_mu, input_precision=PRECISION)
            acc_s2 = tl.dot(b_x2, tl.trans(b_s2), acc_s2, input_precision=PRECISION)
        else:  # dead tile: the dots would add x·0 (±0, or NaN for a non-finite x) per row
            acc_mu += tl.sum(b_x * 0.0, axis=1)[:, None]
            acc_s2 += tl.sum(b_x2.to(CDT) * 0.0, axis=1)[:, None]
            if COUNT_SKIPS:
                tl.atomic_add(cnt_ptr, 1)
        p_x += step_x
        p_w += step_w
        p_l += step_l

    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_n * stride_b, mask=m_n, other=0.0).to(CDT)  # [BLOCK_N]
        acc_mu += b_b[None, :]
    if ACC_F64:
        b_std = tl.sqrt(acc_s2 + EPS_VAR)
    else:
        b_std = tl.sqrt_rn(acc_s2 + EPS_VAR)
    o_y = o_m64[:, None] * N + o_n[None, :]  # [BLOCK_M, BLOCK_N]
    b_xi = tl.randn(tl.load(seed_ptr), o_y.to(tl.uint32)).to(CDT)  # [BLOCK_M, BLOCK_N]
    b_y = acc_mu + b_std * b_xi
    m_y = m_m[:, None] & m_n[None, :]
    tl.store(y_ptr + o_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)
    tl.store(std_ptr + o_y, b_std.to(std_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def lrt_linear_bwd_gs2_kernel(
    g_ptr, std_ptr, seed_ptr, gs2_ptr, numel,
    ACC_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """g_s2 = g ⊙ ξ / (2·std) over the contiguous (M, N) output, ξ = tl.randn(seed, i) regenerated
    from the seed. Written in gs2's dtype (the dot-input dtype of the variance products) and read
    by both kinds of programs of :func:`lrt_linear_bwd_kernel`, so ξ is drawn once per element in
    the backward instead of once per K tile. Grid: cdiv(numel, BLOCK)."""
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m = o < numel
    b_g = tl.load(g_ptr + o, mask=m, other=0.0).to(CDT)
    b_std = tl.load(std_ptr + o, mask=m, other=1.0).to(CDT)
    b_xi = tl.randn(tl.load(seed_ptr), o.to(tl.uint32)).to(CDT)
    tl.store(gs2_ptr + o, (b_g * b_xi / (2.0 * b_std)).to(gs2_ptr.dtype.element_ty), mask=m)


@triton.jit
def lrt_linear_bwd_kernel(
    g_ptr, gs2_ptr, x_ptr, w_ptr, ls2_ptr, gx_ptr, gw_ptr, gl_ptr, gb_ptr,
    M, N, K, D1,
    stride_x0, stride_x1, stride_xk, stride_gx0, stride_gx1, stride_gxk,
    stride_wn, stride_wk, stride_ln, stride_lk,
    stride_gwn, stride_gwk, stride_gln, stride_glk,
    clip_threshold: tl.float64, cnt_ptr,
    M_KEY,  # autotune key only: next power of two of M
    ACC_F64: tl.constexpr, PRECISION: tl.constexpr, WITH_DX: tl.constexpr,
    CLIP: tl.constexpr, SKIP_DEAD: tl.constexpr, COUNT_SKIPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The LRT linear backward after :func:`lrt_linear_bwd_gs2_kernel`: one launch, two kinds of
    programs (g and g_s2 are contiguous (M, N)); without WITH_DX (the input needs no gradient)
    only the second kind:

    - programs [0, P_x), P_x = cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K): one [BLOCK_M, BLOCK_K] tile of
      ∂x = g θ + 2x ⊙ (g_s2 σ²) each, reducing over N;
    - the next cdiv(N, BLOCK_N)·cdiv(K, BLOCK_K) programs: one [BLOCK_N, BLOCK_K] tile of
      ∂θ = gᵀ x and ∂log σ² = σ² ⊙ (g_s2ᵀ (x⊙x)) each from one load of every x tile, reducing
      over M; those of the first K tile also write ∂b = Σ_rows g (deterministic, no atomics).

    CLIP: θ ⊙ m and σ² ⊙ m in the ∂x products, ∂θ and ∂log σ² set to 0 where m = 0 (tl.where:
    exactly 0, whatever g and x hold). SKIP_DEAD: the ∂x programs skip the dots of all-dropped
    weight tiles (adding the row sums of g·0 and g_s2·0, module docstring); the ∂θ programs of
    an all-dropped tile run no M step, or, in the first K column, only the loads of g for ∂b.
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    XDT = x_ptr.dtype.element_ty
    VDT = gs2_ptr.dtype.element_ty
    if CLIP:  # the threshold in the compute dtype, as torch compares a tensor with a Python float
        b_thr = tl.full([], clip_threshold, CDT)
    pid = tl.program_id(0)
    n_tk = tl.cdiv(K, BLOCK_K)
    if WITH_DX:
        n_dx = tl.cdiv(M, BLOCK_M) * n_tk
    else:
        n_dx = 0
    if pid < n_dx:
        # ------------------------------------------------ ∂x tile [BLOCK_M, BLOCK_K], loop over N
        n_tm = tl.cdiv(M, BLOCK_M)
        per_group = GROUP_M * n_tk
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(n_tm - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_k = (pid % per_group) // group_m
        o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        o_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_m = o_m < M
        m_k = o_k < K
        o_m64 = o_m.to(tl.int64)
        o_k64 = o_k.to(tl.int64)

        o_g = o_m64[:, None] * N + o_n[None, :]  # [BLOCK_M, BLOCK_N]
        o_n64 = o_n.to(tl.int64)
        p_w = w_ptr + o_n64[:, None] * stride_wn + o_k64[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
        p_l = ls2_ptr + o_n64[:, None] * stride_ln + o_k64[None, :] * stride_lk  # [BLOCK_N, BLOCK_K]
        step_w = tl.full([], BLOCK_N, tl.int64) * stride_wn
        step_l = tl.full([], BLOCK_N, tl.int64) * stride_ln
        acc_g = tl.zeros([BLOCK_M, BLOCK_K], dtype=CDT)  # g θ
        acc_v = tl.zeros([BLOCK_M, BLOCK_K], dtype=CDT)  # g_s2 σ²
        for n0 in range(0, N, BLOCK_N):
            m_n = o_n < N - n0
            m_mn = m_m[:, None] & m_n[None, :]
            m_nk = m_n[:, None] & m_k[None, :]
            b_g = tl.load(g_ptr + o_g, mask=m_mn, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            b_gs = tl.load(gs2_ptr + o_g, mask=m_mn, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            b_w = tl.load(p_w, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
            b_l = tl.load(p_l, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
            b_s2 = tl.exp(b_l)
            if CLIP:
                b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
                b_keep = b_la < b_thr
                b_w = tl.where(b_keep, b_w, 0.0)
                b_s2 = tl.where(b_keep, b_s2, 0.0)
            # compile-time True without CLIP or SKIP_DEAD; else: does the tile keep any weight?
            if (not CLIP) or (not SKIP_DEAD) or (tl.max((b_keep & m_nk).to(tl.int32)) > 0):
                acc_g = tl.dot(b_g.to(XDT), b_w.to(XDT), acc_g, input_precision=PRECISION)
                acc_v = tl.dot(b_gs.to(VDT), b_s2.to(VDT), acc_v, input_precision=PRECISION)
            else:  # dead tile: the dots would add g·0 (±0, or NaN for a non-finite g) per row
                acc_g += tl.sum(b_g * 0.0, axis=1)[:, None]
                acc_v += tl.sum(b_gs * 0.0, axis=1)[:, None]
                if COUNT_SKIPS:
                    tl.atomic_add(cnt_ptr + 1, 1)
            o_g += BLOCK_N
            p_w += step_w
            p_l += step_l

        m_mk = m_m[:, None] & m_k[None, :]
        o_x = ((o_m64 // D1) * stride_x0 + (o_m64 % D1) * stride_x1)[:, None] + o_k64[None, :] * stride_xk
        b_x = tl.load(x_ptr + o_x, mask=m_mk, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_K]
        b_gx = acc_g + 2.0 * b_x * acc_v
        o_gx = ((o_m64 // D1) * stride_gx0 + (o_m64 % D1) * stride_gx1)[:, None] + o_k64[None, :] * stride_gxk
        tl.store(gx_ptr + o_gx, b_gx.to(gx_ptr.dtype.element_ty), mask=m_mk)
    else:
        # ---------------------------------- ∂θ, ∂log σ² tiles [BLOCK_N, BLOCK_K], loop over M
        pid = pid - n_dx
        n_tn = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_tk
        first_n = (pid // per_group) * GROUP_M
        group_n = tl.minimum(n_tn - first_n, GROUP_M)
        pid_n = first_n + (pid % per_group) % group_n
        pid_k = (pid % per_group) // group_n
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        o_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
        m_n = o_n < N
        m_k = o_k < K
        o_n64 = o_n.to(tl.int64)
        o_k64 = o_k.to(tl.int64)

        m_end = M
        if CLIP:
            if SKIP_DEAD:  # the tile's mask first, so that a dead tile can skip the M loop
                m_nk = m_n[:, None] & m_k[None, :]
                p_l = ls2_ptr + o_n64[:, None] * stride_ln + o_k64[None, :] * stride_lk
                p_w = w_ptr + o_n64[:, None] * stride_wn + o_k64[None, :] * stride_wk
                b_l = tl.load(p_l, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
                b_w = tl.load(p_w, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
                b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
                n_live = tl.max(((b_la < b_thr) & m_nk).to(tl.int32))  # 0: all dropped
                # a dead tile runs no M step, except in the first K column, whose ∂b needs Σ g
                m_end = tl.where((n_live > 0) | (pid_k == 0), M, 0)
                if COUNT_SKIPS:
                    tl.atomic_add(cnt_ptr + 2, tl.where(n_live > 0, 0, 1))

        acc_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=CDT)  # gᵀ x
        acc_l = tl.zeros([BLOCK_N, BLOCK_K], dtype=CDT)  # g_s2ᵀ x²
        acc_b = tl.zeros([BLOCK_N], dtype=CDT)  # Σ_rows g
        for m0 in range(0, m_end, BLOCK_M):
            rows = (m0 + o_m).to(tl.int64)  # [BLOCK_M]
            m_m = rows < M
            m_mn = m_m[:, None] & m_n[None, :]
            o_g = rows[:, None] * N + o_n[None, :]  # [BLOCK_M, BLOCK_N]
            b_g = tl.load(g_ptr + o_g, mask=m_mn, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
            # compile-time True without CLIP or SKIP_DEAD; else: does the tile keep any weight?
            if (not CLIP) or (not SKIP_DEAD) or (n_live > 0):
                b_gs = tl.load(gs2_ptr + o_g, mask=m_mn, other=0.0).to(CDT)  # [BLOCK_M, BLOCK_N]
                o_x = ((rows // D1) * stride_x0 + (rows % D1) * stride_x1)[:, None] + o_k64[None, :] * stride_xk
                b_x = tl.load(x_ptr + o_x, mask=m_m[:, None] & m_k[None, :], other=0.0).to(CDT)  # [BLOCK_M, BLOCK_K]
                acc_w = tl.dot(tl.trans(b_g.to(XDT)), b_x.to(XDT), acc_w, input_precision=PRECISION)
                acc_l = tl.dot(tl.trans(b_gs.to(VDT)), (b_x * b_x).to(VDT), acc_l, input_precision=PRECISION)
            acc_b += tl.sum(b_g, axis=0)

        m_nk = m_n[:, None] & m_k[None, :]
        p_l = ls2_ptr + o_n64[:, None] * stride_ln + o_k64[None, :] * stride_lk  # [BLOCK_N, BLOCK_K]
        b_l = tl.load(p_l, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
        b_gl = tl.exp(b_l) * acc_l
        if CLIP:  # the mask again (a reload from L2 rather than a tile held over the M loop)
            p_w = w_ptr + o_n64[:, None] * stride_wn + o_k64[None, :] * stride_wk
            b_w = tl.load(p_w, mask=m_nk, other=0.0).to(CDT)  # [BLOCK_N, BLOCK_K]
            b_la = tl.minimum(tl.maximum(b_l - tl.log(b_w * b_w + EPS_THETA), -LA_CLAMP), LA_CLAMP)
            b_keep = b_la < b_thr
            acc_w = tl.where(b_keep, acc_w, 0.0)
            b_gl = tl.where(b_keep, b_gl, 0.0)
        p_gw = gw_ptr + o_n64[:, None] * stride_gwn + o_k64[None, :] * stride_gwk
        p_gl = gl_ptr + o_n64[:, None] * stride_gln + o_k64[None, :] * stride_glk
        tl.store(p_gw, acc_w.to(gw_ptr.dtype.element_ty), mask=m_nk)
        tl.store(p_gl, b_gl.to(gl_ptr.dtype.element_ty), mask=m_nk)
        if pid_k == 0:
            tl.store(gb_ptr + o_n, acc_b.to(gb_ptr.dtype.element_ty), mask=m_n)
