"""The checks of op arguments, in one place: a tensor (floating), its dtype and its device against
another argument's. Shared by the checked entry points (:mod:`sparsevd.functional`,
:func:`sparsevd.ops.csr_linear`) and the layers (:mod:`sparsevd.nn.sparse`); every message names
the argument, and the one it is compared with. The checks of scalar arguments are
:mod:`sparsevd._args`'s.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_device_of", "check_dtype_of", "check_float", "check_tensor"]


def check_tensor(t, name: str, optional: bool = False) -> None:
    """Raise TypeError unless ``t`` is a torch.Tensor (or None, when ``optional``)."""
    if not isinstance(t, Tensor) and not (optional and t is None):
        raise TypeError(f"{name}: expected a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(t).__name__}")


def check_float(t, name: str) -> None:
    """Raise TypeError unless ``t`` is a floating-point torch.Tensor."""
    check_tensor(t, name)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_dtype_of(t: Tensor, name: str, ref: Tensor, ref_name: str,
                   dtype: Optional[torch.dtype] = None) -> None:
    """Raise TypeError unless ``t`` has the dtype of ``ref`` (``dtype`` when given)."""
    want = ref.dtype if dtype is None else dtype
    if t.dtype != want:
        raise TypeError(f"{name}: expected dtype {want} (the dtype of {ref_name}), got {t.dtype}")


def check_device_of(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    """Raise ValueError unless ``t`` is on the device of ``ref``."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")
