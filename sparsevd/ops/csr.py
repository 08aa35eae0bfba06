"""``sparsevd::csr_linear``: y = x Wᵀ + b with W stored in CSR form, the deployed layers' matmul.

The op is defined schema-first in C++ (``csrc/ops.cpp``, ``TORCH_LIBRARY(sparsevd, m)``) and
implemented in ``csrc/cpu`` (OpenMP + AVX2) and ``csrc/cuda`` (subwarp-per-row kernels); this module
loads the compiled library ``sparsevd._C``, registers the op's fake (meta) implementation, and
provides :func:`csr_linear`, the checked entry point (the library is loaded by
:mod:`sparsevd.ops.library`). Without the compiled library the package
still imports: :func:`csr_linear` then computes the same product with ``torch.sparse`` (slower) and
warns once, saying how to build the extension.

Semantics (docs/design.md, "Deployment"): the result is what the dense product with the
zero-filled W computes in IEEE arithmetic, non-finite inputs included: 0·NaN = 0·±inf = NaN, so
an output is NaN when one of the input row's non-finite values meets a weight that is not
stored, at every batch size and in every implementation (kernels and fallback), up to rounding.

Memory safety: the compiled kernels check the index data themselves (the CPU kernel raises a
RuntimeError naming the bad entry; the CUDA kernels cannot raise without a host sync, so they
skip a bad row range or column and write NaN into the outputs it affects); the fallback validates
before building its torch.sparse tensor. :func:`validate_csr` gives the clearer ValueError first.

Source: the deployment step of Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep
Neural Networks", ICML 2017 (arXiv:1701.05369): weights with log α ≥ 3 are dropped, what remains is
stored sparse.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import library

INDEX_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64)
CROW_DTYPES = (torch.int32, torch.int64)
#: Largest in_features that uint16 column indices (what :func:`~sparsevd.nn.sparse.to_csr` writes
#: for in_features ≤ 65536: 2 bytes per stored weight) can address.
UINT16_MAX_FEATURES = 65536
#: Largest in_features that int16 column indices (read, e.g. from older files) can address.
INT16_MAX_FEATURES = 32768

_warned = False

__all__ = [
    "csr_linear",
    "csr_linear_torch",
    "csr_to_dense",
    "validate_csr",
    "warn_fallback",
]


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


if library.available():

    @torch.library.register_fake("sparsevd::csr_linear")
    def _csr_linear_fake(x, crow_indices, col_indices, values, bias):
        torch._check(crow_indices.dim() == 1, lambda: "crow_indices must be 1-D")
        torch._check(x.dim() >= 1, lambda: "x must have at least 1 dimension")
        return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))


def csr_to_dense(crow_indices: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                 in_features: int) -> Tensor:
    """The zero-filled dense W (out_features, in_features) of a CSR weight, in ops that trace:
    ``torch.export`` keeps the sizes symbolic-free (no data-dependent shape) and ONNX gets
    ScatterElements (add), CumSum and ScatterND, which onnxruntime folds into a constant when the
    CSR is one (the deployed layers' ONNX form, see :mod:`sparsevd.export`).

    The row of nonzero j is the number of rows that end at or before j: a histogram of
    crow[1:] over [0, nnz], summed up. Expects a valid CSR (:func:`validate_csr`); out-of-range
    indices raise in torch's indexing (never a read out of bounds).

    Returns:
        (out_features, in_features) tensor of ``values``' dtype and device.
    """
    nnz = values.shape[0]
    crow = crow_indices.long()
    # new_zeros / new_ones: ONNX ConstantOfShape, which exporters keep as it is (a zero-filled
    # (out, in) constant would make the file bigger than the dense layer)
    ends = crow.new_zeros(nnz + 1).scatter_add(0, crow[1:], crow.new_ones(out_features))
    rows = ends.cumsum(0)[:nnz]
    flat = rows * in_features + col_indices.long()
    w = values.new_zeros(out_features * in_features)
    return w.index_put((flat,), values).view(out_features, in_features)


def _name_dtype(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def validate_csr(
    crow_indices: Tensor,
    col_indices: Tensor,
    values: Tensor,
    in_features: int,
    bias: Optional[Tensor] = None,
    check_indices: bool = True,
) -> int:
    """Check a CSR weight (out_features, in_features) and its bias; return out_features.

    Args:
        crow_indices: (out_features + 1,) int32 or int64, crow[0] = 0, non-decreasing, crow[-1] = nnz.
        col_indices: (nnz,) uint16 (in_features ≤ 65536), int16 (in_features ≤ 32768), int32 or
            int64, each in [0, in_features).
        values: (nnz,) floating.
        in_features: K, the number of columns of W.
        bias: (out_features,) of ``values``' dtype, or None.
        check_indices: also read the index data (crow monotone and bounds, column range); this
            synchronizes with the GPU for CUDA tensors. Meta tensors have no data: skipped.

    Raises:
        TypeError: a non-tensor argument or a wrong dtype (the message names the argument).
        ValueError: a wrong shape, length or device, or indices out of range.
    """
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices), ("values", values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"values: expected a floating-point tensor, got dtype {values.dtype}")
    if crow_indices.dtype not in CROW_DTYPES:
        raise TypeError(
            f"crow_indices: expected dtype {_name_dtype(CROW_DTYPES)}, got {crow_indices.dtype}"
        )
    if col_indices.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"col_indices: expected dtype {_name_dtype(INDEX_DTYPES)}, got {col_indices.dtype}"
        )
    for dt, most in ((torch.int16, INT16_MAX_FEATURES), (torch.uint16, UINT16_MAX_FEATURES)):
        if col_indices.dtype == dt and in_features > most:
            raise TypeError(
                f"col_indices: {str(dt).replace('torch.', '')} indices address at most {most} input "
                f"features, got in_features={in_features}; use int32"
            )
    if crow_indices.numel() < 1:
        raise ValueError("crow_indices: expected out_features + 1 >= 1 entries, got an empty tensor")
    nnz = values.numel()
    if col_indices.numel() != nnz:
        raise ValueError(
            f"col_indices: expected nnz = len(values) = {nnz} entries, got {col_indices.numel()}"
        )
    device = values.device
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of values), got {t.device}")
    n = crow_indices.numel() - 1
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != values.dtype:
            raise TypeError(f"bias: expected dtype {values.dtype} (the dtype of values), got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected shape ({n},) (out_features), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias: expected a tensor on {device} (the device of values), got {bias.device}")
    if check_indices and device.type != "meta" and not torch.compiler.is_compiling():
        crow = crow_indices.long()
        first, last = int(crow[0]), int(crow[-1])
        if first != 0 or last != nnz:
            raise ValueError(
                f"crow_indices: expected crow[0] = 0 and crow[-1] = nnz = {nnz}, got {first} and {last}"
            )
        if n > 0 and bool((crow[1:] < crow[:-1]).any()):
            raise ValueError("crow_indices: expected a non-decreasing sequence (row lengths >= 0)")
        if nnz > 0:
            col = col_indices.int() if col_indices.dtype == torch.uint16 else col_indices  # no min/max
            lo, hi = int(col.min()), int(col.max())
            if lo < 0 or hi >= in_features:
                raise ValueError(
                    f"col_indices: expected values in [0, in_features={in_features}), found range "
                    f"[{lo}, {hi}]"
                )
    return n


def _check_x(x: Tensor, values: Tensor) -> None:
    """The checks of x shared by csr_linear and csr_linear_torch (values is checked after)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected shape (*, in_features), got a 0-dim tensor")
    if x.is_meta:
        raise ValueError("x: expected a tensor with data, got a meta tensor (csr_linear reads x)")
    if isinstance(values, Tensor) and values.is_floating_point() and values.dtype != x.dtype:
        raise TypeError(f"values: expected dtype {x.dtype} (the dtype of x), got {values.dtype}")
    if isinstance(values, Tensor) and values.device != x.device:
        raise ValueError(f"values: expected a tensor on {x.device} (the device of x), got {values.device}")


def csr_linear_torch(
    x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """The product of :func:`csr_linear` with torch.sparse (the fallback without sparsevd._C).

    Same arguments, result and non-finite semantics; computed in fp32 for fp16/bf16 on the CPU.
    Validates everything, index data included (a sync on CUDA), before building the torch.sparse
    tensor without its own checks: O(nnz), below the O(nnz·M) product.

    Raises:
        TypeError / ValueError: as :func:`csr_linear` (naming the argument).
    """
    _check_x(x, values)
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
        check_indices: validate the index data too (see :func:`validate_csr`), for a ValueError
            naming the bad entry; turn off in hot loops (it reads the indices, a sync on GPU):
            the kernels still never read out of bounds (module docstring).

    Returns:
        y, (*, out_features), dtype of x, on x's device: ``F.linear(x, W_dense, bias)`` with W_dense
        the zero-filled W, in IEEE arithmetic (non-finite inputs: see the module docstring), up to
        rounding. Column indices within a row are assumed distinct (as :func:`to_csr` writes them).

    Raises:
        TypeError: wrong dtype of any argument (named in the message).
        ValueError: wrong shape, device, crow length or column range (named in the message), or a
            meta tensor x (the product reads x).
        RuntimeError: bad index data that reached the CPU kernel with ``check_indices=False``.

    Runs the compiled kernels of sparsevd._C (CPU: OpenMP + AVX2; CUDA when built with it); without
    them, :func:`csr_linear_torch` with a one-time warning. Inference only: no autograd formula.
    """
    _check_x(x, values)
    if library.kernel_available(x.device):
        validate_csr(crow_indices, col_indices, values, x.shape[-1], bias, check_indices)
        return torch.ops.sparsevd.csr_linear(x, crow_indices, col_indices, values, bias)
    warn_fallback()
    return csr_linear_torch(x, crow_indices, col_indices, values, bias)  # validates everything
