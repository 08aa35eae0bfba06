"""Test configuration: Triton's interpreter must be on before any @triton.jit runs (docs/design.md,
"Backends")."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot runs in numpy: a multi-threaded OpenBLAS spins on tiny tiles.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    """Tests run tiny ops: one intra-op thread, so OpenMP barriers do not spin against other
    processes of a 2-core machine. A module that tests multi-threaded kernels sets
    ``KEEP_THREADS = True``."""
    if getattr(request.module, "KEEP_THREADS", False):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs in every test, yet reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


def assert_close(actual, expected, rtol, atol, name="output"):
    """allclose with a report of the worst element, its index and the fraction that fails."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten or NaN elements)"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        idx = int(torch.argmax(err - bound))
        flat_idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements ({100.0 * bad.float().mean():.3f}%) "
            f"outside atol={atol}, rtol={rtol}; worst at {flat_idx}: "
            f"{a.reshape(-1)[idx].item()} vs {e.reshape(-1)[idx].item()}"
        )


def assert_ieee_close(actual, expected, rtol, atol, name="output"):
    """NaN-aware comparison of every element: NaN at the same positions, ±inf at the same positions
    with the same sign, the finite values within atol + rtol·|expected| (reported like assert_close)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    for what, fa, fe in (("NaN", a.isnan(), e.isnan()), ("+inf", a == float("inf"), e == float("inf")),
                         ("-inf", a == float("-inf"), e == float("-inf"))):
        diff = fa != fe
        if diff.any():
            idx = tuple(int(i) for i in diff.nonzero()[0])
            raise AssertionError(
                f"{name}: {int(diff.sum())}/{diff.numel()} elements differ in being {what}; first at "
                f"{idx}: {a[idx].item()} vs {e[idx].item()}"
            )
    finite = torch.isfinite(e)
    assert_close(torch.where(finite, a, 0.0), torch.where(finite, e, 0.0), rtol, atol, name=name)


@pytest.fixture(params=[True, False], ids=["avx2", "portable"])
def simd(request):
    """Run fp32 cases of the compiled CPU kernels with the AVX2 code and with the portable C++."""
    from sparsevd.ops import library

    C = library.module()
    if C is None:
        pytest.skip(f"sparsevd._C not built ({library.unavailable_reason()})")
    if request.param and not C.cpu_simd_available():
        pytest.skip("no AVX2+FMA on this CPU")
    old = C.set_cpu_simd(request.param)
    yield request.param
    C.set_cpu_simd(old)


def prune(model, p=0.7):
    """Drop a random share ``p`` of every sparse-VD layer's weights (log σ² = 20: log α = 10)
    under no_grad; returns ``model``."""
    import sparsevd

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.nn.SVDO_LAYERS):
                m.log_sigma2[torch.rand_like(m.log_sigma2) < p] = 20.0
    return model
