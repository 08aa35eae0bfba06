"""``sparsevd::csr_linear``: y = x Wᵀ + b with W stored in CSR form, the deployed layers' matmul.

The op is defined schema-first in C++ (``csrc/ops.cpp``, ``TORCH_LIBRARY(sparsevd, m)``) and
implemented in ``csrc/cpu`` (OpenMP + AVX2) and ``csrc/cuda`` (subwarp-per-row kernels), called
through :mod:`.native`; this module registers the op's fake (meta) implementation and provides
:func:`csr_linear`, the checked entry point and the family's dispatcher (the library is loaded by
:mod:`sparsevd.ops.library`). Without the compiled library the package still imports:
:func:`csr_linear` then computes the same product with ``torch.sparse`` (:mod:`.naive`, slower)
and warns once, saying how to build the extension.

Semantics (docs/design.md, "Deployment"): the result is what the dense product with the
zero-filled W computes in IEEE arithmetic, non-finite inputs included: 0·NaN = 0·±inf = NaN, so
an output is NaN when one of the input row's non-finite values meets a weight that is not
stored, at every batch size and in every implementation (kernels and fallback), up to rounding.

Memory safety: the compiled kernels check the index data themselves (the CPU kernel raises a
RuntimeError naming the bad entry; the CUDA kernels cannot raise without a host sync, so they
skip a bad row range or column and write NaN into the outputs it affects); the fallback validates
before building its torch.sparse tensor. :func:`~.format.validate_csr` gives the clearer ValueError
first.

Source: the deployment step of Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep
Neural Networks", ICML 2017 (arXiv:1701.05369): weights with log α ≥ 3 are dropped, what remains is
stored sparse.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import library
from .format import check_input, validate_csr
from .naive import naive_csr_linear

_warned = False
_NATIVE: Optional[Callable] = None

__all__ = ["csr_linear", "warn_fallback"]


def warn_fallback(what: str = "sparsevd.ops.csr_linear") -> None:
    """Warn (once per process) that ``what`` runs on torch because the extension is missing."""
    global _warned
    if _warned:
        return
    _warned = True
    why = library.unavailable_reason() or "it was built without CUDA kernels"
    warnings.warn(
        f"{what}: the compiled sparsevd._C kernels are not available ({why}); falling back to "
        f"torch (dense / torch.sparse) kernels, which are slower. To get them, {library.BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )


def _native() -> Callable:
    """:func:`.native.native_csr_linear` (this family's backend module, imported here only, when
    the compiled library is loaded)."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = importlib.import_module("sparsevd.ops.csr_linear.native").native_csr_linear
    return _NATIVE


if library.available():

    @torch.library.register_fake("sparsevd::csr_linear")
    def _csr_linear_fake(x, crow_indices, col_indices, values, bias):
        torch._check(crow_indices.dim() == 1, lambda: "crow_indices must be 1-D")
        torch._check(x.dim() >= 1, lambda: "x must have at least 1 dimension")
        return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))

    try:
        _native()  # imported now: a call that torch.compile traces never imports
    except ImportError:
        pass  # a library without the op (stale): the first call raises, naming it


def csr_linear(
    x: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    bias: Optional[Tensor] = None,
    *,
    check_indices: bool = True,
) -> Tensor:
    """y = x Wᵀ + b with W (out_features, in_features) in CSR form (``torch.ops.sparsevd.csr_linear``).

    Args:
        x: (*, in_features), floating (fp32, fp64; fp16/bf16 computed in fp32), any strides.
        crow_indices: (out_features + 1,) int32 or int64 row pointers: row r of W holds the
            nonzeros crow[r] .. crow[r+1]-1.
        col_indices: (nnz,) uint16 (in_features ≤ 65536), int16 (≤ 32768), int32 or int64 column
            of each nonzero.
        values: (nnz,) the nonzeros, dtype of x.
        bias: (out_features,) dtype of x, or None.
        check_indices: validate the index data too (see :func:`~.format.validate_csr`), for a ValueError
            naming the bad entry; turn off in hot loops (it reads the indices, a sync on GPU):
            the kernels still never read out of bounds (module docstring).

    Returns:
        y, (*, out_features), dtype of x, on x's device: ``F.linear(x, W_dense, bias)`` with W_dense
        the zero-filled W, in IEEE arithmetic (non-finite inputs: see the module docstring), up to
        rounding. Column indices within a row are assumed distinct (as :func:`~.format.to_csr` writes them).

    Raises:
        TypeError: wrong dtype of any argument (named in the message).
        ValueError: wrong shape, device, crow length or column range (named in the message), or a
            meta tensor x (the product reads x).
        RuntimeError: bad index data that reached the CPU kernel with ``check_indices=False``.

    Runs the compiled kernels of sparsevd._C (CPU: OpenMP + AVX2; CUDA when built with it); without
    them, :func:`~.naive.naive_csr_linear` with a one-time warning. Inference only: no autograd formula.
    """
    check_input(x, values)
    if library.kernel_available(x.device):
        validate_csr(crow_indices, col_indices, values, x.shape[-1], bias, check_indices)
        return _native()(x, crow_indices, col_indices, values, bias)
    warn_fallback()
    return naive_csr_linear(x, crow_indices, col_indices, values, bias)  # validates everything
