"""The training loop's optimiser: Adam immune to subnormal floats (issue 23, item 8).

Under train-time clipping (``sparsevd.convert(..., train_clip=True)``) the clipped weights get zero
gradients, so Adam's moments decay geometrically (m by β₁ = 0.9, v by β₂ = 0.999 per step) through
the subnormal range (|x| < 2⁻¹²⁶ ≈ 1.2e-38 in fp32), where every x86 floating-point operation on
them takes ~100 cycles instead of ~1: the sparse-VD epochs of the main job took 3.8–5.4 s instead of
1.8 s (benchmarks/NOTES.md, "Subnormal floats"). :class:`Adam` runs each step with subnormals flushed
to zero (:func:`flush_denormals`), so such moments become exact zeros (an update of 0 instead of
~1e-31·lr: the same training) and the step costs what it costs without clipping. The library's own
CPU kernels flush inside every call (csrc/cpu/denormals.h).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .ops import library

__all__ = ["Adam", "flush_denormals"]

#: The smallest normal fp32 number; a subnormal probe below it reads as 0 under DAZ.
_PROBE = torch.tensor([1e-40], dtype=torch.float32)


def _calling_thread_flushes() -> bool:
    # DAZ reads the subnormal input as 0 (a 1-element op runs on the calling thread).
    return bool((_PROBE * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero on every intra-op CPU thread inside the block, then restore the
    previous mode (of the calling thread; the other threads of torch's team get the same).

    With the compiled library (:func:`sparsevd.ops.library.set_flush_denormal`) this covers torch's
    OpenMP threads, which run the fused Adam and the elementwise kernels; without it
    ``torch.set_flush_denormal`` covers the calling thread only. ``enabled=False`` does nothing (GPU
    parameters: subnormals cost a GPU nothing).
    """
    if not enabled:
        yield
        return
    if library.has_op("native_set_flush_denormal"):
        previous = library.set_flush_denormal(True)
        try:
            yield
        finally:
            library.set_flush_denormal(previous)
        return
    previous = _calling_thread_flushes()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, update rule, state and ``state_dict``) whose ``step``
    runs under :func:`flush_denormals` when some parameter is on the CPU: moments that would be
    subnormal are exact zeros. ``sparsevd.train.adam`` builds it (fused where torch has it).

    Source: Kingma & Ba, "Adam", ICLR 2015 (the rule); issue 23, item 8 (why the flush).
    """

    def step(self, closure=None):  # noqa: D102 (torch.optim.Adam.step)
        on_cpu = any(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        with flush_denormals(on_cpu):
            return super().step(closure)
