"""The CSR format of ``csr_linear``'s weight: building it (:func:`to_csr`), checking it
(:func:`validate_csr`, :func:`check_input`), the columns it uses (:func:`used_columns`) and the
zero-filled dense weight it stands for (:func:`csr_to_dense`).

A weight W (out_features, in_features) is stored as crow_indices (out_features + 1,) int32 or int64
row pointers, col_indices (nnz,) uint16 (in_features ≤ 65536), int16 (≤ 32768), int32 or int64,
and values (nnz,) floating: row r of W holds the nonzeros crow[r] .. crow[r+1]-1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..checks import check_device_of, check_dtype_of, check_float, check_tensor

__all__ = ["CROW_DTYPES", "INDEX_DTYPES", "INT16_MAX_FEATURES", "UINT16_MAX_FEATURES", "check_input",
           "csr_to_dense", "to_csr", "used_columns", "validate_csr"]

INDEX_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64)
CROW_DTYPES = (torch.int32, torch.int64)
#: Largest in_features that uint16 column indices (what :func:`to_csr` writes for
#: in_features ≤ 65536: 2 bytes per stored weight) can address.
UINT16_MAX_FEATURES = 65536
#: Largest in_features that int16 column indices (read, e.g. from older files) can address.
INT16_MAX_FEATURES = 32768


def to_csr(
    weight: Tensor, index_dtype: Optional[torch.dtype] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR form of a 2-D weight (its zeros dropped): (crow_indices, col_indices, values).

    Args:
        weight: (out_features, in_features), any floating dtype and device.
        index_dtype: dtype of the column indices; default uint16 when in_features ≤ 65536 (half
            the index bytes), else int32 (int64 beyond 2³¹ columns).

    Returns:
        crow_indices (out_features + 1,) int32 (int64 when nnz ≥ 2³¹), col_indices (nnz,),
        values (nnz,) in the dtype of ``weight``, nonzeros in row-major order.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if index_dtype is None:
        index_dtype = torch.uint16 if k <= 65536 else (torch.int32 if k < 2**31 else torch.int64)
    rows, cols = weight.nonzero(as_tuple=True)
    values = weight[rows, cols].contiguous()
    counts = torch.bincount(rows, minlength=n) if rows.numel() else torch.zeros(n, dtype=torch.long,
                                                                               device=weight.device)
    crow = torch.zeros(n + 1, dtype=torch.long, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    crow_dtype = torch.int32 if values.numel() < 2**31 else torch.int64
    return crow.to(crow_dtype), cols.to(index_dtype).contiguous(), values


def used_columns(col_indices: Tensor, in_cols: int) -> Tensor:
    """(in_cols,) bool: the columns that hold at least one stored weight. One scatter over the
    column indices (O(nnz); torch.unique sorts them, ~20 ms for 10⁵ indices)."""
    used = torch.zeros(in_cols, dtype=torch.bool, device=col_indices.device)
    if col_indices.numel():
        used[col_indices.long()] = True
    return used


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
        check_tensor(t, name)
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    check_float(values, "values")
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
        check_device_of(t, name, values, "values")
    n = crow_indices.numel() - 1
    if bias is not None:
        check_tensor(bias, "bias", optional=True)
        check_dtype_of(bias, "bias", values, "values")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected shape ({n},) (out_features), got {tuple(bias.shape)}")
        check_device_of(bias, "bias", values, "values")
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


def check_input(x: Tensor, values: Tensor) -> None:
    """Check x of a CSR product against ``values`` (its dtype and device); the CSR itself is
    checked after (:func:`validate_csr`).

    Raises:
        TypeError: x not a floating tensor, or values of another dtype (named in the message).
        ValueError: a 0-dim or meta x, or values on another device.
    """
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected shape (*, in_features), got a 0-dim tensor")
    if x.is_meta:
        raise ValueError("x: expected a tensor with data, got a meta tensor (csr_linear reads x)")
    if isinstance(values, Tensor) and values.is_floating_point():
        check_dtype_of(values, "values", x, "x")
    if isinstance(values, Tensor):
        check_device_of(values, "values", x, "x")
