"""The math of ``csr_linear`` in plain PyTorch: :func:`naive_csr_linear`, the product with
``torch.sparse`` (the fallback where the compiled kernels are missing, and an oracle of the
tests beside the dense product with the zero-filled weight, :func:`~.format.csr_to_dense`).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .format import check_input, validate_csr

__all__ = ["naive_csr_linear"]


def naive_csr_linear(
    x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """The product of :func:`~.op.csr_linear` with torch.sparse (the fallback without sparsevd._C).

    Same arguments, result and non-finite semantics; computed in fp32 for fp16/bf16 on the CPU.
    Validates everything, index data included (a sync on CUDA), before building the torch.sparse
    tensor without its own checks: O(nnz), below the O(nnz·M) product.

    Raises:
        TypeError / ValueError: as :func:`~.op.csr_linear` (naming the argument).
    """
    check_input(x, values)
    validate_csr(crow_indices, col_indices, values, x.shape[-1], bias, check_indices=True)
    k = x.shape[-1]
    n = crow_indices.numel() - 1
    x2 = x.reshape(-1, k)
    dt = values.dtype
    cdt = torch.float32 if (x.device.type == "cpu" and dt in (torch.float16, torch.bfloat16)) else dt
    crow, col = crow_indices.long(), col_indices.long()

    def csr(v: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(crow, col, v, size=(n, k), device=values.device,
                                       check_invariants=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        y = torch.sparse.mm(csr(values.to(cdt)), x2.to(cdt).t()).t()
        nonfinite = ~torch.isfinite(x2)
        if bool(nonfinite.any()):  # rare: NaN where a non-finite input meets an unstored weight
            hits = torch.sparse.mm(csr(torch.ones_like(values, dtype=torch.float64)),
                                   nonfinite.t().double()).t()  # (M, N) non-finite inputs read
            y = y.masked_fill(hits < nonfinite.sum(-1, keepdim=True), float("nan"))
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(dt).reshape(*x.shape[:-1], n)
