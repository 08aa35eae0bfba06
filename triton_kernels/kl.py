"""Triton kernel of the sparse-VD KL (Molchanov, Ashukha, Vetrov, ICML 2017, eq. 8 and eq. 14) for
all the layers of a model in one launch.

Per weight, with raw = log σ² − log(θ² + 1e-8) and log α = clamp(raw, −10, 10)::

    KL      = k1 − k1·sigmoid(k2 + k3·log α) + ½·log1p(exp(−log α))
    ∂KL/∂log α = −(k1·k3·s·(1 − s) + ½·sigmoid(−log α)),   s = sigmoid(k2 + k3·log α)
    ∂KL/∂log σ² = ∂KL/∂log α · [−10 < raw < 10]
    ∂KL/∂θ     = ∂KL/∂log σ² · (−2θ / (θ² + 1e-8))

With COUNT, each program also adds to ``kept_ptr[layer]`` (int64) the number of its weights kept
at evaluation: log α < the layer's threshold (``thr_ptr[layer]``, in the compute dtype), or θ not
finite, or log σ² NaN or ≥ LOG_MAX (e^{log σ²} = inf): the rule of sparsevd.ops.kl.naive.naive_kept_mask,
from the log α computed for the KL (issue 23 item 7).

Launcher: :mod:`sparsevd.ops.kl.triton`.
"""
import triton
import triton.language as tl

K1 = tl.constexpr(0.63576)
K2 = tl.constexpr(1.87320)
K3 = tl.constexpr(1.48695)
#: log α is clamped to [−LOG_ALPHA_CLAMP, LOG_ALPHA_CLAMP].
LOG_ALPHA_CLAMP = tl.constexpr(10.0)
#: Added to θ² inside log(θ² + EPS_THETA).
EPS_THETA = tl.constexpr(1e-8)
#: Columns of the layer table: numel, first block, and the element offsets of θ, log σ², ∂θ,
#: ∂log σ² from ``base_ptr``.
TABLE_COLS = tl.constexpr(6)


#: log of the largest finite fp32 / fp64.
LOG_MAX_F32 = tl.constexpr(88.72283935546875)
LOG_MAX_F64 = tl.constexpr(709.782712893384)


@triton.jit
def kl_sparse_vd_kernel(
    base_ptr, table_ptr, partial_ptr, n_layers, thr_ptr, kept_ptr,
    ACC_F64: tl.constexpr, WITH_GRAD: tl.constexpr, ALIGN: tl.constexpr,
    L_PAD: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr = False,
):
    """KL of BLOCK weights of one layer, and its gradients when WITH_GRAD.

    One program per block of BLOCK weights of every layer: the layer is found in the table
    (int64, [n_layers, 6]: numel, first block, then the element offsets of θ, log σ², ∂θ and
    ∂log σ² from ``base_ptr``, all tensors of base_ptr's dtype). Writes the block's KL sum to
    partial_ptr[pid] (the launcher sums the partials) and, when WITH_GRAD, ∂KL/∂θ and ∂KL/∂log σ².
    θ and log σ² are read once. ALIGN: every offset is a multiple of ALIGN elements (16 bytes), so
    the loads of full blocks vectorize (only a layer's last block is masked).
    log1p(z) is Goldberg's log(u)·z/(u − 1), u = 1 + z (accurate for small z), and 1 − s is
    e^{−z}·s, z = k2 + k3·log α (no cancellation where s → 1, log α → 10).
    Grid: Σ_layers cdiv(numel, BLOCK).
    """
    if ACC_F64:
        CDT = tl.float64
    else:
        CDT = tl.float32
    pid = tl.program_id(0)

    o_l = tl.arange(0, L_PAD)  # [L_PAD]
    b_first = tl.load(table_ptr + o_l * TABLE_COLS + 1, mask=o_l < n_layers, other=2**62)
    layer = tl.sum((b_first <= pid).to(tl.int32), axis=0) - 1  # last layer starting at or before pid
    p_row = table_ptr + layer * TABLE_COLS
    numel = tl.load(p_row)
    block = pid - tl.load(p_row + 1)
    p_w = base_ptr + tl.multiple_of(tl.load(p_row + 2), ALIGN)
    p_l = base_ptr + tl.multiple_of(tl.load(p_row + 3), ALIGN)

    o = block * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    m = o < numel
    full = (block + 1) * BLOCK <= numel
    if full:  # unmasked, vectorized loads
        b_w = tl.load(p_w + o).to(CDT)  # [BLOCK]
        b_l = tl.load(p_l + o).to(CDT)  # [BLOCK]
    else:
        b_w = tl.load(p_w + o, mask=m, other=1.0).to(CDT)  # [BLOCK]
        b_l = tl.load(p_l + o, mask=m, other=0.0).to(CDT)  # [BLOCK]

    b_t2 = b_w * b_w + EPS_THETA
    b_raw = b_l - tl.log(b_t2)
    b_la = tl.minimum(tl.maximum(b_raw, -LOG_ALPHA_CLAMP), LOG_ALPHA_CLAMP)
    b_ez = tl.exp(-(b_la * K3 + K2))
    b_s = 1.0 / (1.0 + b_ez)  # s = sigmoid(k2 + k3 log α)
    b_1ms = b_ez * b_s  # 1 − s without the cancellation of 1 − s near s = 1
    b_e = tl.exp(-b_la)  # ≤ e^10
    b_u = 1.0 + b_e
    b_log1p = tl.where(b_u == 1.0, b_e, tl.log(b_u) * (b_e / (b_u - 1.0)))
    b_kl = b_1ms * K1 + 0.5 * b_log1p
    tl.store(partial_ptr + pid, tl.sum(tl.where(m, b_kl, 0.0), axis=0))

    if COUNT:
        thr = tl.load(thr_ptr + layer)
        if ACC_F64:
            log_max = LOG_MAX_F64
        else:
            log_max = LOG_MAX_F32
        # θ − θ is NaN exactly where θ is; NaN log σ² fails l < log_max
        b_keep = (b_la < thr) | ~((b_w - b_w) == 0.0) | ~(b_l < log_max)
        tl.atomic_add(kept_ptr + layer, tl.sum((b_keep & m).to(tl.int64), axis=0))

    if WITH_GRAD:
        p_gw = base_ptr + tl.multiple_of(tl.load(p_row + 4), ALIGN)
        p_gl = base_ptr + tl.multiple_of(tl.load(p_row + 5), ALIGN)
        b_dla = -(b_s * b_1ms * (K1 * K3) + 0.5 * (b_e / b_u))
        inside = (b_raw > -LOG_ALPHA_CLAMP) & (b_raw < LOG_ALPHA_CLAMP)
        b_gl = tl.where(inside, b_dla, 0.0)
        b_gw = b_gl * (-2.0 * b_w / b_t2)
        if full:
            tl.store(p_gw + o, b_gw.to(p_gw.dtype.element_ty))
            tl.store(p_gl + o, b_gl.to(p_gl.dtype.element_ty))
        else:
            tl.store(p_gw + o, b_gw.to(p_gw.dtype.element_ty), mask=m)
            tl.store(p_gl + o, b_gl.to(p_gl.dtype.element_ty), mask=m)
