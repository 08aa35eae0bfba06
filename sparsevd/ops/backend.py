"""Backend selection: which implementation runs an op.

``SPARSEVD_BACKEND`` (read at each call) is one of:

- ``auto`` (default): the Triton kernels for CUDA tensors, the compiled ``native`` CPU kernels
  for CPU tensors (when ``sparsevd._C`` has them), the reference math otherwise;
- ``native``: force the compiled CPU kernels of ``csrc/cpu`` (CPU tensors only);
- ``triton``: force the Triton kernels (on CPU tensors only under ``TRITON_INTERPRET=1``,
  Triton's interpreter);
- ``reference``: the plain-PyTorch math of each family (``sparsevd/ops/<family>/naive.py``), the
  specification and the fallback.

The deployed layers' ``csr_linear`` is no backend op: it is the compiled library's
(``sparsevd/ops/csr_linear/``: its dispatcher is its op.py), with a torch fallback.

Each op family (``sparsevd/ops/<family>/``) declares its ops with :func:`register_family` and
registers its ``reference`` implementations (its naive math) in its ``op.py``; the modules
``sparsevd.ops.<family>.native`` and ``sparsevd.ops.<family>.triton`` register the other
backends' implementations with :func:`register_impl` when imported, which :func:`get_impl` does
on the first call that needs them (an ImportError makes that backend unavailable for the family,
with the error in the message). A backend may also register an eager autograd implementation of
an op under ``"<op>:eager"`` (the native backend's C++ autograd ops): :func:`eager_impl` hands it
out for calls that may bypass the custom op. Nothing else imports a backend module.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import torch

BACKENDS = ("auto", "native", "triton", "reference")
#: The backends whose implementations live in a module per family, loaded on first use.
LAZY_BACKENDS = ("native", "triton")
ENV_VAR = "SPARSEVD_BACKEND"

_IMPLS: Dict[Tuple[str, str], Callable] = {}
_FAMILY_OF: Dict[str, str] = {}  # op name -> family (the package under sparsevd/ops)
_LOAD_ERRORS: Dict[Tuple[str, str], str] = {}  # (family, backend) -> why its module did not import
_LOADED: Set[Tuple[str, str]] = set()  # imported once: get_impl runs on every layer call


class BackendUnavailableError(RuntimeError):
    """Raised when SPARSEVD_BACKEND names a backend that cannot run the requested op here."""


def register_family(family: str, ops: Sequence[str]) -> None:
    """Declare the ops of the family ``family``, whose backend modules are
    ``sparsevd.ops.<family>.native`` and ``sparsevd.ops.<family>.triton``."""
    for op in ops:
        _FAMILY_OF[op] = family


def families() -> Tuple[str, ...]:
    """The op families declared so far (every one is, once :mod:`sparsevd.ops` is imported)."""
    return tuple(sorted(set(_FAMILY_OF.values())))


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


def no_autocast(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off for the device of its first tensor argument (or of the first
    tensor of a list there): a custom op's implementation still sees the caller's autocast state,
    which would recast its fp32 math to the autocast dtype."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def load_backend(backend: str, family: Optional[str] = None) -> bool:
    """Import the module of ``backend`` for ``family`` (every declared family when None); True
    when all of them are imported. An ImportError is kept for the messages of :func:`get_impl`."""
    if backend not in LAZY_BACKENDS:
        return backend == "reference"
    ok = True
    for fam in (families() if family is None else (family,)):
        key = (fam, backend)
        if key in _LOADED:
            continue
        if key in _LOAD_ERRORS:
            ok = False
            continue
        try:
            importlib.import_module(f"sparsevd.ops.{fam}.{backend}")
        except ImportError as exc:  # triton or the compiled extension missing
            _LOAD_ERRORS[key] = str(exc)
            ok = False
            continue
        _LOADED.add(key)
    return ok


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "native":
        return device.type == "cpu"
    return True


def _available(op: str, backend: str) -> bool:
    if (op, backend) in _IMPLS:  # the hot path: one lookup once the module is imported
        return True
    family = _FAMILY_OF.get(op)
    return family is not None and load_backend(backend, family) and (op, backend) in _IMPLS


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
        backend = "triton" if device.type == "cuda" else "native"
        if _available(op, backend):
            return backend, _IMPLS[(op, backend)]
        return "reference", _IMPLS[(op, "reference")]
    if want != "reference":
        if not _available(op, want):
            why = _LOAD_ERRORS.get((_FAMILY_OF.get(op, ""), want),
                                   f"it has no kernel for the op {op!r}")
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
