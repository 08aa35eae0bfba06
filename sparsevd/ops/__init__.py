"""``torch.library`` custom ops of sparsevd (namespace ``sparsevd``).

Ops: ``lrt_linear``, ``lrt_linear_backward``, ``lrt_conv2d``, ``lrt_conv2d_backward`` (the
backward ops skip ∂x with ``need_grad_x=False``), ``kl_sparse_vd``, ``log_alpha`` (and ``csr_linear`` from the compiled library, when built). Each has
a fake (meta) implementation and a registered autograd, and dispatches to the backend chosen by
``SPARSEVD_BACKEND`` (see :mod:`sparsevd.ops.backend`). ``run_lrt_linear``, ``run_lrt_conv2d`` and
``run_kl_sparse_vd`` return the differentiable output through the backend's eager autograd op
where it has one (native, eager mode) and through the custom op otherwise. The user-facing API with
argument checks is :mod:`sparsevd.functional`.
"""
from . import reference_impl  # noqa: F401  registers the reference backend
from .csr import csr_linear
from .backend import BACKENDS, BackendUnavailableError, get_impl, register_impl, requested_backend
from .kl import kl_sparse_vd, log_alpha, run_kl_sparse_vd
from .lrt import (lrt_conv2d, lrt_conv2d_backward, lrt_linear, lrt_linear_backward, run_lrt_conv2d,
                  run_lrt_linear)
from .noise import lrt_noise

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "csr_linear",
    "get_impl",
    "register_impl",
    "requested_backend",
    "kl_sparse_vd",
    "log_alpha",
    "lrt_conv2d",
    "lrt_conv2d_backward",
    "lrt_linear",
    "lrt_linear_backward",
    "lrt_noise",
    "run_kl_sparse_vd",
    "run_lrt_conv2d",
    "run_lrt_linear",
]
