"""Deployed (inference) layers of sparse VD: SparseLinear and SparseConv2d, weights stored as CSR.

:func:`sparsevd.deploy` builds them from trained LinearSVDO / Conv2dSVDO layers: weights with
log α ≥ threshold dropped, dead rows and columns removed, what remains stored as CSR (values in
the layer's dtype, int32 row pointers, int16 column indices when in_features ≤ 32768, else
int32). Each layer carries a *plan*: which kernel runs at which batch size,

- ``"csr"``: the sparse kernel :func:`sparsevd.ops.csr_linear` (compiled library sparsevd._C);
- ``"dense"``: compacted dense: the used input columns gathered, then a dense matmul with the
  (out_features, used columns) weight (for convolutions: dense conv2d with the compacted channels);
- ``"masked"``: masked dense: a dense matmul with the zero-filled (out_features, in_features) weight
  (linear only).

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369), sec. 5: weights with log α > 3 are set to zero at test time.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._args import IntOrPair, as_pair
from ..reference import conv_out_size
from ..ops.csr import csr_linear_torch, validate_csr, warn_fallback
from ..ops.library import kernel_available
from .svdo import conv_repr

__all__ = ["SparseLinear", "SparseConv2d", "to_csr", "LINEAR_MODES", "CONV_MODES", "Plan"]

LINEAR_MODES = ("csr", "dense", "masked")
CONV_MODES = ("csr", "dense")
#: A plan: ((max_batch, mode), ...) in increasing max_batch; the last max_batch is None (no bound).
Plan = Tuple[Tuple[Optional[int], str], ...]


def to_csr(
    weight: Tensor, index_dtype: Optional[torch.dtype] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR form of a 2-D weight (its zeros dropped): (crow_indices, col_indices, values).

    Args:
        weight: (out_features, in_features), any floating dtype and device.
        index_dtype: dtype of the column indices; default int16 when in_features ≤ 32768 (half
            the index bytes), else int32 (int64 beyond 2³¹ columns).

    Returns:
        crow_indices (out_features + 1,) int32 (int64 when nnz ≥ 2³¹), col_indices (nnz,),
        values (nnz,) in the dtype of ``weight``, nonzeros in row-major order.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if index_dtype is None:
        index_dtype = torch.int16 if k <= 32768 else (torch.int32 if k < 2**31 else torch.int64)
    rows, cols = weight.nonzero(as_tuple=True)
    values = weight[rows, cols].contiguous()
    counts = torch.bincount(rows, minlength=n) if rows.numel() else torch.zeros(n, dtype=torch.long,
                                                                               device=weight.device)
    crow = torch.zeros(n + 1, dtype=torch.long, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    crow_dtype = torch.int32 if values.numel() < 2**31 else torch.int64
    return crow.to(crow_dtype), cols.to(index_dtype).contiguous(), values


def _csr_to_dense(crow: Tensor, col: Tensor, values: Tensor, n: int, k: int) -> Tensor:
    w = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    if values.numel():
        rows = torch.repeat_interleave(
            torch.arange(n, device=values.device), (crow[1:] - crow[:-1]).long()
        )
        w[rows, col.long()] = values
    return w


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


class _SparseBase(nn.Module):
    """CSR storage, plan and the report() attributes shared by SparseLinear and SparseConv2d."""

    MODES: Tuple[str, ...] = ()
    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    bias: Optional[Tensor]

    def _init_storage(self, crow_indices, col_indices, values, bias, in_cols, dense_shape,
                      num_weights, plan, check) -> None:
        n = validate_csr(crow_indices, col_indices, values, in_cols, bias, check_indices=check)
        self.register_buffer("crow_indices", crow_indices.contiguous())
        self.register_buffer("col_indices", col_indices.contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self._rows, self._cols = n, in_cols
        self.dense_shape = tuple(int(s) for s in dense_shape)
        self.num_weights = int(num_weights) if num_weights is not None else math.prod(self.dense_shape)
        self.plan: Plan = ()
        self.set_plan("csr" if plan is None else plan)

    # -- report() attributes
    @property
    def num_nonzero(self) -> int:
        """Number of stored weights (nnz of the CSR)."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the original layer's weights (``dense_shape``) that are not stored."""
        return 1.0 - self.num_nonzero / max(self.num_weights, 1)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (CSR and bias), what :func:`sparsevd.save` writes."""
        ts = [self.crow_indices, self.col_indices, self.values]
        if self.bias is not None:
            ts.append(self.bias)
        return sum(t.numel() * t.element_size() for t in ts)

    # -- plan
    def set_plan(self, plan) -> None:
        """Set which kernel runs at which batch size: a mode name, or pairs (max_batch, mode).

        The batch size is the number of rows of the matmul's input divided by the positions per
        sample: x.numel() / in_features for SparseLinear, the number of images for SparseConv2d.

        Raises:
            ValueError: unknown mode or malformed pairs.
        """
        plan = normalize_plan(plan, self.MODES)
        self.plan = plan
        self._refresh()

    def mode_for(self, batch: int) -> str:
        """The mode the plan gives for a batch of ``batch`` samples."""
        plan = self.plan
        if len(plan) == 1:
            return plan[0][1]
        for bound, mode in plan:
            if bound is None or batch <= bound:
                return mode
        return plan[-1][1]

    def to_dense(self) -> Tensor:
        """The stored weight as a dense (out_features, in_features · kernel) tensor, zeros filled."""
        return _csr_to_dense(self.crow_indices, self.col_indices, self.values, self._rows, self._cols)

    def _build_caches(self) -> None:
        raise NotImplementedError

    def _run_csr(self, x: Tensor) -> Tensor:
        if self._use_kernel:
            return torch.ops.sparsevd.csr_linear.default(
                x, self.crow_indices, self.col_indices, self.values, self.bias
            )
        warn_fallback(type(self).__name__)
        return csr_linear_torch(x, self.crow_indices, self.col_indices, self.values, self.bias)

    def _refresh(self) -> None:
        # the compiled kernel for the buffers' device (x must be there too), and the dense caches
        self._use_kernel = kernel_available(self.values.device)
        self._build_caches()

    def _apply(self, fn, recurse=True):
        # Moving or casting the module keeps the column indices integral and the caches in sync.
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()


class SparseLinear(_SparseBase):
    """Deployed linear layer: y = x Wᵀ + b with W (out_features, in_features) stored as CSR.

    Buffers: ``crow_indices`` (out_features + 1,) int32, ``col_indices`` (nnz,) int16/int32,
    ``values`` (nnz,) and ``bias`` (out_features,) or None, both in the layer's dtype.
    Attributes for :func:`sparsevd.report`: ``dense_shape`` (the trained layer's weight shape,
    before compaction), ``num_weights`` (its number of weights), ``num_nonzero`` (nnz).

    Args:
        in_features, out_features: the deployed (compacted) sizes; input (*, in_features),
            output (*, out_features), dtype of ``values``.
        crow_indices, col_indices, values, bias: the CSR weight (see :func:`to_csr`).
        dense_shape, num_weights: of the original layer (default: (out_features, in_features)).
        plan: mode per batch size (see :meth:`set_plan`); default ``"csr"``.
        check: validate the CSR (index ranges) at construction.

    Raises:
        TypeError / ValueError (naming the argument): inconsistent CSR or sizes at construction;
        at forward, an input of the wrong last dimension or dtype.
    """

    MODES = LINEAR_MODES

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Optional[Tensor] = None,
        *,
        dense_shape: Optional[Sequence[int]] = None,
        num_weights: Optional[int] = None,
        plan=None,
        check: bool = True,
    ) -> None:
        super().__init__()
        if crow_indices.numel() != out_features + 1:
            raise ValueError(
                f"crow_indices: expected out_features + 1 = {out_features + 1} entries, got "
                f"{crow_indices.numel()}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage(crow_indices, col_indices, values, bias, self.in_features,
                           dense_shape or (out_features, in_features), num_weights, plan, check)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None, *, index_dtype=None,
                   **kwargs) -> "SparseLinear":
        """A SparseLinear storing the nonzeros of ``weight`` (out_features, in_features); kwargs
        as the constructor (dense_shape, num_weights, plan)."""
        crow, col, val = to_csr(weight.detach(), index_dtype)
        b = None if bias is None else bias.detach().to(weight.dtype)
        return cls(weight.shape[1], weight.shape[0], crow, col, val, b, **kwargs)

    def _build_caches(self) -> None:
        modes = {m for _, m in self.plan}
        self._w_dense = self._w_masked = self._used_cols = None
        if not modes & {"dense", "masked"}:
            return
        w = self.to_dense()
        if "masked" in modes:
            self._w_masked = w
        if "dense" in modes:
            used = torch.unique(self.col_indices.long())
            if used.numel() < self.in_features:
                self._used_cols = used
                self._w_dense = w.index_select(1, used).contiguous()
            else:
                self._w_dense = w

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (*, {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"x: expected dtype {self.values.dtype} (the layer's), got {x.dtype}")
        mode = self.mode_for(x.numel() // self.in_features if self.in_features else
                             math.prod(x.shape[:-1]))
        if mode == "csr":
            return self._run_csr(x)
        if mode == "dense":
            if self._used_cols is not None:
                x = x.index_select(-1, self._used_cols)
            return F.linear(x, self._w_dense, self.bias)
        return F.linear(x, self._w_masked, self.bias)

    def extra_repr(self) -> str:
        plan = ", ".join(f"{'≤' + str(b) if b is not None else 'else'}:{m}" for b, m in self.plan)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.num_nonzero}, dense_shape={self.dense_shape}, "
                f"bias={self.bias is not None}, plan=[{plan}]")


class SparseConv2d(_SparseBase):
    """Deployed 2-D convolution with its weight (out_channels, in_channels/groups, kH, kW) stored as
    a CSR matrix (out_channels, in_channels/groups · kH · kW).

    ``"csr"`` mode (groups = 1) runs im2col (``F.unfold``) and the CSR kernel on the patches,
    (N, L, C·kH·kW) → (N, L, out_channels), L output positions: the same kernel as SparseLinear,
    with a batch of N·L rows. ``"dense"`` runs ``F.conv2d`` with the compacted dense weight.
    The batch size of the plan is the number of images N.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as nn.Conv2d
            (zero padding given as ints); the deployed (compacted) channel counts.
        crow_indices, col_indices, values, bias: the CSR weight of the reshaped 2-D weight.
        dense_shape, num_weights, plan, check: as :class:`SparseLinear` (default plan: "csr",
            or "dense" when groups > 1).

    Input (N, in_channels, H, W) or (in_channels, H, W); output (N, out_channels, H', W').

    Raises:
        ValueError: sizes that do not match the CSR, ``"csr"`` mode with groups > 1, or at
        forward an input with the wrong number of channels; TypeError: wrong input dtype.
    """

    MODES = CONV_MODES

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        crow_indices: Optional[Tensor] = None,
        col_indices: Optional[Tensor] = None,
        values: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        *,
        dense_shape: Optional[Sequence[int]] = None,
        num_weights: Optional[int] = None,
        plan=None,
        check: bool = True,
    ) -> None:
        super().__init__()
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: in_channels={in_channels} and out_channels={out_channels} must be "
                f"divisible by groups={groups}"
            )
        if crow_indices is None or col_indices is None or values is None:
            raise ValueError("crow_indices, col_indices, values: the CSR weight is required")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = as_pair(kernel_size, "kernel_size", 1)
        self.stride, self.padding = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0)
        self.dilation, self.groups = as_pair(dilation, "dilation", 1), int(groups)
        if crow_indices.numel() != out_channels + 1:
            raise ValueError(
                f"crow_indices: expected out_channels + 1 = {out_channels + 1} entries, got "
                f"{crow_indices.numel()}"
            )
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        if plan is None:
            plan = "csr" if self.groups == 1 else "dense"
        self._init_storage(crow_indices, col_indices, values, bias, cols, dense_shape or shape,
                           num_weights, plan, check)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrPair = 1,
                   padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, *,
                   index_dtype=None, **kwargs) -> "SparseConv2d":
        """A SparseConv2d storing the nonzeros of ``weight`` (out, in/groups, kH, kW)."""
        out_c, in_g, kh, kw = weight.shape
        crow, col, val = to_csr(weight.detach().reshape(out_c, -1), index_dtype)
        b = None if bias is None else bias.detach().to(weight.dtype)
        return cls(in_g * groups, out_c, (kh, kw), stride, padding, dilation, groups, crow, col, val,
                   b, **kwargs)

    def set_plan(self, plan) -> None:
        plan = normalize_plan(plan, self.MODES)
        if self.groups != 1 and any(m == "csr" for _, m in plan):
            raise ValueError("plan: mode 'csr' needs groups == 1; use 'dense' for grouped convolutions")
        super().set_plan(plan)

    def _build_caches(self) -> None:
        self._w_dense = None
        if any(m == "dense" for _, m in self.plan):
            self._w_dense = self.to_dense().reshape(
                self.out_channels, self.in_channels // self.groups, *self.kernel_size
            )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x: expected shape (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if x.dtype != self.values.dtype:
            raise TypeError(f"x: expected dtype {self.values.dtype} (the layer's), got {x.dtype}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.mode_for(x.shape[0]) == "csr":
            n, _, h, w = x.shape
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                      self.dilation)
            ho = conv_out_size(h, kh, sh, ph, dh)
            wo = conv_out_size(w, kw, sw, pw, dw)
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
            y = self._run_csr(cols.transpose(1, 2))  # (N, L, out_channels)
            y = y.transpose(1, 2).reshape(n, self.out_channels, ho, wo)
        else:
            y = F.conv2d(x, self._w_dense, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        plan = ", ".join(f"{'≤' + str(b) if b is not None else 'else'}:{m}" for b, m in self.plan)
        return (conv_repr(self) + f", nnz={self.num_nonzero}, dense_shape={self.dense_shape}, "
                f"bias={self.bias is not None}, plan=[{plan}]")
