"""What the two LRT op families, :mod:`sparsevd.ops.lrt_linear` and :mod:`sparsevd.ops.lrt_conv2d`,
share in Python (as csrc/cpu/lrt_common.h does in C++): the outputs of their backward ops, whose
fake implementation and naive math build them the same way.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def backward_outputs_like(x: Tensor, weight: Tensor, log_sigma2: Tensor,
                          need_grad_x: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty (∂x, ∂θ, ∂log σ², ∂b) of an LRT backward op: ∂x like x (an empty (0,) tensor without
    ``need_grad_x``), ∂θ and ∂log σ² like the parameters, ∂b (out_features,) in θ's dtype."""
    return (
        torch.empty_like(x) if need_grad_x else x.new_empty((0,)),
        torch.empty_like(weight),
        torch.empty_like(log_sigma2),
        weight.new_empty((weight.shape[0],)),
    )


def in_parameter_dtypes(grad_x: Tensor, grad_w: Tensor, grad_ls2: Tensor, grad_b: Tensor,
                        weight: Tensor, log_sigma2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂θ, ∂log σ², ∂b) with the parameter gradients cast to their parameters' dtypes (the
    naive backward computes them in std's dtype)."""
    return grad_x, grad_w.to(weight.dtype), grad_ls2.to(log_sigma2.dtype), grad_b.to(weight.dtype)
