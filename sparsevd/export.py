"""ONNX export of deployed models: ``sparsevd::csr_linear`` in standard ONNX ops.

``torch.onnx.export(deployed_model, args, path)`` works as it is, with either exporter: while
exporting (``torch.onnx.is_in_onnx_export()``), a deployed layer whose plan runs the CSR kernel
computes its product as ``F.linear`` (``F.conv2d``) on the dense weight rebuilt from its CSR
buffers (:func:`sparsevd.ops.csr_linear.format.csr_to_dense`). The ONNX graph holds the CSR tensors (so the
file is about the CSR's size, not the dense weight's) and rebuilds W with ScatterElements (add),
CumSum, ConstantOfShape and ScatterND; onnxruntime folds that subgraph of constants into a dense
initializer when the session is created, then runs one MatMul / Gemm / Conv per layer: exactly the
dense layer with the zero-filled weight (IEEE semantics included), at the dense layer's speed.
Layers planned dense export as the plain F.linear / F.conv2d.

Why not a sparse product in onnxruntime: measured on a 2-core AMD EPYC (onnxruntime 1.32, one
thread), the CSR product in standard ops (x gathered per nonzero, multiplied, ScatterElements-added
per output row) was 1.0–20x slower than the folded dense MatMul at 90–98 % sparsity on 1536x384
and 4096x4096 weights, batches 1–512 (benchmarks/NOTES.md, "ONNX"); onnxruntime's sparse contrib
op (com.microsoft SparseToDenseMatMul) needs a sparse tensor input, which the exporters do not
produce. The sparse speed-up stays with the PyTorch model and ``torch.export``, where the op runs
as it is.

For graphs that already hold the op (``torch.onnx.export`` of a ``torch.export.ExportedProgram``
of a deployed model), :func:`onnx_translation_table` gives its translation into the same ONNX ops,
and :func:`export_onnx` passes it, with a dynamic batch dimension.

The TorchScript-based exporter (``dynamo=False``, deprecated in torch) cannot store uint16 tensors:
CSR layers with uint16 column indices raise a TypeError there that says what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["export_onnx", "onnx_translation_table"]


def _csr_linear_onnx(x, crow_indices, col_indices, values, bias=None):
    """The ONNX translation of ``sparsevd::csr_linear`` (onnxscript, traced by the dynamo
    exporter): y = x Wᵀ + b with W (N, K) rebuilt from the CSR as
    :func:`sparsevd.ops.csr_linear.format.csr_to_dense` does: rows of the nonzeros from a histogram of
    crow[1:] (ScatterElements, add) summed up (CumSum), W = ScatterND(zeros, row·K + col, values)."""
    from onnxscript import opset18 as op
    from onnxscript import ir

    one = op.Constant(value=ir.tensor([1], dtype=ir.DataType.INT64))
    zero = op.Constant(value=ir.tensor([0], dtype=ir.DataType.INT64))
    crow = op.Cast(crow_indices, to=ir.DataType.INT64)
    rows_plus_one = op.Shape(crow)
    n = op.Sub(rows_plus_one, one)  # [N]
    nnz = op.Shape(values)  # [nnz]
    k = op.Shape(x, start=-1)  # [K]
    ends = op.ScatterElements(
        op.ConstantOfShape(op.Add(nnz, one), value=ir.tensor([0], dtype=ir.DataType.INT64)),
        op.Slice(crow, one, rows_plus_one),
        op.ConstantOfShape(n, value=ir.tensor([1], dtype=ir.DataType.INT64)),
        axis=0, reduction="add")
    rows = op.Slice(op.CumSum(ends, zero), zero, nnz)
    flat = op.Add(op.Mul(rows, k), op.Cast(col_indices, to=ir.DataType.INT64))
    w = op.CastLike(op.ConstantOfShape(op.Mul(n, k)), values)
    w = op.ScatterND(w, op.Unsqueeze(flat, one), values)
    w = op.Reshape(w, op.Concat(n, k, axis=0))
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def onnx_translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` of graphs that
    hold ``torch.ops.sparsevd.csr_linear`` (e.g. an ExportedProgram of a deployed model):
    ``{torch.ops.sparsevd.csr_linear.default: <onnxscript translation>}``.

    Raises:
        RuntimeError: the op is not registered (sparsevd._C is not built).
    """
    from .ops import library

    if not library.available():
        raise RuntimeError(f"onnx_translation_table: sparsevd._C is not built "
                           f"({library.unavailable_reason()}); deployed models then export without it")
    return {torch.ops.sparsevd.csr_linear.default: _csr_linear_onnx}


def export_onnx(model: Union[nn.Module, torch.export.ExportedProgram], args: Sequence[Any],
                path: Union[str, Path], *, dynamic_batch: bool = True,
                opset_version: Optional[int] = None, **kwargs) -> Path:
    """Export a deployed model (or an ExportedProgram of one) to an ONNX file with the dynamo
    exporter: ``torch.onnx.export`` with a dynamic batch dimension (dim 0 of every tensor in
    ``args``) and the translation of ``sparsevd::csr_linear`` (:func:`onnx_translation_table`).

    Args:
        model: the deployed model (eval mode) or its ``torch.export.ExportedProgram``.
        args: example inputs (a tuple), batch size ≥ 2 when ``dynamic_batch`` (torch.export
            specializes a size of 1).
        path: the .onnx file to write (weights inside the file).
        dynamic_batch: make dim 0 of every tensor argument dynamic ("batch").
        opset_version: ONNX opset (default: torch's).
        kwargs: passed to ``torch.onnx.export``.

    Returns:
        The path written.

    Raises:
        ValueError: ``args`` not a tuple or list, or a batch of 1 with ``dynamic_batch``.
    """
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"args: expected a tuple of example inputs, got {type(args).__name__}")
    args = tuple(args)
    dynamic_shapes = None
    if dynamic_batch and not isinstance(model, torch.export.ExportedProgram):
        batch = torch.export.Dim("batch")
        dynamic_shapes = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                if a.shape[0] < 2:
                    raise ValueError("args: a dynamic batch needs example inputs with a batch of "
                                     f"at least 2 (torch.export specializes 1), got shape {tuple(a.shape)}")
                dynamic_shapes.append({0: batch})
            else:
                dynamic_shapes.append(None)
        dynamic_shapes = tuple(dynamic_shapes)
    table = dict(kwargs.pop("custom_translation_table", None) or {})
    from .ops import library

    if library.available():
        table.update(onnx_translation_table())
    path = Path(path)
    torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                      custom_translation_table=table, opset_version=opset_version,
                      external_data=False, **kwargs)
    return path
