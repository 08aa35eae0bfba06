"""What a deployment is compared with: the dense twin of a trained model (:func:`dense_twin`), the
bytes of both (:func:`dense_bytes`, :func:`deployed_bytes`) and their latency (:func:`latency`);
``sparsevd deploy`` prints them, the benchmarks time them.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch
from torch import nn

from .nn.sparse import SPARSE_LAYERS
from .nn.svdo import SVDO_LAYERS, Conv1dSVDO, LinearSVDO

__all__ = ["dense_bytes", "dense_twin", "deployed_bytes", "latency"]


def dense_twin(model: nn.Module) -> nn.Module:
    """The model with every LinearSVDO / Conv2dSVDO replaced by nn.Linear / nn.Conv2d holding its
    eval-mode weight θ ⊙ [log α < threshold]: what a dense deployment would run."""
    model = copy.deepcopy(model).eval()

    def convert(m: nn.Module) -> nn.Module:
        w = (m.weight * m.mask()).detach()  # the eval-mode weight θ ⊙ [log α < threshold]
        if isinstance(m, LinearSVDO):
            d = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=w.device, dtype=w.dtype)
        else:
            d = (nn.Conv1d if isinstance(m, Conv1dSVDO) else nn.Conv2d)(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          m.dilation, m.groups, bias=m.bias is not None, device=w.device,
                          dtype=w.dtype)
        with torch.no_grad():
            d.weight.copy_(w)
            if m.bias is not None:
                d.bias.copy_(m.bias)
        return d.eval().requires_grad_(False)

    if isinstance(model, SVDO_LAYERS):
        return convert(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SVDO_LAYERS):
                setattr(parent, name, convert(child))
    return model


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the weights and biases of the sparse-VD layers as dense tensors."""
    return _tensor_bytes(t for m in model.modules() if isinstance(m, SVDO_LAYERS)
                         for t in (m.weight, m.bias) if t is not None)


def deployed_bytes(model: nn.Module) -> int:
    """Bytes of the tensors of the deployed layers (CSR + biases)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, SPARSE_LAYERS))


@torch.no_grad()
def latency(models: Dict[str, nn.Module], x: torch.Tensor, min_time: float) -> Dict[str, List[float]]:
    """Per model, the sorted times (s) of single forward calls on ``x``, interleaved."""
    for m in models.values():
        m(x)
    times: Dict[str, List[float]] = {k: [] for k in models}
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or min(len(v) for v in times.values()) < 5:
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v) for k, v in times.items()}
