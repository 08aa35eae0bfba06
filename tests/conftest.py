"""Test configuration and the fixtures and helpers every test file shares.

Triton's interpreter must be on before any @triton.jit runs (docs/design.md, "Backends").

An op family's test module (tests/test_<family>.py) names its op in ``OP``: every test there that
takes ``device`` (or ``backend``) runs once per backend (``backend``: reference, native, triton,
each set as SPARSEVD_BACKEND) and per device (``device``: cpu, cuda), skipped where that backend
cannot run the op on that device here (native on CUDA, triton on CPU without the interpreter,
CUDA without a GPU, a backend not built), with the reason; its tests of the naive math by hand
take neither and run once. A module may name its own implementations in ``OP_BACKENDS`` and say
which run where in ``backend_runs(backend, device)`` (csr_linear, which is no SPARSEVD_BACKEND
op). Backend-only tests live in tests/test_<family>_<backend>.py.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot runs in numpy: a multi-threaded OpenBLAS spins on tiny tiles.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

#: The backends an op family's tests run on, and the devices.
BACKENDS = ("reference", "native", "triton")
DEVICES = ("cpu", "cuda")


def pytest_generate_tests(metafunc):
    """Parametrize the tests of a module with an ``OP`` that take ``backend`` or ``device``."""
    if not isinstance(getattr(metafunc.module, "OP", None), str):
        return
    backends = getattr(metafunc.module, "OP_BACKENDS", BACKENDS)
    for name, values in (("backend", backends), ("device", DEVICES)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend (SPARSEVD_BACKEND) a test of an op family's module runs on."""
    monkeypatch.setenv("SPARSEVD_BACKEND", request.param)
    return request.param


