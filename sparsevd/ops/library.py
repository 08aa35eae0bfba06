"""The one loader of the compiled op library ``sparsevd._C`` (csrc/).

Importing ``sparsevd._C`` registers its C++ ops under ``torch.ops.sparsevd`` (``csr_linear``,
``philox_randn_``, ...). Every module that needs a compiled op asks this module instead of
importing ``_C`` itself, so the import happens once, a failure never breaks ``import sparsevd``,
and the import error is kept for messages (:func:`unavailable_reason`).

The compiled library is optional: without it the package falls back to torch kernels (slower) and
says so once (see :mod:`sparsevd.ops.csr`).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

__all__ = ["BUILD_HINT", "available", "has_cuda", "has_op", "kernel_available", "module",
           "unavailable_reason"]

#: How to build the compiled op library, for messages.
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root (needs a C++ "
    "compiler; CUDA kernels also need nvcc and a CUDA build of torch, or FORCE_CUDA=1; "
    "SPARSEVD_NO_EXT=1 skips the build)"
)

_MODULE: Optional[ModuleType] = None
_ERROR: Optional[str] = None
_LOADED = False
_OPS: dict = {}


def module() -> Optional[ModuleType]:
    """The imported ``sparsevd._C`` module, or None when it is not built (or does not load)."""
    global _MODULE, _ERROR, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            _MODULE = importlib.import_module("sparsevd._C")
        except ImportError as exc:  # not built, or built against another torch
            _MODULE, _ERROR = None, f"{type(exc).__name__}: {exc}"
    return _MODULE


def available() -> bool:
    """True when ``sparsevd._C`` is loaded."""
    return module() is not None


def unavailable_reason() -> Optional[str]:
    """Why ``sparsevd._C`` is not loaded (the import error), or None when it is."""
    module()
    return None if _MODULE is not None else (_ERROR or "sparsevd._C is not loaded")


def has_cuda() -> bool:
    """True when ``sparsevd._C`` was built with its CUDA kernels."""
    m = module()
    return m is not None and bool(getattr(m, "with_cuda", False))


def has_op(name: str) -> bool:
    """True when the compiled library registers ``torch.ops.sparsevd.<name>``."""
    if not available():
        return False
    if name not in _OPS:
        _OPS[name] = hasattr(torch.ops.sparsevd, name)
    return _OPS[name]


def kernel_available(device) -> bool:
    """True when the compiled kernels run on tensors of ``device`` (CPU: the library is loaded;
    CUDA: it was built with CUDA)."""
    device = torch.device(device)
    if device.type == "cpu":
        return available()
    if device.type == "cuda":
        return has_cuda()
    return False
