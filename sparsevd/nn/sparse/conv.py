"""SparseConv2d and SparseConv1d: the deployed convolutions (modes csr, dense), the CSR product
over the unfolded input."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._args import IntOrPair, as_pair, as_single, check_groups
from ...reference import conv_out_size
from ...ops.csr_linear.format import to_csr
from ..svdo import conv_repr
from .base import _SparseBase
from .plan import CONV_MODES, Plan, dense_plan

__all__ = ["SparseConv1d", "SparseConv2d"]


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

    Non-finite inputs: both modes give ``F.conv2d`` with the zero-filled weight in IEEE
    arithmetic (a NaN or ±inf pixel makes every output it reaches through a pruned weight NaN),
    up to rounding: "dense" runs that weight, "csr" the CSR kernel on the patches (same semantics).

    Raises:
        ValueError: sizes that do not match the CSR, ``"csr"`` mode with groups > 1, a stride,
        padding, dilation or kernel size out of range (named), or at forward an input with the
        wrong number of channels or a meta tensor; TypeError: wrong input dtype.
    """

    MODES = CONV_MODES
    PLAIN = "dense"

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
        weight: Optional[Tensor] = None,
        dense_shape: Optional[Sequence[int]] = None,
        num_weights: Optional[int] = None,
        plan=None,
        check: bool = True,
    ) -> None:
        super().__init__()
        check_groups(in_channels, out_channels, groups)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        # the 2-D geometry the products run with; kernel_size, stride, padding, dilation read it
        self._geometry = (as_pair(kernel_size, "kernel_size", 1), as_pair(stride, "stride", 1),
                          as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1))
        self.groups = int(groups)
        if isinstance(crow_indices, Tensor) and crow_indices.numel() != out_channels + 1:
            raise ValueError(
                f"crow_indices: expected out_channels + 1 = {out_channels + 1} entries, got "
                f"{crow_indices.numel()}"
            )
        kh, kw = self._geometry[0]
        cols = in_channels // groups * kh * kw
        if plan is None and (self.groups != 1 or weight is not None):
            plan = "dense"
        self._init_storage(crow_indices, col_indices, values, weight, bias, self.out_channels, cols,
                           dense_shape or self._weight_shape(), num_weights, plan, check)

    # nn.Conv2d's attributes (read-only: the stored weight and plans were made for them)
    kernel_size = property(lambda self: self._geometry[0])
    stride = property(lambda self: self._geometry[1])
    padding = property(lambda self: self._geometry[2])
    dilation = property(lambda self: self._geometry[3])

    def _weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self._geometry[0])

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrPair = 1,
                   padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, *,
                   index_dtype=None, **kwargs) -> "SparseConv2d":
        """A SparseConv2d storing the nonzeros of ``weight`` (out, in/groups, kH, kW), as CSR or
        dense as its plan needs (default: CSR for groups = 1)."""
        out_c, in_g, kh, kw = weight.shape
        weight = weight.detach()
        b = None if bias is None else bias.detach().to(weight.dtype)
        args = (in_g * groups, out_c, (kh, kw), stride, padding, dilation, groups)
        if dense_plan(kwargs.get("plan"), groups):
            return cls(*args, None, None, None, b, weight=weight.clone(), **kwargs)
        crow, col, val = to_csr(weight.reshape(out_c, -1), index_dtype)
        return cls(*args, crow, col, val, b, **kwargs)

    def _check_plan(self, plan: Plan) -> None:
        if self.groups != 1 and any(m == "csr" for _, m in plan):
            raise ValueError("plan: mode 'csr' needs groups == 1; use 'dense' for grouped convolutions")

    def _build_caches(self) -> None:
        self._w_dense = None
        if any(m == "dense" for _, m in self.plan):
            w = self._buffers["weight"]
            self._w_dense = w if w is not None else self._dense_weight().view(self._weight_shape())

    def _fast_args(self):
        if self.plan != ((None, "dense"),):
            return None
        return (self._w_dense, self._buffers["bias"], *self._geometry[1:], self.groups)

    def _check_input(self, x: Tensor) -> None:
        """Shape and dtype of x (O(1)); validates the buffers again when they changed.

        Raises:
            ValueError: x not (N, in_channels, H, W) or (in_channels, H, W), or invalid buffers
            (named); TypeError: x's dtype is not the layer's.
        """
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x: expected shape (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        self._ensure_synced()
        dtype = self._synced[-1]
        if x.dtype != dtype:
            raise TypeError(f"x: expected dtype {dtype} (the layer's), got {x.dtype}")

    def forward(self, x: Tensor) -> Tensor:
        fast = self._fast
        if (fast is not None and not x.is_meta and not torch.compiler.is_compiling()
                and self._unchanged()):
            # plan "dense" at every batch size: the F.conv2d call nn.Conv2d makes (it takes
            # unbatched (C, H, W) inputs too); bad inputs make it raise, the checks name them
            # (a meta x does not make it raise: the general path rejects it)
            try:
                return F.conv2d(x, *fast)
            except RuntimeError:
                self._check_input(x)
                raise
        self._check_input(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        mode = self.mode_for(x.shape[0])
        if x.is_meta:
            self._reject_meta(mode)
        if mode == "csr" and torch.onnx.is_in_onnx_export():  # standard ONNX ops: a dense conv
            y = F.conv2d(x, self._traced_dense_weight().view(self._weight_shape()), self.bias,
                         *self._geometry[1:], self.groups)
        elif mode == "csr":
            n, _, h, w = x.shape
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry
            ho = conv_out_size(h, kh, sh, ph, dh)
            wo = conv_out_size(w, kw, sw, pw, dw)
            cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))
            y = self._run_csr(cols.transpose(1, 2))  # (N, L, out_channels)
            y = y.transpose(1, 2).reshape(n, self.out_channels, ho, wo)
        else:
            y = F.conv2d(x, self._w_dense, self.bias, *self._geometry[1:], self.groups)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        plan = ", ".join(f"{'≤' + str(b) if b is not None else 'else'}:{m}" for b, m in self.plan)
        return (conv_repr(self) + f", nnz={self.num_nonzero}, dense_shape={self.dense_shape}, "
                f"bias={self.bias is not None}, plan=[{plan}]")