@pytest.fixture
def device(request, backend):
    """The device of the test's tensors; skips a (backend, device) pair that cannot run the
    module's ``OP`` here, with the reason the backend gives."""
    from sparsevd.ops import backend as B

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    runs = getattr(request.module, "backend_runs", None)
    if runs is not None:  # an op outside the backend registry (csr_linear) says itself
        why = runs(backend, torch.device(request.param))
        if why:
            pytest.skip(why)
        return request.param
    try:
        B.get_impl(request.module.OP, torch.device(request.param))
    except B.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return request.param


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
    """Fresh random inputs in every test, yet reproducible: the seed is printed (pytest shows it
    under "Captured stdout setup" of a failure), and SPARSEVD_TEST_SEED=<seed> reruns a test on it."""
    seed = int(os.environ.get("SPARSEVD_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture
def linear_small_tiles(request, monkeypatch):
    """The Triton lrt_linear kernels with sample_inputs.LINEAR_SMALL_TILES in groups of 2 row
    tiles instead of the interpreter's 32x256x512, so that small shapes span many tiles, K steps
    and tile groups (and clipping cases dead and live weight tiles). Returns the tiles; None, and
    nothing changed, when the test runs another backend."""
    if "backend" in request.fixturenames:
        request.getfixturevalue("backend")
    if os.environ.get("SPARSEVD_BACKEND") != "triton":
        return None
    from sample_inputs import LINEAR_SMALL_TILES

    from sparsevd.ops.lrt_linear import triton as T
    from sparsevd.ops.triton_common import make_config

    cfg = [make_config(LINEAR_SMALL_TILES, group_m=2)]
    monkeypatch.setattr(T, "_fwd_kernel", T._autotuned(T.K.lrt_linear_fwd_kernel, "fwd", cfg))
    monkeypatch.setattr(T, "_bwd_kernel", T._autotuned(T.K.lrt_linear_bwd_kernel, "bwd", cfg))
    return LINEAR_SMALL_TILES


def grads_of(fn, x, w, ls2, b, g):
    """y = fn(x, θ, log σ², b) on fresh leaves and the leaves' gradients of Σ y ⊙ g (b's only when
    it is not None): [∂x, ∂θ, ∂log σ²(, ∂b)]."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, ls2)]
    bl = None if b is None else b.detach().clone().requires_grad_()
    y = fn(*leaves, bl)
    (y * g).sum().backward()
    return y, [t.grad for t in leaves] + ([] if bl is None else [bl.grad])


class PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing: under it the custom ops run (no eager bypass of the
    native backend's C++ autograd ops)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def eager_and_custom_op(fn, leaves):
    """fn(*leaves) and the leaves' gradients of Σ fn·G, once on the eager C++ autograd path and once
    through the custom ops (under PassThrough); G random, the same for both. Returns
    {"eager" | "custom_op": (y, y.grad_fn's name, [gradients])}."""
    out = {}
    g = None
    for path in ("eager", "custom_op"):
        ls = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        if path == "eager":
            y = fn(*ls)
        else:
            with PassThrough():
                y = fn(*ls)
        if g is None:
            g = torch.randn_like(y)
        (y * g).sum().backward()
        out[path] = (y.detach(), y.grad_fn.name(), [t.grad for t in ls])
    return out


def compiled_equals_eager(model, loss_fn, seed=1234):
    """loss_fn(model) -> (output, loss) run eagerly and through torch.compile(fullgraph=True,
    backend="aot_eager": AOTAutograd forward and backward graphs, no Inductor C++ build) under the
    same torch seed (the LRT seeds are drawn inside the graph): the same outputs and gradients."""
    torch._dynamo.reset()

    def step(fn):
        model.zero_grad()
        torch.manual_seed(seed)
        out, loss = fn(model)
        loss.backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_c, grads_c = step(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    out_e, grads_e = step(loss_fn)
    assert_close(out_c, out_e, rtol=1e-5, atol=1e-6, name="compiled output")
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, rtol=1e-5, atol=1e-6, name="compiled grad")


def train_sgvlb(model, xs, ys, steps, batch, noise_seed, every=None):
    """Adam (lr 1e-2) on the SGVLB (β = 1, train_size 10⁴) for ``steps`` batches of ``batch`` rows
    of (xs, ys), the LRT seeds drawn after torch.manual_seed(noise_seed): the loss per step and,
    every ``every`` steps (if given), ``every(model)``."""
    import sparsevd

    loss_fn = sparsevd.SGVLB(model, train_size=10_000, kl_warmup_epochs=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(noise_seed)
    losses, seen = [], []
    for step in range(steps):
        i = (step * batch) % xs.shape[0]
        loss = loss_fn(model(xs[i:i + batch]), ys[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if every is not None and step % every[0] == every[0] - 1:
            seen.append(every[1](model))
    return torch.tensor(losses), seen


class NoLaunch:
    """Stands in for a kernel module or launcher and fails the test if anything is launched."""

    def __getattr__(self, name):
        raise AssertionError(f"a kernel was launched for an empty batch ({name})")

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for an empty batch")


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


def scale_of(t: torch.Tensor) -> float:
    """max |t| (at least 1e-30)."""
    return max(float(t.detach().abs().max()) if t.numel() else 0.0, 1e-30)


def close(actual, expected, rtol, name, atol_rel=None, scale=None):
    """assert_close with an absolute tolerance relative to ``scale`` (default: the largest
    |expected|): ``atol_rel`` (default ``rtol``) times it."""
    scale = scale_of(expected) if scale is None else scale
    atol = (rtol if atol_rel is None else atol_rel) * scale if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=max(atol, 1e-30), name=name)


def grad_scale(name, g, channel_dim):
    """The scale of a gradient's rounding error: for ∂b = Σ g, the largest Σ|g| of a channel (a
    sum of n terms near 0 may cancel to far below them: 16 N(0, 1) values summed to -1.6e-3 once,
    where fp32 sums in another order differ by 2e-7); for the others, the largest |expected|."""
    if name != "grad_bias" or g.numel() == 0:
        return None
    return max(float(g.abs().movedim(channel_dim, 0).reshape(g.shape[channel_dim], -1).sum(1).max()), 1e-30)


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


_SUPPORTED_ISAS = None


def supported_isas():
    """The kernel sets this CPU runs (sparsevd.ops.library.supported_cpu_isas, asked once)."""
    from sparsevd.ops import library

    global _SUPPORTED_ISAS
    if _SUPPORTED_ISAS is None:
        _SUPPORTED_ISAS = library.supported_cpu_isas()
    return _SUPPORTED_ISAS


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request):
    """Run the test with each kernel set of the compiled CPU kernels that this CPU runs."""
    from sparsevd.ops import library

    if request.param not in supported_isas():
        pytest.skip(f"this CPU does not run the {request.param} kernels (or sparsevd._C is not built)")
    old = library.set_cpu_isa(request.param)
    yield request.param
    library.set_cpu_isa(old)


@pytest.fixture(params=["never", "always", "sparse", "auto"])
def compact(request):
    """Each way the native LRT kernels run their clipped products (native_set_compact): never
    compacted, compacted whenever a whole row or column is dead, on the CSR of the kept weights
    (linear; conv2d compacts), or the measured rule."""
    old = torch.ops.sparsevd.native_set_compact(request.param)
    yield request.param
    torch.ops.sparsevd.native_set_compact(old)


@pytest.fixture(params=["serial", "concurrent"])
def two_threads(request):
    """2 intra-op threads and each way the native LRT kernels run their products on them
    (native_set_products): one after the other on all threads, or concurrently, one per thread."""
    threads = torch.get_num_threads()
    old = torch.ops.sparsevd.native_set_products(request.param)
    torch.set_num_threads(2)
    yield request.param
    torch.set_num_threads(threads)
    torch.ops.sparsevd.native_set_products(old)


def with_compact(mode, fn):
    """fn() with the native LRT kernels' clipped products run as ``mode`` (see ``compact``)."""
    old = torch.ops.sparsevd.native_set_compact(mode)
    try:
        return fn()
    finally:
        torch.ops.sparsevd.native_set_compact(old)


def prune(model, p=0.7):
    """Drop a random share ``p`` of every sparse-VD layer's weights (log σ² = 20: log α = 10)
    under no_grad; returns ``model``."""
    import sparsevd

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.nn.SVDO_LAYERS):
                m.log_sigma2[torch.rand_like(m.log_sigma2) < p] = 20.0
    return model


def same_state(a, b, ordered=False):
    """The state_dicts of modules ``a`` and ``b`` hold the same names (in the same order when
    ``ordered``), dtypes and values, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert (list(sa) == list(sb)) if ordered else (sorted(sa) == sorted(sb))
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
