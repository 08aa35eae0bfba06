"""Backend selection: which implementation runs an op.

``SPARSEVD_BACKEND`` (read at each call) is one of:

- ``auto`` (default): the Triton kernels for CUDA tensors, the compiled ``native`` CPU kernels
  for CPU tensors (when ``sparsevd._C`` has them), the reference math otherwise;
- ``native``: force the compiled CPU kernels of ``csrc/cpu`` (:mod:`sparsevd.ops.native_impl`;
  CPU tensors only);
- ``triton``: force the Triton kernels (:mod:`sparsevd.ops.triton_impl`; on CPU tensors only
  under ``TRITON_INTERPRET=1``, Triton's interpreter);
- ``reference``: the plain-PyTorch math of :mod:`sparsevd.reference`
  (:mod:`sparsevd.ops.reference_impl`), the specification and the fallback.

The deployed layers' ``csr_linear`` is no backend op: it is the compiled library's
(:mod:`sparsevd.ops.csr`), with a torch fallback.

Implementations register themselves per (op name, backend) with :func:`register_impl`; the op
entry points in :mod:`sparsevd.ops` look them up with :func:`get_impl`. A backend may also register
an eager autograd implementation of an op under ``"<op>:eager"`` (the native backend's C++
autograd ops): :func:`eager_impl` hands it out for calls that may bypass the custom op.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional, Set, Tuple

import torch

BACKENDS = ("auto", "native", "triton", "reference")
ENV_VAR = "SPARSEVD_BACKEND"

_IMPLS: Dict[Tuple[str, str], Callable] = {}
# Modules that register implementations when imported, per backend.
_PROVIDERS = {
    "triton": "sparsevd.ops.triton_impl",
    "native": "sparsevd.ops.native_impl",
}
_PROVIDER_ERRORS: Dict[str, str] = {}
_PROVIDERS_LOADED: Set[str] = set()  # imported once: get_impl runs on every layer call


class BackendUnavailableError(RuntimeError):
    """Raised when SPARSEVD_BACKEND names a backend that cannot run the requested op here."""


def register_impl(op: str, backend: str, fn: Callable) -> Callable:
    """Register ``fn`` as the implementation of ``op`` (e.g. "lrt_linear") for ``backend``."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend: expected one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLS[(op, backend)] = fn
    return fn


def requested_backend() -> str:
    """The value of SPARSEVD_BACKEND, validated (raises ValueError on an unknown value)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        )
    return value


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_provider(backend: str) -> bool:
    if backend in _PROVIDERS_LOADED:
        return True
    module = _PROVIDERS.get(backend)
    if module is None:
        return False
    if backend in _PROVIDER_ERRORS:
        return False
    try:
        importlib.import_module(module)
    except ImportError as exc:  # triton or the compiled extension missing
        _PROVIDER_ERRORS[backend] = str(exc)
        return False
    _PROVIDERS_LOADED.add(backend)
    return True


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "native":
        return device.type == "cpu"
    return True


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_impl(op: str, device: torch.device, tensors) -> Optional[Callable]:
    """The eager autograd implementation of ``op`` that the backend chosen for ``device``
    registered (as ``"<op>:eager"``), for a call that may bypass the custom op: not traced by
    torch.compile, no torch-function or dispatch mode and no functorch transform active, not on the
    meta device (the custom op's fake implementation gives the shapes there), and every
    tensor in ``tensors`` (None entries are skipped) a plain tensor or parameter. None otherwise,
    or when the backend has none: then the custom op runs.

    Raises: as :func:`get_impl`.
    """
    if (device.type == "meta" or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active()
            or torch._C._is_torch_function_mode_enabled()):
        return None
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return None
    backend, _ = get_impl(op, device)
    return _IMPLS.get((op + ":eager", backend))


def get_impl(op: str, device: torch.device) -> Tuple[str, Callable]:
    """The (backend name, implementation) that runs ``op`` on tensors on ``device``.

    Raises:
        ValueError: SPARSEVD_BACKEND has an unknown value.
        BackendUnavailableError: the forced backend cannot run ``op`` on ``device`` here.
    """
    want = requested_backend()
    if want == "auto":
        order = ("triton",) if device.type == "cuda" else ("native",)
        for backend in order:
            if _load_provider(backend) and (op, backend) in _IMPLS:
                return backend, _IMPLS[(op, backend)]
        return "reference", _IMPLS[(op, "reference")]
    if want != "reference":
        _load_provider(want)
        if (op, want) not in _IMPLS:
            why = _PROVIDER_ERRORS.get(want, f"it has no kernel for the op {op!r}")
            raise BackendUnavailableError(
                f"{ENV_VAR}={want} cannot run sparsevd.{op}: {why}"
            )
        if not _device_ok(want, device):
            raise BackendUnavailableError(
                f"{ENV_VAR}={want} cannot run sparsevd.{op} on {device.type} tensors: "
                + ("the native kernels need CPU tensors" if want == "native" else
                   "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
            )
    return want, _IMPLS[(op, want)]
