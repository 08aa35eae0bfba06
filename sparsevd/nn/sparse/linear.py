"""SparseLinear: the deployed linear layer (modes csr, dense, masked)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.csr_linear.format import to_csr
from .base import _SparseBase
from .plan import LINEAR_MODES, dense_plan

__all__ = ["SparseLinear"]


class SparseLinear(_SparseBase):
    """Deployed linear layer: y = x Wᵀ + b with W (out_features, in_features) stored as CSR, or
    dense where that is smaller or faster (the storage follows the plan, see ``_SparseBase``).

    Buffers, CSR storage (a plan with mode ``"csr"``): ``crow_indices`` (out_features + 1,) int32,
    ``col_indices`` (nnz,) uint16 (in_features ≤ 65536; int16 and int32 read too), ``values``
    (nnz,); dense storage (any other plan): ``weight`` (out_features, in_features), zero-filled;
    ``bias`` (out_features,) or None; floating buffers in the layer's dtype, absent ones None.
    Attributes for :func:`sparsevd.report`: ``dense_shape`` (the trained layer's weight shape,
    before compaction), ``num_weights`` (its number of weights), ``num_nonzero`` (nnz).

    Args:
        in_features, out_features: the deployed (compacted) sizes; input (*, in_features),
            output (*, out_features), dtype of ``values`` / ``weight``.
        crow_indices, col_indices, values, bias: the CSR weight (see :func:`to_csr`), or None
            when ``weight`` is given.
        weight: the zero-filled dense weight (out_features, in_features), instead of the CSR.
        dense_shape, num_weights: of the original layer (default: (out_features, in_features)).
        plan: mode per batch size (see :meth:`set_plan`); default ``"csr"`` (``"masked"`` when
            ``weight`` is given). The weight is stored in the plan's format, converted if needed.
        check: validate the CSR's index data at construction (else at the first forward).

    Non-finite inputs: every mode gives ``F.linear(x, self.to_dense(), self.bias)`` in IEEE
    arithmetic (an input NaN or ±inf that meets a pruned weight makes the output NaN), at every
    batch size, up to rounding. "masked" gets it from F.linear for free; "csr" from the kernel;
    "dense" (which skips the unused columns) checks those columns when x is not all finite.

    Raises:
        TypeError / ValueError (naming the argument): inconsistent CSR, weight or sizes at
        construction; at forward, an input of the wrong last dimension, dtype or device (a meta
        tensor), or buffers edited into an invalid CSR (named).
    """

    MODES = LINEAR_MODES
    PLAIN = "masked"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Optional[Tensor] = None,
        col_indices: Optional[Tensor] = None,
        values: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        *,
        weight: Optional[Tensor] = None,
        dense_shape: Optional[Sequence[int]] = None,
        num_weights: Optional[int] = None,
        plan=None,
        check: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(crow_indices, Tensor) and crow_indices.numel() != out_features + 1:
            raise ValueError(
                f"crow_indices: expected out_features + 1 = {out_features + 1} entries, got "
                f"{crow_indices.numel()}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage(crow_indices, col_indices, values, weight, bias, self.out_features,
                           self.in_features, dense_shape or (out_features, in_features),
                           num_weights, plan, check)

    def _weight_shape(self) -> Tuple[int, ...]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None, *, index_dtype=None,
                   **kwargs) -> "SparseLinear":
        """A SparseLinear storing the nonzeros of ``weight`` (out_features, in_features), as CSR
        (``index_dtype``: see :func:`to_csr`) or dense as its plan needs; kwargs as the
        constructor (dense_shape, num_weights, plan)."""
        weight = weight.detach()
        b = None if bias is None else bias.detach().to(weight.dtype)
        n, k = weight.shape
        if dense_plan(kwargs.get("plan"), 1):
            return cls(k, n, None, None, None, b, weight=weight.clone(), **kwargs)
        crow, col, val = to_csr(weight, index_dtype)
        return cls(k, n, crow, col, val, b, **kwargs)

    def _build_caches(self) -> None:
        modes = {m for _, m in self.plan}
        self._w_dense = self._w_masked = self._used_cols = self._unused_cols = None
        if not modes & {"dense", "masked"}:
            return
        w = self._dense_weight()
        if "masked" in modes:
            self._w_masked = w
        if "dense" in modes:
            mask = self._used_mask()
            used = mask.nonzero().flatten()
            if used.numel() < self.in_features:
                self._used_cols, self._unused_cols = used, (~mask).nonzero().flatten()
                self._w_dense = w.index_select(1, used).contiguous()
            else:
                self._w_dense = w

    def _fast_args(self):
        if len(self.plan) != 1:
            return None
        mode = self.plan[0][1]
        if mode == "masked":
            return self._w_masked, self._buffers["bias"]
        if mode == "dense" and self._used_cols is None:  # nothing to gather
            return self._w_dense, self._buffers["bias"]
        return None

    def forward(self, x: Tensor) -> Tensor:
        fast = self._fast
        if fast is not None and not torch.compiler.is_compiling() and self._unchanged():
            # one mode at every batch size, a plain F.linear (masked, or dense with every column
            # used): the call nn.Linear makes, on the stored zero-filled weight. Bad inputs make
            # F.linear raise; the checks below then name the argument.
            try:
                return F.linear(x, fast[0], fast[1])
            except RuntimeError:
                self._check_input(x)
                if x.is_meta:
                    self._reject_meta(self.plan[0][1])
                raise
        self._check_input(x)
        mode = self.mode_for(x.numel() // self.in_features if self.in_features else
                             math.prod(x.shape[:-1]))
        if x.is_meta:
            self._reject_meta(mode)
        if mode == "csr":
            return self._run_csr(x)
        if mode == "dense":
            return self._dense(x)
        return F.linear(x, self._w_masked, self.bias)

    def _check_input(self, x: Tensor) -> None:
        """Shape and dtype of x (O(1)); validates the buffers again when they changed.

        Raises:
            ValueError: x not (*, in_features), or invalid buffers (named); TypeError: x's dtype
            is not the layer's.
        """
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (*, {self.in_features}), got {tuple(x.shape)}")
        self._ensure_synced()
        dtype = self._synced[-1]  # of the stored weight (faster than reading the buffer)
        if x.dtype != dtype:
            raise TypeError(f"x: expected dtype {dtype} (the layer's), got {x.dtype}")

    def _dense(self, x: Tensor) -> Tensor:
        """F.linear on the used input columns. The unused columns meet only zero weights: a
        non-finite value there makes the whole output row NaN (0·inf = 0·NaN = NaN), as in the
        zero-filled product. CPU: one sum of x tells that x is all finite (the common case, 3-6 µs;
        index_select + isfinite of the unused columns costs 12-110 µs at LeNet sizes); otherwise
        the unused columns are checked per row. CUDA, and under torch.compile / torch.export,
        without a host sync: 0·x summed over the unused columns of each row (0, or NaN) is added
        to the row."""
        if self._used_cols is None:
            return F.linear(x, self._w_dense, self.bias)
        y = F.linear(x.index_select(-1, self._used_cols), self._w_dense, self.bias)
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # no sync, traceable
            return y.add_(x.index_select(-1, self._unused_cols).mul(0).sum(-1, keepdim=True))
        if math.isfinite(x.sum().item()):  # finite sum: no inf or NaN anywhere in x
            return y
        finite = torch.isfinite(x.index_select(-1, self._unused_cols)).all(-1, keepdim=True)
        return y.masked_fill_(~finite, float("nan"))

    def extra_repr(self) -> str:
        plan = ", ".join(f"{'≤' + str(b) if b is not None else 'else'}:{m}" for b, m in self.plan)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.num_nonzero}, dense_shape={self.dense_shape}, "
                f"bias={self.bias is not None}, plan=[{plan}]")
