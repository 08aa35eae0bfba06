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

The package, one concept per module: :mod:`.plan` (plans and the storage they need), :mod:`.base`
(storage, validation, caches and the accessors the deployment reads), :mod:`.linear`
(SparseLinear), :mod:`.conv` (SparseConv2d, SparseConv1d); the CSR format itself is
:mod:`sparsevd.ops.csr_linear.format`.
"""
from ...ops.csr_linear.format import to_csr, used_columns
from .base import _SparseBase
from .conv import SparseConv1d, SparseConv2d
from .linear import SparseLinear
from .plan import CONV_MODES, LINEAR_MODES, Plan, dense_plan, normalize_plan, storage_for

#: The deployed layer classes (SparseConv1d is a SparseConv2d).
SPARSE_LAYERS = (SparseLinear, SparseConv2d)

__all__ = ["SparseLinear", "SparseConv2d", "SparseConv1d", "to_csr", "LINEAR_MODES", "CONV_MODES", "Plan",
           "SPARSE_LAYERS"]
