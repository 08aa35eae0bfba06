"""The one loader of the compiled op library ``sparsevd._C`` (csrc/), and its CPU switches.

Importing ``sparsevd._C`` registers its C++ ops under ``torch.ops.sparsevd`` (every schema is in
csrc/ops.cpp: ``csr_linear``, ``philox_randn_``, the ``native_*`` kernels of the op families).
Every module that needs a compiled op asks this module instead of importing ``_C`` itself, so the
import happens once, a failure never breaks ``import sparsevd``, and the import error is kept for
messages (:func:`unavailable_reason`, :func:`require_ops`).

The compiled library is optional: without it the package falls back to torch kernels (slower) and
says so once (see ``sparsevd/ops/csr_linear/op.py``).

Switches of the compiled CPU kernels, for tests and benchmarks (ops without tensor arguments):

- the instruction set, one switch for every CPU kernel (the LRT and KL passes, the noise
  generator, the CSR kernels' AVX-512 and AVX2 paths): :func:`set_cpu_isa` / :func:`cpu_isa`
  (``torch.ops.sparsevd.native_set_isa`` / ``native_isa``; ``SPARSEVD_CPU_ISA`` sets it at load);
- ``native_set_products("auto" | "serial" | "concurrent")`` (also ``SPARSEVD_NATIVE_PRODUCTS``):
  how the LRT ops run their GEMMs;
- ``native_set_compact("auto" | "never" | "always" | "sparse")`` (also
  ``SPARSEVD_NATIVE_COMPACT``): what the clipped LRT products run on (the measured rule, the full
  weights, the occupied rows and columns whenever some are dead, or the CSR of the kept weights
  (linear layers; conv2d then compacts)), and ``native_clip_occupancy(weight, log_sigma2,
  clip_threshold)``, the weight pass's per-row and per-column counts of occupied weights (int64);
- ``native_sigma2_cache(enabled)`` and ``native_sigma2_cache_stats()`` (hits, misses, entries of
  the cache that hands the forward's weight pass to the backward).
- ``native_set_flush_denormal(on)`` / ``native_denormals_flushed()``: flush-to-zero of subnormal
  floats on every intra-op thread (:func:`set_flush_denormal` / :func:`denormals_flushed`; the
  library's own kernels flush inside every call anyway, csrc/cpu/denormals.h).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional, Tuple

import torch

__all__ = ["BUILD_HINT", "CPU_ISAS", "available", "cpu_isa", "has_cuda", "has_op", "kernel_available",
           "denormals_flushed", "module", "require_ops", "set_cpu_isa", "set_flush_denormal",
           "supported_cpu_isas", "unavailable_reason"]

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


def require_ops(*names: str) -> None:
    """Raise ImportError unless ``sparsevd._C`` is loaded and registers every op in ``names``: a
    backend module calls this at import, which makes its backend unavailable (with this message)
    where the library is missing or stale."""
    if not available():
        raise ImportError(f"sparsevd._C is not available: {unavailable_reason()}")
    missing = [name for name in names if not has_op(name)]
    if missing:
        raise ImportError(f"sparsevd._C has no {', '.join(missing)}: rebuild the extension "
                          "(pip install --no-build-isolation -e .)")


#: The kernel sets of the compiled CPU kernels, widest first ("auto" picks the widest this CPU runs).
CPU_ISAS = ("avx512", "avx2", "scalar")


def cpu_isa() -> str:
    """The kernel set the compiled CPU kernels run now: "avx512", "avx2" or "scalar" (portable C++)."""
    require_ops("native_isa")
    return torch.ops.sparsevd.native_isa()


def set_cpu_isa(isa: str) -> str:
    """Switch every compiled CPU kernel to the kernel set ``isa`` ("avx512", "avx2", "scalar" or
    "auto"); returns the previous one. The CSR kernels follow it: "avx512" runs their AVX-512
    SpMM tiles (their SpMV and index checks are AVX2), "avx2" their AVX2 code, "scalar" their
    portable code.

    Raises:
        RuntimeError: this CPU does not run ``isa`` (the message names ``isa``).
        ImportError: the compiled library is not built.
    """
    require_ops("native_set_isa")
    return torch.ops.sparsevd.native_set_isa(isa)


def supported_cpu_isas() -> Tuple[str, ...]:
    """The kernel sets of :data:`CPU_ISAS` that this CPU runs (none without the compiled library)."""
    if not has_op("native_set_isa"):
        return ()
    previous = cpu_isa()
    out = []
    try:
        for isa in CPU_ISAS:
            try:
                set_cpu_isa(isa)
            except RuntimeError:
                continue
            out.append(isa)
    finally:
        set_cpu_isa(previous)
    return tuple(out)


def set_flush_denormal(on: bool) -> bool:
    """Flush subnormal floats to zero (``on=True``: x86 MXCSR FTZ and DAZ, AArch64 FPCR FZ) or stop
    flushing, on the calling thread and on every thread of torch's intra-op (OpenMP) team: unlike
    ``torch.set_flush_denormal``, which sets the calling thread only, this reaches the threads that
    run torch's parallel kernels (the fused Adam among them). Returns whether the calling thread
    flushed before, to restore it (``sparsevd.optim.flush_denormals`` does both).

    Raises:
        ImportError: the compiled library is not built (or predates this switch).
    """
    require_ops("native_set_flush_denormal")
    return bool(torch.ops.sparsevd.native_set_flush_denormal(bool(on)))


def denormals_flushed() -> Tuple[bool, ...]:
    """Whether subnormals are flushed, per intra-op thread: the calling thread first, then the other
    threads of torch's OpenMP team (``torch.get_num_threads()`` entries; all False on a CPU without
    such a mode).

    Raises:
        ImportError: the compiled library is not built (or predates this switch).
    """
    require_ops("native_denormals_flushed")
    return tuple(bool(b) for b in torch.ops.sparsevd.native_denormals_flushed())
