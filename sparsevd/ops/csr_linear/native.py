"""The ``native`` backend of ``csr_linear``: the compiled kernels of ``sparsevd._C``, CPU
(csrc/cpu/csr_linear_cpu.cpp: OpenMP + AVX2) and CUDA (csrc/cuda/csr_linear_kernels.cu:
subwarp-per-row kernels), one op ``torch.ops.sparsevd.csr_linear`` (schema in csrc/ops.cpp,
argument checks in csrc/csr_linear_checks.h).

Imported by :mod:`.op` (the family's dispatcher) only, when the library runs on the input's
device; importing it raises ImportError when the compiled library or the op is missing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import library

library.require_ops("csr_linear")

__all__ = ["native_csr_linear"]


def native_csr_linear(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                      bias: Optional[Tensor]) -> Tensor:
    """``torch.ops.sparsevd.csr_linear``: arguments as :func:`~.op.csr_linear`, whose checks the
    caller has run (the kernels check what they read themselves: the module docstring of
    :mod:`.op`)."""
    return torch.ops.sparsevd.csr_linear(x, crow_indices, col_indices, values, bias)
