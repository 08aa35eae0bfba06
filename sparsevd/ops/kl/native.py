"""The ``native`` backend of ``kl_sparse_vd``: the compiled CPU kernel of csrc/cpu/kl_cpu.cpp
(``torch.ops.sparsevd.native_kl_sparse_vd``: the KL of all layers and its gradients in one pass)
and its eager C++ autograd (csrc/cpu/autograd_cpu.cpp, ``native_kl_sparse_vd_autograd``).

The KL op also reports, per layer and in the same pass, whether any θ or log σ² is NaN or ±inf:
the (num_layers,) bool tensor of the most recent call is :data:`last_nonfinite` (read it with
:func:`nonfinite_layers`), so a training loop can check for divergence without an extra pass or
a host sync per layer; with thresholds it also counts the weights kept at evaluation per layer
(:func:`native_kl_sparse_vd_kept`). CPU tensors only; importing this module raises ImportError when the
compiled library or these ops are missing.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import library
from ..backend import register_impl

library.require_ops("native_kl_sparse_vd", "native_kl_sparse_vd_autograd")
_ops = torch.ops.sparsevd

#: (num_layers,) bool tensor of the most recent ``kl_sparse_vd`` call on this backend: True where
#: that layer's θ or log σ² contains a NaN or ±inf. None before the first call.
last_nonfinite: Optional[torch.Tensor] = None


def nonfinite_layers() -> Optional[torch.Tensor]:
    """The per-layer non-finite flags of the most recent native KL call (see :data:`last_nonfinite`)."""
    return last_nonfinite


def native_kl_sparse_vd(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool):
    return native_kl_sparse_vd_kept(weights, log_sigma2s, with_grad, None)[:3]


def native_kl_sparse_vd_kept(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor], with_grad: bool,
                             thresholds: Optional[List[float]]):
    """(KL, [∂KL/∂θ], [∂KL/∂log σ²], kept): kept int64 (num_layers,), counted in the KL's pass
    (empty when ``thresholds`` is None)."""
    global last_nonfinite
    kl, grads_w, grads_ls2, flags, kept = _ops.native_kl_sparse_vd(weights, log_sigma2s, with_grad, thresholds)
    last_nonfinite = flags
    return kl, list(grads_w), list(grads_ls2), kept


def native_kl_sparse_vd_eager(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor]):
    """The KL (0-dim) with autograd; the gradients are computed in the same pass when grad mode is
    on and some parameter requires grad."""
    global last_nonfinite
    kl, last_nonfinite, _ = _ops.native_kl_sparse_vd_autograd(weights, log_sigma2s)
    return kl


def native_kl_sparse_vd_kept_eager(weights: List[torch.Tensor], log_sigma2s: List[torch.Tensor],
                                   thresholds: List[float]):
    """(KL with autograd, as :func:`native_kl_sparse_vd_eager`; the per-layer kept counts)."""
    global last_nonfinite
    kl, last_nonfinite, kept = _ops.native_kl_sparse_vd_autograd(weights, log_sigma2s, thresholds)
    return kl, kept


register_impl("kl_sparse_vd", "native", native_kl_sparse_vd)
register_impl("kl_sparse_vd:eager", "native", native_kl_sparse_vd_eager)
register_impl("kl_sparse_vd_kept", "native", native_kl_sparse_vd_kept)
register_impl("kl_sparse_vd_kept:eager", "native", native_kl_sparse_vd_kept_eager)
