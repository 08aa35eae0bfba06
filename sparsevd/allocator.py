"""CPU training and glibc's heap: keep freed memory instead of returning it to the system.

A sparse-VD training step allocates and frees several weight-sized buffers per layer (σ², the LRT
and KL gradients and their sum). With glibc's default, dynamic thresholds the heap is trimmed after
the backward frees them, and the next step's buffers are faulted in again, page by page:
LeNet-300-100 took ~50–230 minor page faults per step (0.3–0.8 ms, 6–8 % of a step on one thread;
benchmarks/NOTES.md), where a dense step takes none. Fixed thresholds
(``M_TRIM_THRESHOLD`` 256 MiB, ``M_MMAP_THRESHOLD`` 32 MiB, what the environment variables
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` set) keep the freed pages in the process:
no faults, at the price of a resident set that stays at its peak (up to 256 MiB more). Allocations
above 32 MiB are still mapped and unmapped as before.

:func:`sparsevd.train.fit` (and so ``sparsevd train``) calls :func:`keep_freed_memory` for CPU
runs; custom training loops can call it once. It changes the whole process's allocator, so it is
opt-out: ``SPARSEVD_KEEP_FREED_MEMORY=0`` turns it off, and it does nothing when either glibc
variable is set (the user chose) or the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

TRIM_THRESHOLD = 256 * 1024 * 1024
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
ENV_VAR = "SPARSEVD_KEEP_FREED_MEMORY"

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to fixed values (module docstring), once per process.

    Returns:
        True when the thresholds are (now, or already) set by this function; False when it did
        nothing: ``SPARSEVD_KEEP_FREED_MEMORY=0``, ``MALLOC_TRIM_THRESHOLD_`` or
        ``MALLOC_MMAP_THRESHOLD_`` set, not glibc, or ``mallopt`` refused.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_VAR, "1").strip() in ("0", "false", "no", "off"):
        return False
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu = libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied
