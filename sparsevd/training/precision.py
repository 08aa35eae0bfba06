"""Mixed precision of ``fit(amp=...)``: the autocast of the forward and fp16's GradScaler.

The parameters, the KL and the LRT variance path stay fp32 (σ² ≈ e⁻¹⁰ would underflow fp16);
evaluation runs in fp32.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

__all__ = ["AMP_DTYPES", "autocast", "check_amp", "fp16_init_scale", "grad_scaler"]

#: Mixed precision of ``fit(amp=...)``: the autocast dtype of the forward (parameters, the KL and
#: the LRT variance stay fp32; fp16 adds a GradScaler and needs CUDA).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fp16_init_scale(loss_scale: float) -> float:
    """The initial scale of fp16 training's GradScaler for a loss of magnitude ``loss_scale`` per
    image: 2¹⁶ (GradScaler's default) for a mean cross-entropy (1), 2¹⁶ / 2^⌈log₂ N⌉ for the SGVLB
    N · CE + β · KL, whose ∂/∂logit is N/B times larger (paper, eq. 3): with the default, the first
    fp16 gradients of a 60 000-image data term overflow (N/B · 2¹⁶ > 65 504) and GradScaler would
    skip some ten steps backing off. A power of two, so scaling is exact."""
    return 2.0 ** (16 - math.ceil(math.log2(max(loss_scale, 1.0))))


def check_amp(amp: Optional[str], device: Optional[torch.device] = None) -> None:
    """Raise ValueError naming ``amp`` for an unknown mode, or fp16 off CUDA (when ``device`` is given)."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp: expected None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
    if device is not None and amp == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 needs a CUDA device (its GradScaler); use amp='bf16' on the CPU")


def grad_scaler(amp: Optional[str], loss_scale: float) -> Optional[torch.amp.GradScaler]:
    """fp16's GradScaler for a loss of magnitude ``loss_scale`` per example (None unless fp16)."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler("cuda", init_scale=fp16_init_scale(loss_scale))


def autocast(amp: Optional[str], device: torch.device):
    """The forward's autocast context for ``amp`` on ``device`` (a no-op for None)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
