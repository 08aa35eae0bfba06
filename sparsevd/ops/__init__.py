"""``torch.library`` custom ops of sparsevd (namespace ``sparsevd``), one package per op family.

- :mod:`.lrt_linear`: ``lrt_linear``, ``lrt_linear_backward`` (the LRT linear layer);
- :mod:`.lrt_conv2d`: ``lrt_conv2d``, ``lrt_conv2d_backward`` (the LRT convolution; 1-D too);
- :mod:`.kl`: ``kl_sparse_vd`` (the KL of many layers and its gradients), ``log_alpha``;
- :mod:`.csr_linear`: ``csr_linear`` (the deployed layers' matmul, from the compiled library, with a
  torch fallback); ``sparsevd.ops.csr_linear`` is that function, its package's modules are
  imported by name (``from sparsevd.ops.csr_linear import format``).

A family's package holds its math (``naive.py``, the ``reference`` backend), its custom ops with
fake implementations and autograd (``op.py``), and one module per other backend (``native.py``,
``triton.py``), which :mod:`.backend` imports on first use (``SPARSEVD_BACKEND``; csr_linear's
``op.py`` imports its ``native.py`` itself). What the families share: :mod:`.weights` (the
per-weight math: log α, the masks, the constants), :mod:`.conv_geometry`, :mod:`.checks` (the
checks of tensor arguments), :mod:`.noise` (ξ and the seed), :mod:`.triton_common`,
:mod:`.library` (the one loader of ``sparsevd._C`` and its CPU switches). The user-facing API with
argument checks is :mod:`sparsevd.functional`; docs/design.md, "Layout", maps every file.
"""
from . import kl, lrt_conv2d, lrt_linear
from .backend import BACKENDS, BackendUnavailableError, get_impl, register_impl, requested_backend
from .csr_linear import csr_linear  # the function; the package stays in sys.modules

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "csr_linear",
    "get_impl",
    "kl",
    "lrt_conv2d",
    "lrt_linear",
    "register_impl",
    "requested_backend",
]
