"""Backend selection (sparsevd.ops.backend): SPARSEVD_BACKEND values, availability errors, which
backend ``auto`` picks, and that every family has its backend modules."""
import pytest
import torch
from conftest import assert_close
from sample_inputs import kl_params, linear_inputs

import sparsevd.functional as SF
from sparsevd.ops import backend, library
from sparsevd.ops.lrt_linear import naive_lrt_linear
from sparsevd.ops.noise import draw_seed

TRAINING_OPS = ["lrt_linear", "lrt_linear_backward", "lrt_conv2d", "lrt_conv2d_backward", "kl_sparse_vd"]


def _lin_args():
    return linear_inputs((3,), 4, 2, torch.float32, True)


def test_backend_unknown_value_raises_value_error(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "tritonn")
    with pytest.raises(ValueError,
                       match=r"SPARSEVD_BACKEND='tritonn'.*auto, native, triton, reference"):
        SF.lrt_linear(*_lin_args())
    with pytest.raises(ValueError, match="SPARSEVD_BACKEND"):
        backend.requested_backend()


@pytest.mark.parametrize("value", ["reference", "auto", " Reference ", ""])
def test_backend_reference_and_auto_run_on_cpu(monkeypatch, value):
    monkeypatch.setenv("SPARSEVD_BACKEND", value)
    x, w, ls2, b = _lin_args()
    seed = draw_seed()
    y = SF.lrt_linear(x, w, ls2, b, seed=seed)
    expected = naive_lrt_linear(x.double(), w.double(), ls2.double(), b.double(), seed)[0]
    assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_backend_triton_without_interpreter_on_cpu_raises(monkeypatch):
    # Import the Triton provider (if present) with the interpreter on, so its @triton.jit
    # functions stay usable by the rest of the session.
    backend.load_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")
    with pytest.raises(backend.BackendUnavailableError, match="SPARSEVD_BACKEND=triton"):
        SF.lrt_linear(*_lin_args())
    # Even where the Triton backend has the op, CPU tensors need the interpreter.
    monkeypatch.setitem(backend._IMPLS, ("lrt_linear", "triton"), naive_lrt_linear)
    with pytest.raises(backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        SF.lrt_linear(*_lin_args())
    with pytest.raises(backend.BackendUnavailableError):
        backend.get_impl("lrt_linear", torch.device("cpu"))


def test_backend_without_the_op_raises(monkeypatch):
    """A forced backend that lacks an op says so, naming the backend and the op."""
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")
    backend.load_backend("triton")
    for op in ("lrt_linear", "kl_sparse_vd"):
        monkeypatch.delitem(backend._IMPLS, (op, "triton"), raising=False)
    with pytest.raises(backend.BackendUnavailableError, match="SPARSEVD_BACKEND=triton.*lrt_linear"):
        SF.lrt_linear(*_lin_args())
    w, s = kl_params((3, 3))
    with pytest.raises(backend.BackendUnavailableError, match="kl_sparse_vd"):
        SF.kl_sparse_vd(w, s)


def test_dead_backend_names_are_rejected(monkeypatch):
    """``cuda`` named a module that never existed; it is an unknown value now, like any typo."""
    monkeypatch.setenv("SPARSEVD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPARSEVD_BACKEND='cuda' is not a backend"):
        SF.lrt_linear(*_lin_args())


def test_backend_error_is_a_runtime_error():
    assert issubclass(backend.BackendUnavailableError, RuntimeError)
    with pytest.raises(ValueError, match="backend"):
        backend.register_impl("lrt_linear", "auto", naive_lrt_linear)


@pytest.mark.parametrize("op", TRAINING_OPS)
def test_auto_picks_triton_for_cuda_tensors(monkeypatch, op):
    """``auto`` sends CUDA tensors to the Triton kernels for every training op (the linear and
    the conv layers, Conv1dSVDO through lrt_conv2d, and the KL), CPU tensors to native when built."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SPARSEVD_BACKEND", "auto")
    name, fn = backend.get_impl(op, torch.device("cuda"))
    assert name == "triton" and fn.__module__ == f"sparsevd.ops.{backend._FAMILY_OF[op]}.triton"
    cpu_name, _ = backend.get_impl(op, torch.device("cpu"))
    assert cpu_name == ("native" if library.available() else "reference")


@pytest.mark.skipif(not library.available(), reason="sparsevd._C not built")
def test_auto_picks_native_on_cpu_only(monkeypatch):
    monkeypatch.setenv("SPARSEVD_BACKEND", "auto")
    for op in TRAINING_OPS:
        assert backend.get_impl(op, torch.device("cpu"))[0] == "native"
        assert backend.get_impl(op, torch.device("cuda"))[0] != "native"
    monkeypatch.setenv("SPARSEVD_BACKEND", "native")
    with pytest.raises(backend.BackendUnavailableError, match="native kernels need CPU tensors"):
        backend.get_impl("lrt_linear", torch.device("cuda"))
    assert "native" in backend.BACKENDS


def test_every_family_declares_its_ops():
    """The families the ops package declares, each op in one, with a reference implementation."""
    assert backend.families() == ("kl", "lrt_conv2d", "lrt_linear")
    for op in TRAINING_OPS:
        assert backend._FAMILY_OF[op] in backend.families()
        assert (op, "reference") in backend._IMPLS


@pytest.mark.parametrize("op", TRAINING_OPS)
def test_triton_forced_runs_cpu_tensors_under_the_interpreter(monkeypatch, op):
    """SPARSEVD_BACKEND=triton runs every training op's kernels on CPU tensors when Triton's
    interpreter is on (how the tests check them without a GPU), from the family's triton module."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPARSEVD_BACKEND", "triton")
    name, fn = backend.get_impl(op, torch.device("cpu"))
    assert name == "triton" and fn.__module__ == f"sparsevd.ops.{backend._FAMILY_OF[op]}.triton"
