"""What the deployed layers share (:class:`_SparseBase`): the weight storage (CSR or dense, as the
plan needs), its validation whenever a buffer can have changed, the plan and its caches, the
attributes of :func:`sparsevd.report`, and the public accessors the deployment reads
(:attr:`~_SparseBase.matrix_shape`, :attr:`~_SparseBase.stored_weight`,
:meth:`~_SparseBase.use_mode`). The module docstring of :mod:`sparsevd.nn.sparse` tells when the
buffers are validated.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_map

from ...ops.checks import check_device_of, check_dtype_of, check_float, check_tensor
from ...ops.csr_linear.format import csr_to_dense, to_csr, used_columns, validate_csr
from ...ops.csr_linear.naive import naive_csr_linear
from ...ops.csr_linear.op import warn_fallback
from ...ops.library import kernel_available
from .plan import Plan, normalize_plan, storage_for

_CSR_BUFFERS = ("crow_indices", "col_indices", "values")
_BUFFERS = ("crow_indices", "col_indices", "values", "weight", "bias")


def _version_sum(tensors) -> int:
    """Sum of the version counters (each bumped by every in-place edit), -1 when one of the tensors
    is an inference tensor (they have none)."""
    if any(t.is_inference() for t in tensors):
        return -1
    return sum(t._version for t in tensors)


class _DenseFromCSR(Tensor):
    """The dense weight of a CSR-stored layer (:attr:`_SparseBase.weight`): its shape, dtype and
    device are read for free (ViT and T5 read the dtype at every forward); any op on it runs on
    the dense tensor built from the CSR at that moment (exact, not kept)."""

    @staticmethod
    def __new__(cls, layer: "_SparseBase", shape: Tuple[int, ...]):
        stored = layer._stored()
        return Tensor._make_wrapper_subclass(cls, shape, dtype=stored.dtype, device=stored.device)

    def __init__(self, layer: "_SparseBase", shape: Tuple[int, ...]) -> None:
        self._layer, self._shape = layer, shape

    def dense(self) -> Tensor:
        return self._layer.to_dense().view(self._shape)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.dense() if isinstance(t, _DenseFromCSR) else t
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class _SparseBase(nn.Module):
    """Weight storage (CSR or dense, as the plan needs), plan and the report() attributes shared by
    SparseLinear and SparseConv2d.

    Storage follows the plan (:func:`storage_for`): a plan with a ``"csr"`` mode keeps the CSR
    buffers ``crow_indices``, ``col_indices``, ``values`` (``weight`` is None); any other plan keeps
    the zero-filled dense ``weight`` (the CSR buffers are None), so a layer planned dense stores
    exactly the dense layer's bytes, and never a CSR copy beside it. :meth:`set_plan` converts
    between the two (exactly: the same nonzeros). Only a plan that mixes ``"csr"`` with a dense mode
    keeps a dense cache beside the CSR (not a buffer; :func:`sparsevd.deploy` never makes one).
    """

    MODES: Tuple[str, ...] = ()
    PLAIN = ""  # the mode that is the dense layer's own product
    crow_indices: Optional[Tensor]
    col_indices: Optional[Tensor]
    values: Optional[Tensor]
    bias: Optional[Tensor]

    def _init_storage(self, crow_indices, col_indices, values, weight, bias, rows, in_cols,
                      dense_shape, num_weights, plan, check) -> None:
        self._rows, self._cols = rows, in_cols
        plan = normalize_plan(("csr" if weight is None else self.PLAIN) if plan is None else plan,
                              self.MODES)
        self._check_plan(plan)
        csr = (crow_indices, col_indices, values)
        if weight is None:
            if any(t is None for t in csr):
                raise ValueError("crow_indices, col_indices, values: the CSR weight (or weight=) is "
                                 "required")
            validate_csr(*csr, in_cols, bias, check_indices=check)
        else:
            if any(t is not None for t in csr):
                raise ValueError("weight: give the CSR weight (crow_indices, col_indices, values) or "
                                 "a dense weight, not both")
            self._check_dense(weight, bias)
        for name, t in zip(_BUFFERS, (*csr, weight, bias)):
            self.register_buffer(name, None if t is None else t.contiguous())
        self.dense_shape = tuple(int(s) for s in dense_shape)
        self.num_weights = int(num_weights) if num_weights is not None else math.prod(self.dense_shape)
        #: Intra-op threads the plan was measured with (set by sparsevd.deploy), or None.
        self.plan_threads: Optional[int] = None
        # (crow, col, values, weight, bias, version sum of the stored weight's tensors, dtype) of
        # the last validated buffers, or None: forward validates again when a buffer is not that
        # object any more, or when the stored weight was edited in place.
        self._synced: Optional[tuple] = None
        self.plan: Plan = plan
        self._conform_storage(check_indices=not check)  # (checked above when check)
        self._refresh()
        if check:
            self._mark_synced()

    def _weight_shape(self) -> Tuple[int, ...]:
        """Shape of the dense ``weight`` buffer."""
        raise NotImplementedError

    @property
    def storage(self) -> str:
        """``"csr"`` (the CSR buffers) or ``"dense"`` (the zero-filled ``weight`` buffer)."""
        return "csr" if self._buffers["values"] is not None else "dense"

    def _stored(self) -> Tensor:
        """The floating tensor of the stored weight (values, or weight): dtype and device."""
        b = self._buffers
        return b["values"] if b["values"] is not None else b["weight"]

    @property
    def weight(self) -> Tensor:
        """The dense weight, in the shape of the layer this one replaced (nn.Linear's
        (out_features, in_features), nn.Conv2d's (out, in/groups, kH, kW), nn.Conv1d's
        (out, in/groups, k); compacted sizes), zeros where pruned: with dense storage the
        ``weight`` buffer itself, with CSR storage a new tensor (:class:`_DenseFromCSR`) whose
        shape, dtype and device cost nothing and whose values are built from the CSR when an op
        reads them (the dense weight's memory while that result lives; editing it does not
        change the layer: edit ``values``). For code written against nn.Linear / nn.Conv that
        reads ``layer.weight.dtype`` or ``.device`` (ViT and CLIP cast their pixels to the patch
        convolution's dtype, T5 its hidden states to ``wo``'s at every forward). The state_dict
        holds only the stored format."""
        b = self._buffers
        if "weight" not in b:  # (during __init__, before the buffers are registered)
            raise AttributeError("weight")
        shape = self._nn_weight_shape()
        w = b["weight"]
        if w is None:  # CSR storage: the dense values are built only when an op reads them
            return _DenseFromCSR(self, shape)
        # (a buffer being replaced by load_state_dict may not have the layer's size yet)
        return w.view(shape) if tuple(w.shape) != shape and w.numel() == math.prod(shape) else w

    def _nn_weight_shape(self) -> Tuple[int, ...]:
        """Shape of :attr:`weight`: the dense buffer's, unless a subclass stores another view."""
        return self._weight_shape()

    @property
    def matrix_shape(self) -> Tuple[int, int]:
        """(rows, cols) of the 2-D product the layer computes: (out_features, in_features) of a
        linear layer, (out_channels, in_channels / groups · kernel area) of a convolution (its
        weight after compaction, as the CSR stores it)."""
        return self._rows, self._cols

    @property
    def stored_weight(self) -> Tensor:
        """The floating tensor of the stored weight: ``values`` (CSR storage) or ``weight`` (dense
        storage); its dtype and device are the layer's (read it, do not edit it)."""
        return self._stored()

    # -- validation of the buffers
    def _check_dense(self, weight, bias) -> None:
        check_float(weight, "weight")
        if tuple(weight.shape) != self._weight_shape():
            raise ValueError(f"weight: expected shape {self._weight_shape()}, got {tuple(weight.shape)}")
        if bias is not None:
            check_tensor(bias, "bias", optional=True)
            check_dtype_of(bias, "bias", weight, "weight")
            if tuple(bias.shape) != (self._rows,):
                raise ValueError(f"bias: expected shape ({self._rows},) (out features), got {tuple(bias.shape)}")
            check_device_of(bias, "bias", weight, "weight")

    def _check_buffers(self) -> None:
        """Validate the current buffers (index data included; a GPU sync for CUDA tensors).

        Raises:
            TypeError / ValueError naming the buffer.
        """
        b = self._buffers
        present = [k for k in _CSR_BUFFERS if b[k] is not None]
        if present:
            if b["weight"] is not None:
                raise ValueError(f"weight: the layer stores its weight as CSR ({', '.join(present)}); a "
                                 "dense weight cannot be stored beside it (set_plan converts)")
            if len(present) < 3:
                missing = [k for k in _CSR_BUFFERS if b[k] is None]
                raise ValueError(f"{missing[0]}: the CSR weight is incomplete ({missing[0]} is None)")
            crow = b["crow_indices"]
            if isinstance(crow, Tensor) and crow.numel() != self._rows + 1:
                raise ValueError(f"crow_indices: expected {self._rows + 1} entries (out features + 1), "
                                 f"got {crow.numel()}")
            validate_csr(crow, b["col_indices"], b["values"], self._cols, b["bias"])
        elif b["weight"] is None:
            raise ValueError("weight: the layer stores no weight (neither the CSR buffers nor weight)")
        else:
            self._check_dense(b["weight"], b["bias"])

    def _mark_synced(self) -> None:
        b = self._buffers
        ts = tuple(b[k] for k in _BUFFERS)
        stored = [t for t in ts[:4] if t is not None]
        self._synced = (*ts, _version_sum(stored), self._stored().dtype)

    def _sync(self) -> None:
        """Validate the buffers, give them the plan's storage, rebuild the caches, remember the
        buffers as validated."""
        self._synced = None
        self._check_buffers()
        self._conform_storage(check_indices=False)
        self._refresh()
        self._mark_synced()

    def _ensure_synced(self) -> None:
        """_sync() when a buffer was reassigned or the stored weight was edited in place since
        the last one (identities, ~0.15 µs, and the version counters, ~0.12 µs each); skipped
        while torch.compile traces. The bias is never cached: an in-place edit of it is followed
        anyway."""
        if torch.compiler.is_compiling():  # traced (torch.compile, torch.export): the buffers
            return  # are graph inputs there; version counters are not traceable
        if not self._unchanged():
            self._sync()

    def _unchanged(self) -> bool:
        """The buffers are the validated ones and the stored weight (crow, col, values, or weight)
        was not edited in place (identities and version counters; O(1), no tensor data read). Not
        under tracing."""
        s = self._synced
        if s is None:
            return False
        b = self._buffers
        crow, col, values, weight, bias, version, _ = s
        if not (b["values"] is values and b["weight"] is weight and b["col_indices"] is col
                and b["crow_indices"] is crow and b["bias"] is bias):
            return False
        if version < 0:
            return True
        if weight is not None:
            return weight._version == version
        return crow._version + col._version + values._version == version

    def _order_buffers(self) -> None:
        """The stored buffers first, the None ones after, in ``_BUFFERS`` order (torch.export of
        a root module numbers its buffers counting the None ones (torch 2.13): a None before a
        tensor shifts the names, or raises an IndexError)."""
        b = self._buffers
        for k in sorted(_BUFFERS, key=lambda k: b[k] is None):
            b[k] = b.pop(k)

    def _conform_storage(self, check_indices: bool = True) -> bool:
        """Convert the stored weight to the format the plan needs (:func:`storage_for`); True when
        it changed. The CSR is validated first (``check_indices``) unless the caller did.

        Raises:
            ValueError: a dense weight on the meta device cannot become CSR (no data), or invalid
            CSR buffers (named).
        """
        want = storage_for(self.plan)
        if want == self.storage:
            self._order_buffers()
            return False
        b = self._buffers
        if want == "dense":
            crow, col, values = (b[k] for k in _CSR_BUFFERS)
            if check_indices:
                validate_csr(crow, col, values, self._cols, b["bias"])
            w = csr_to_dense(crow, col, values, self._rows, self._cols).reshape(self._weight_shape())
            b["weight"] = w
            for k in _CSR_BUFFERS:
                b[k] = None
        else:
            w = b["weight"]
            if w.is_meta:
                raise ValueError("plan: storing the weight as CSR needs its data; the layer is on the "
                                 "meta device (load its weights first)")
            for k, t in zip(_CSR_BUFFERS, to_csr(w.reshape(self._rows, self._cols))):
                b[k] = t
            b["weight"] = None
        self._order_buffers()
        return True

    # -- report() attributes
    @property
    def num_nonzero(self) -> int:
        """Number of nonzero weights stored (nnz of the CSR, or of the dense weight).

        Raises:
            ValueError: a dense weight on the meta device (no data to count).
        """
        values = self._buffers["values"]
        if values is not None:
            return values.numel()
        w = self._buffers["weight"]
        if w.is_meta:
            raise ValueError("num_nonzero: the layer's dense weight is on the meta device (no data)")
        return int(torch.count_nonzero(w))

    @property
    def sparsity(self) -> float:
        """Fraction of the original layer's weights (``dense_shape``) that are not stored."""
        return 1.0 - self.num_nonzero / max(self.num_weights, 1)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (the weight, CSR or dense, and the bias), what
        :func:`sparsevd.save` writes. Caches of mixed plans are not counted."""
        return sum(t.numel() * t.element_size() for t in (self._buffers[k] for k in _BUFFERS)
                   if t is not None)

    # -- plan
    def set_plan(self, plan) -> None:
        """Set which kernel runs at which batch size: a mode name, or pairs (max_batch, mode).

        The batch size is the number of rows of the matmul's input divided by the positions per
        sample: x.numel() / in_features for SparseLinear, the number of images for SparseConv2d.
        The stored weight takes the plan's format (:func:`storage_for`, converted exactly).

        Raises:
            ValueError: unknown mode or malformed pairs; a meta layer asked for CSR storage.
        """
        plan = normalize_plan(plan, self.MODES)
        self._check_plan(plan)
        self._ensure_synced()
        previous = self.plan
        self.plan = plan
        try:
            changed = self._conform_storage(check_indices=False)
        except ValueError:
            self.plan = previous
            raise
        self._refresh()
        if changed and self._synced is not None:
            self._mark_synced()

    def _check_plan(self, plan: Plan) -> None:
        pass

    def use_mode(self, mode: str) -> None:
        """Run ``mode`` at every batch size without rebuilding the caches (the cost model's
        switch between candidates while it times them; the current plan's caches must cover
        ``mode``: a plan that holds it, as :meth:`set_plan` set). :meth:`set_plan` makes the choice
        final."""
        self.plan = ((None, mode),)
        self._fast = self._fast_args()

    def mode_for(self, batch: int) -> str:
        """The mode the plan gives for a batch of ``batch`` samples.

        A symbolic batch (torch.export / torch.compile with a dynamic batch dimension) is not
        guarded on: a bound that the batch's range decides is used, else the mode for the largest
        batches (the plan's last), so the traced graph holds one kernel for every batch size."""
        plan = self.plan
        if len(plan) == 1:
            return plan[0][1]
        symbolic = isinstance(batch, torch.SymInt)
        for bound, mode in plan:
            if bound is None:
                return mode
            if symbolic:
                if statically_known_true(batch <= bound):
                    return mode
            elif batch <= bound:
                return mode
        return plan[-1][1]

    def to_dense(self) -> Tensor:
        """The stored weight as a dense (out_features, in_features · kernel) tensor, zeros filled
        (a new tensor).

        Raises:
            ValueError / TypeError: the buffers were edited into an invalid CSR.
        """
        self._ensure_synced()
        b = self._buffers
        if b["weight"] is not None:
            return b["weight"].reshape(self._rows, self._cols).clone()
        return csr_to_dense(b["crow_indices"], b["col_indices"], b["values"], self._rows, self._cols)

    def csr(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The weight as CSR (crow_indices, col_indices, values), see :func:`to_csr`: the buffers
        with CSR storage, else built from the dense weight (a new tensor each call)."""
        self._ensure_synced()
        b = self._buffers
        if b["values"] is not None:
            return b["crow_indices"], b["col_indices"], b["values"]
        return to_csr(b["weight"].reshape(self._rows, self._cols))

    def used_input_columns(self) -> Tensor:
        """(in_features · kernel,) bool: the columns of the 2-D weight that hold a stored weight."""
        self._ensure_synced()
        return self._used_mask()

    def _used_mask(self) -> Tensor:
        b = self._buffers
        if b["col_indices"] is not None:
            return used_columns(b["col_indices"], self._cols)
        return (b["weight"].reshape(self._rows, self._cols) != 0).any(0)

    def _build_caches(self) -> None:
        raise NotImplementedError

    def _dense_weight(self) -> Tensor:
        """The zero-filled weight of the 2-D product, (rows, cols): the buffer itself with dense
        storage (no copy), else built from the CSR (a cache for the dense modes of a mixed plan)."""
        b = self._buffers
        if b["weight"] is not None:
            w = b["weight"]
            return w if w.dim() == 2 else w.view(self._rows, self._cols)
        return csr_to_dense(b["crow_indices"], b["col_indices"], b["values"], self._rows, self._cols)

    def _reject_meta(self, mode: str) -> None:
        """The error for a meta x (called only for one): the CSR kernel reads x, and the dense modes
        of a layer with data would mix devices. A layer on meta gives shapes in the dense modes."""
        device = self._stored().device
        if mode == "csr" or device.type != "meta":
            raise ValueError(f"x: expected a tensor with data on {device} (the layer's device), got a "
                             f"meta tensor" + (" (mode 'csr' reads x)" if mode == "csr" else ""))

    def _run_csr(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():  # standard ONNX ops, see sparsevd.export
            return F.linear(x, self._traced_dense_weight(), self.bias)
        if self._use_kernel:
            return torch.ops.sparsevd.csr_linear.default(
                x, self.crow_indices, self.col_indices, self.values, self.bias
            )
        warn_fallback(type(self).__name__)
        return naive_csr_linear(x, self.crow_indices, self.col_indices, self.values, self.bias)

    def _traced_dense_weight(self) -> Tensor:
        """The zero-filled (rows, cols) weight rebuilt from the CSR buffers in traceable ops
        (:func:`~sparsevd.ops.csr_linear.format.csr_to_dense`): the ONNX form of the CSR mode."""
        b = self._buffers
        if b["col_indices"].dtype == torch.uint16 and torch.jit.is_tracing():
            raise TypeError(
                "col_indices: the TorchScript-based ONNX exporter (torch.onnx.export(..., "
                "dynamo=False)) cannot store uint16 tensors; export with dynamo=True (the default), "
                "or give the layer int32 indices first: layer.col_indices = layer.col_indices.int()")
        return csr_to_dense(b["crow_indices"], b["col_indices"], b["values"], self._rows, self._cols)

    def _refresh(self) -> None:
        # the compiled kernel for the buffers' device (x must be there too), the dense caches, and
        # the fast path: (weight, bias) of the one F.linear / F.conv2d call that the plan makes at
        # every batch size, or None (CSR, gathered columns, or modes by batch size)
        # (built outside inference mode even during a call under torch.inference_mode(), so that
        # a later call with an input that requires grad can save them for the backward)
        self._use_kernel = kernel_available(self._stored().device)
        with torch.inference_mode(False), torch.no_grad():
            self._build_caches()
        self._fast = self._fast_args()

    def _fast_args(self) -> Optional[tuple]:
        """The arguments after x of the one F.linear / F.conv2d call of the plan, or None."""
        raise NotImplementedError

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: the layer's Python (validation, plans by batch size)
        # is not TorchScript; say what works instead of a parser error
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (TorchScript, deprecated "
            "in torch). torch.jit.trace works (the trace runs the plan's mode at the example's "
            "batch size); so do torch.export, torch.compile and torch.onnx.export "
            "(sparsevd.export_onnx)")

    def _apply(self, fn, recurse=True):
        # Moving or casting the module keeps the column indices integral; the buffers are new
        # tensors: validated again, caches rebuilt. Buffers that fail (to_empty() before a
        # load_state_dict) leave the layer unvalidated: its next use raises the error.
        out = super()._apply(fn, recurse)
        try:
            self._sync()
        except (TypeError, ValueError):
            self._synced = None
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict of the other storage (a dense `weight` into a CSR layer, or the CSR into a
        # dense one) gets buffers of its own format to load into; the plan's storage is restored
        # by the validation after. Copies into the buffers (or assigns them), then validates what
        # they hold; on an error (torch's, e.g. a size mismatch, or the validation's) the layer
        # gets all its previous buffers back and the message joins load_state_dict's.
        old = {k: self._buffers[k] for k in _BUFFERS}
        saved = {k: t.clone() for k, t in old.items() if t is not None}
        incoming = ("dense" if prefix + "weight" in state_dict else
                    "csr" if prefix + "values" in state_dict else None)
        if incoming is not None and incoming != self.storage:
            device = self._stored().device
            names = ("weight",) if incoming == "dense" else _CSR_BUFFERS
            for k in ("weight", *_CSR_BUFFERS):
                t = state_dict.get(prefix + k) if k in names else None
                self._buffers[k] = torch.empty_like(t, device=device) if isinstance(t, Tensor) else None
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) == errors:  # else, e.g. a size mismatch: nothing of this layer is kept
            try:
                self._sync()
                return
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"{prefix}{exc}")
        for k, t in old.items():
            if t is not None and self._buffers[k] is t:
                with torch.no_grad():
                    t.copy_(saved[k])
            else:
                self._buffers[k] = t
        try:
            self._sync()
        except (TypeError, ValueError):
            self._synced = None  # invalid before the load too: forward raises
