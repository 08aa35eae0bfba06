"""The plan of a deployed layer: which product (mode) runs at which batch size, and the weight
storage it needs (docs/design.md, "Deployment").

A plan is a mode name or pairs (max_batch, mode); :func:`normalize_plan` gives the canonical form
(:data:`Plan`). The modes: ``"csr"`` (the sparse kernel :func:`sparsevd.ops.csr_linear`),
``"dense"`` (the used input columns gathered, then a dense product), ``"masked"`` (the dense product
with the zero-filled weight; linear only). :func:`storage_for`: a plan with a ``"csr"`` mode stores
the CSR buffers, any other the zero-filled dense weight.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

__all__ = ["CONV_MODES", "LINEAR_MODES", "Plan", "dense_plan", "normalize_plan", "storage_for"]

LINEAR_MODES = ("csr", "dense", "masked")
CONV_MODES = ("csr", "dense")
#: A plan: ((max_batch, mode), ...) in increasing max_batch; the last max_batch is None (no bound).
Plan = Tuple[Tuple[Optional[int], str], ...]


def normalize_plan(plan, modes: Sequence[str]) -> Plan:
    """Validate a plan (a mode name, or pairs (max_batch, mode)) and return it as a tuple of pairs
    sorted by max_batch, the last one unbounded (None); adjacent equal modes merged."""
    if isinstance(plan, str):
        plan = [(None, plan)]
    pairs = []
    for item in plan:
        try:
            bound, mode = item
        except (TypeError, ValueError):
            raise ValueError(f"plan: expected pairs (max_batch, mode), got {item!r}") from None
        if mode not in modes:
            raise ValueError(f"plan: unknown mode {mode!r}; expected one of {', '.join(modes)}")
        if bound is not None and (not isinstance(bound, int) or bound < 0):
            raise ValueError(f"plan: max_batch must be a non-negative int or None, got {bound!r}")
        pairs.append((bound, mode))
    if not pairs:
        raise ValueError("plan: expected at least one (max_batch, mode) pair")
    pairs.sort(key=lambda p: math.inf if p[0] is None else p[0])
    pairs[-1] = (None, pairs[-1][1])
    merged = []
    for bound, mode in pairs:
        if merged and merged[-1][1] == mode:
            merged[-1] = (bound, mode)
        else:
            merged.append((bound, mode))
    return tuple(merged)


def storage_for(plan: Plan) -> str:
    """The weight format a plan needs: ``"csr"`` when one of its modes is ``"csr"`` (the kernel
    reads the CSR buffers), else ``"dense"`` (a zero-filled dense ``weight`` buffer)."""
    return "csr" if any(mode == "csr" for _, mode in plan) else "dense"


def dense_plan(plan, groups: int) -> bool:
    """Whether a layer built with ``plan`` (None: the default, CSR unless groups > 1) stores its
    weight dense: from_dense then skips building a CSR."""
    if plan is None:
        return groups != 1
    try:
        return storage_for(normalize_plan(plan, LINEAR_MODES)) == "dense"
    except ValueError:
        return False  # the constructor names the error
