"""The ``triton`` backend of ``kl_sparse_vd``: the launcher of the fused KL kernel in
:mod:`sparsevd.triton_kernels.kl` (value and gradients of every layer of a dtype in one launch),
with the signature and return convention of :mod:`sparsevd.ops.kl.naive`.

Kernel launches per call: 1 kernel for all the layers of a dtype, plus the sum of its per-block
partials. Imported by :mod:`sparsevd.ops.backend` on first use of the triton backend; an
ImportError here (no triton) makes the backend unavailable.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import triton

from sparsevd.triton_kernels import kl as KK

from ..backend import register_impl
from ..triton_common import elementwise_block


# ------------------------------------------------------------------------------------------ KL
_TABLES: Dict[tuple, torch.Tensor] = {}
_TABLES_MAX = 64


def _layer_table(key: tuple, rows: List[List[int]], device: torch.device) -> torch.Tensor:
    """The int64 layer table on ``device``, cached by its content (the parameters of a model and
    the gradient buffers the allocator hands out usually repeat from one step to the next)."""
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _TABLES[key] = table
    return table


def _kl_group(ws, ls, with_grad: bool, thresholds: Optional[List[float]] = None):
    """KL sum (acc dtype, 0-dim), gradients and (with ``thresholds``) the int64 kept counts of
    layers that share one dtype, one launch."""
    dtype = ws[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    block, warps = elementwise_block(dtype)
    ws_c = [w.contiguous() for w in ws]
    ls_c = [s.contiguous() for s in ls]
    gws = [torch.empty(w.shape, dtype=dtype, device=w.device) for w in ws_c] if with_grad else []
    gls = [torch.empty(s.shape, dtype=dtype, device=s.device) for s in ls_c] if with_grad else []
    base = ws_c[0]
    esize = base.element_size()
    rows, first, ptrs = [], 0, []
    for i, (w, s) in enumerate(zip(ws_c, ls_c)):
        tensors = (w, s, gws[i], gls[i]) if with_grad else (w, s, w, s)
        offs = []
        for t in tensors:
            d = t.data_ptr() - base.data_ptr()
            if d % esize:
                raise RuntimeError("kl_sparse_vd: a parameter is not aligned to its element size")
            offs.append(d // esize)
            ptrs.append(t.data_ptr())
        rows.append([w.numel(), first, *offs])
        first += triton.cdiv(w.numel(), block)
    kl = torch.zeros((), dtype=acc, device=base.device)
    count = thresholds is not None
    kept = torch.zeros(len(rows) if count else 0, dtype=torch.int64, device=base.device)
    if first > 0:
        align = 16 // esize
        aligned = all(p % 16 == 0 for p in ptrs)
        table = _layer_table((tuple(ptrs), tuple(r[0] for r in rows), block), rows, base.device)
        partial = torch.empty(first, dtype=acc, device=base.device)
        # without COUNT the kernel reads no threshold and writes no count: any pointers do
        thr = torch.tensor(thresholds, dtype=acc).to(base.device) if count else partial
        KK.kl_sparse_vd_kernel[(first,)](
            base, table, partial, len(rows), thr, kept if count else table,
            ACC_F64=acc == torch.float64, WITH_GRAD=with_grad, ALIGN=align if aligned else 1,
            L_PAD=max(triton.next_power_of_2(len(rows)), 2), BLOCK=block, COUNT=count, num_warps=warps,
        )
        kl = partial.sum()
    return kl, gws, gls, kept



def triton_kl_sparse_vd(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool):
    """(Σ_layers KL, [∂KL/∂θ], [∂KL/∂log σ²]) as :func:`sparsevd.ops.kl.naive.naive_kl_sparse_vd`: the KL in
    promote(weights[0].dtype, fp32), the gradients in each parameter's dtype and shape ([] when
    not ``with_grad``). One kernel launch per parameter dtype (one for a usual model), plus the sum
    of the per-block partial sums."""
    return triton_kl_sparse_vd_kept(weights, log_sigma2s, with_grad, None)[:3]


def triton_kl_sparse_vd_kept(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool,
                             thresholds: Optional[List[float]]):
    """:func:`triton_kl_sparse_vd`'s outputs and kept, int64 (num_layers,) on the parameters'
    device: the weights kept at evaluation per layer (:func:`sparsevd.ops.kl.naive.naive_kept_mask`),
    counted by the same launch (empty when ``thresholds`` is None)."""
    device = weights[0].device
    groups: Dict[torch.dtype, List[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    out_dtype = torch.promote_types(weights[0].dtype, torch.float32)
    total = torch.zeros((), dtype=out_dtype, device=device) if len(groups) > 1 else None
    grads_w: List[Optional[torch.Tensor]] = [None] * len(weights)
    grads_l: List[Optional[torch.Tensor]] = [None] * len(weights)
    count = thresholds is not None
    kept = torch.zeros(len(weights) if count else 0, dtype=torch.int64, device=device)
    for idx in groups.values():
        kl, gws, gls, k = _kl_group([weights[i] for i in idx], [log_sigma2s[i] for i in idx], with_grad,
                                    [thresholds[i] for i in idx] if count else None)
        if count:
            kept = k if len(groups) == 1 else kept.index_copy(0, torch.tensor(idx, device=device), k)
        total = kl.to(out_dtype) if total is None else total + kl.to(out_dtype)
        for j, i in enumerate(idx if with_grad else []):
            grads_w[i] = _like(gws[j], weights[i])
            grads_l[i] = _like(gls[j], log_sigma2s[i])
    if not with_grad:
        return total, [], [], kept
    return total, grads_w, grads_l, kept


def _like(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """g (contiguous) in the layout torch.empty_like(t) would have (what the fake impl promises)."""
    if t.is_contiguous():
        return g
    return torch.empty_like(t).copy_(g)


register_impl("kl_sparse_vd", "triton", triton_kl_sparse_vd)
register_impl("kl_sparse_vd_kept", "triton", triton_kl_sparse_vd_kept)
