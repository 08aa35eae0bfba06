"""Deployed (inference) layers of sparse VD: SparseLinear, SparseConv2d and SparseConv1d, weights
stored as CSR or dense, as their plan needs.

:func:`sparsevd.deploy` builds them from trained LinearSVDO / Conv2dSVDO layers: weights with
log α ≥ threshold dropped, dead rows and columns removed, what remains stored as CSR (values in
the layer's dtype, int32 row pointers, uint16 column indices when in_features ≤ 65536, else
int32) where the cost model picks the CSR kernel, else as the zero-filled dense ``weight`` (one
format per layer, never both: ``_SparseBase``). Each layer carries a *plan*: which kernel runs at
which batch size,

- ``"csr"``: the sparse kernel :func:`sparsevd.ops.csr_linear` (compiled library sparsevd._C);
- ``"dense"``: compacted dense: the used input columns gathered, then a dense matmul with the
  (out_features, used columns) weight (for convolutions: dense conv2d with the compacted channels);
- ``"masked"``: masked dense: a dense matmul with the zero-filled (out_features, in_features) weight
  (linear only).

Every mode computes what the dense layer with the zero-filled weight computes in IEEE arithmetic,
non-finite inputs included (0·NaN = 0·±inf = NaN: an input NaN or ±inf meeting a pruned weight
makes the output NaN), at every batch size, up to rounding (docs/design.md, "Deployment").

The CSR buffers are validated whenever they can have changed: at construction, after
``load_state_dict`` (a failed check leaves the layer as it was), after ``.to()`` / ``.double()``
(``_apply``; what fails there, e.g. ``to_empty()``, raises at the next use), and at forward when a
buffer was reassigned or edited in place (identities and version counters, ~0.5 µs per call),
which also rebuilds the dense caches. A plan that is one F.linear / F.conv2d at every batch size
(``"masked"``, or ``"dense"`` with every column used) runs just that call on the weight stored at
deploy / load time, after that O(1) check: the ops nn.Linear / nn.Conv2d dispatch, no scan of x,
no host sync. Edits that bypass the version counters (``.data``, numpy
views) are not seen there: the CSR kernel checks the indices itself, so they raise (CPU) or give
NaN (CUDA), never a read out of bounds (the dense modes keep their caches until the next sync).

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369), sec. 5: weights with log α > 3 are set to zero at test time.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .._args import IntOrPair, as_pair, as_single, check_groups
from ..reference import conv_out_size
from ..ops.csr_linear.format import csr_to_dense, to_csr, validate_csr
from ..ops.csr_linear.naive import naive_csr_linear
from ..ops.csr_linear.op import warn_fallback
from ..ops.library import kernel_available
from .svdo import conv_repr

__all__ = ["SparseLinear", "SparseConv2d", "SparseConv1d", "to_csr", "LINEAR_MODES", "CONV_MODES", "Plan"]

LINEAR_MODES = ("csr", "dense", "masked")
CONV_MODES = ("csr", "dense")
#: A plan: ((max_batch, mode), ...) in increasing max_batch; the last max_batch is None (no bound).
Plan = Tuple[Tuple[Optional[int], str], ...]


def used_columns(col_indices: Tensor, in_cols: int) -> Tensor:
    """(in_cols,) bool: the columns that hold at least one stored weight. One scatter over the
    column indices (O(nnz); torch.unique sorts them, ~20 ms for 10⁵ indices)."""
    used = torch.zeros(in_cols, dtype=torch.bool, device=col_indices.device)
    if col_indices.numel():
        used[col_indices.long()] = True
    return used


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


_CSR_BUFFERS = ("crow_indices", "col_indices", "values")
_BUFFERS = ("crow_indices", "col_indices", "values", "weight", "bias")


def storage_for(plan: Plan) -> str:
    """The weight format a plan needs: ``"csr"`` when one of its modes is ``"csr"`` (the kernel
    reads the CSR buffers), else ``"dense"`` (a zero-filled dense ``weight`` buffer)."""
    return "csr" if any(mode == "csr" for _, mode in plan) else "dense"


def _version_sum(tensors) -> int:
    """Sum of the version counters (each bumped by every in-place edit), -1 when one of the tensors
    is an inference tensor (they have none)."""
    if any(t.is_inference() for t in tensors):
        return -1
    return sum(t._version for t in tensors)


def _dense_plan(plan, groups: int) -> bool:
    """Whether a layer built with ``plan`` (None: the default, CSR unless groups > 1) stores its
    weight dense: from_dense then skips building a CSR."""
    if plan is None:
        return groups != 1
    try:
        return storage_for(normalize_plan(plan, LINEAR_MODES)) == "dense"
    except ValueError:
        return False  # the constructor names the error


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
    weight: Optional[Tensor]
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

    # -- validation of the buffers
    def _check_dense(self, weight, bias) -> None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight: expected a floating-point tensor, got dtype {weight.dtype}")
        if tuple(weight.shape) != self._weight_shape():
            raise ValueError(f"weight: expected shape {self._weight_shape()}, got {tuple(weight.shape)}")
        if bias is not None:
            if not isinstance(bias, Tensor):
                raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
            if bias.dtype != weight.dtype:
                raise TypeError(f"bias: expected dtype {weight.dtype} (the dtype of weight), got {bias.dtype}")
            if tuple(bias.shape) != (self._rows,):
                raise ValueError(f"bias: expected shape ({self._rows},) (out features), got {tuple(bias.shape)}")
            if bias.device != weight.device:
                raise ValueError(f"bias: expected a tensor on {weight.device} (the device of weight), "
                                 f"got {bias.device}")

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

    def _use_mode(self, mode: str) -> None:
        """Run ``mode`` at every batch size without rebuilding the caches (the cost model's
        switch between candidates; the current plan's caches must cover ``mode``)."""
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
        if _dense_plan(kwargs.get("plan"), 1):
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
        self.kernel_size = as_pair(kernel_size, "kernel_size", 1)
        self.stride, self.padding = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0)
        self.dilation, self.groups = as_pair(dilation, "dilation", 1), int(groups)
        if isinstance(crow_indices, Tensor) and crow_indices.numel() != out_channels + 1:
            raise ValueError(
                f"crow_indices: expected out_channels + 1 = {out_channels + 1} entries, got "
                f"{crow_indices.numel()}"
            )
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        if plan is None and (self.groups != 1 or weight is not None):
            plan = "dense"
        self._init_storage(crow_indices, col_indices, values, weight, bias, self.out_channels, cols,
                           dense_shape or self._weight_shape(), num_weights, plan, check)

    def _weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

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
        if _dense_plan(kwargs.get("plan"), groups):
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
        return (self._w_dense, self._buffers["bias"], self.stride, self.padding, self.dilation,
                self.groups)

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
                         self.stride, self.padding, self.dilation, self.groups)
        elif mode == "csr":
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


class SparseConv1d(SparseConv2d):
    """Deployed 1-D convolution: a :class:`SparseConv2d` over the input viewed as (N, C, 1, L)
    with a (1, k) kernel (as :class:`~sparsevd.nn.Conv1dSVDO` trains it), the same CSR storage,
    plans and semantics.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as nn.Conv1d
            (ints, or sequences of one int; zero padding, symmetric); stored as the 2-D pairs
            (1, k), (1, s), (0, p), (1, d) of the equivalent SparseConv2d (``kernel_size`` etc.
            are those pairs).
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
        if _dense_plan(kwargs.get("plan"), groups):
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

    def extra_repr(self) -> str:
        plan = ", ".join(f"{'≤' + str(b) if b is not None else 'else'}:{m}" for b, m in self.plan)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kernel_size[1]},), "
                f"stride=({self.stride[1]},), padding=({self.padding[1]},), "
                f"dilation=({self.dilation[1]},), groups={self.groups}, nnz={self.num_nonzero}, "
                f"dense_shape={self.dense_shape}, bias={self.bias is not None}, plan=[{plan}]")