class SparseConv1d(SparseConv2d):
    """Deployed 1-D convolution: a :class:`SparseConv2d` over the input viewed as (N, C, 1, L)
    with a (1, k) kernel (as :class:`~sparsevd.nn.Conv1dSVDO` trains it), the same CSR storage,
    plans and semantics.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as nn.Conv1d
            (ints, or sequences of one int; zero padding, symmetric); the attributes
            ``kernel_size``, ``stride``, ``padding``, ``dilation`` are nn.Conv1d's 1-tuples (k,),
            (s,), (p,), (d,) (what models such as Whisper read); the products run the
            equivalent SparseConv2d's pairs (1, k), (1, s), (0, p), (1, d).
        crow_indices, col_indices, values, bias, dense_shape, num_weights, plan, check: as
            :class:`SparseConv2d`; the CSR matrix is (out_channels, in_channels/groups · k).
        weight: the zero-filled dense weight (out_channels, in_channels/groups, k), stored as
            the (out_channels, in_channels/groups, 1, k) weight of the 2-D convolution.

    Input (N, in_channels, L) or (in_channels, L); output (N, out_channels, L').

    Raises: as :class:`SparseConv2d`; ValueError for a 1-D argument that is not an int (named).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                 groups: int = 1, crow_indices: Optional[Tensor] = None,
                 col_indices: Optional[Tensor] = None, values: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, *, weight: Optional[Tensor] = None,
                 dense_shape: Optional[Sequence[int]] = None, num_weights: Optional[int] = None,
                 plan=None, check: bool = True) -> None:
        k = as_single(kernel_size, "kernel_size", 1)
        if dense_shape is None and groups > 0:
            dense_shape = (out_channels, in_channels // groups, k)
        if isinstance(weight, Tensor) and weight.dim() == 3:
            weight = weight.unsqueeze(-2)
        super().__init__(in_channels, out_channels, (1, k), (1, as_single(stride, "stride", 1)),
                         (0, as_single(padding, "padding", 0)),
                         (1, as_single(dilation, "dilation", 1)), groups, crow_indices,
                         col_indices, values, bias, weight=weight, dense_shape=dense_shape,
                         num_weights=num_weights, plan=plan, check=check)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrPair = 1,
                   padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, *,
                   index_dtype=None, **kwargs) -> "SparseConv1d":
        """A SparseConv1d storing the nonzeros of ``weight`` (out, in/groups, k), as CSR or dense
        as its plan needs."""
        if weight.dim() != 3:
            raise ValueError(f"weight: expected a 3-D (out, in/groups, k) tensor, got {tuple(weight.shape)}")
        out_c, in_g, k = weight.shape
        weight = weight.detach()
        b = None if bias is None else bias.detach().to(weight.dtype)
        args = (in_g * groups, out_c, k, stride, padding, dilation, groups)
        if dense_plan(kwargs.get("plan"), groups):
            return cls(*args, None, None, None, b, weight=weight.clone(), **kwargs)
        crow, col, val = to_csr(weight.reshape(out_c, -1), index_dtype)
        return cls(*args, crow, col, val, b, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(
                f"x: expected shape (N, {self.in_channels}, L) or ({self.in_channels}, L), got "
                f"{tuple(x.shape)}"
            )
        return super().forward(x.unsqueeze(-2)).squeeze(-2)

    def _nn_weight_shape(self) -> Tuple[int, ...]:  # nn.Conv1d's (out, in/groups, k)
        return (self.out_channels, self.in_channels // self.groups, self._geometry[0][1])

    # nn.Conv1d's 1-tuples: the second of each 2-D pair
    kernel_size = property(lambda self: self._geometry[0][1:])
    stride = property(lambda self: self._geometry[1][1:])
    padding = property(lambda self: self._geometry[2][1:])
    dilation = property(lambda self: self._geometry[3][1:])
