"""Subnormal floats (issue 23, item 8): the library's CPU kernels and the training loop's Adam run
with subnormals flushed to zero, and leave the caller's floating-point mode as they found it.

Under train-time clipping the clipped weights' zero gradients let Adam's moments decay into the
subnormal range, where x86 arithmetic takes ~100x longer. The cost is measured here by counting
rather than timing: after steps that would leave subnormal moments with torch's Adam, sparsevd's
Adam leaves none (exact zeros), so a step with many clipped weights does the same work as one
without (benchmarks/bench_masked.py times it: benchmarks/NOTES.md, "Subnormal floats")."""
import pytest
import torch

import sparsevd
from sparsevd import optim
from sparsevd.ops import library
from sparsevd.train import adam

KEEP_THREADS = True  # the worker threads' mode is under test: 2 threads, set per test
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32, 1.18e-38


def subnormals(t: torch.Tensor) -> int:
    """How many entries of t are subnormal (0 < |x| < tiny)."""
    a = t.abs()
    return int(((a > 0) & (a < TINY)).sum())


@pytest.fixture
def threads2():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    assert library.set_flush_denormal(False) in (False, True)
    yield
    library.set_flush_denormal(False)
    torch.set_num_threads(n)


def clipped_adam(opt_cls, n=1 << 20, steps=20, **kw):
    """A parameter of n weights, half of them "clipped": one step with gradients everywhere, then the
    moments of the clipped half set just above the subnormal range and `steps` steps with zero
    gradient there (what train-time clipping does to them), the other half trained on. Returns
    (param, optimizer)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    opt = opt_cls([p], lr=1e-3, **kw)
    p.grad = torch.randn(n)
    opt.step()
    st = opt.state[p]
    half = n // 2
    # decays of 0.9 (m) and 0.999 (v) per step: m goes subnormal after 1 step, v after ~1200
    st["exp_avg"][half:] = 2 * TINY
    st["exp_avg_sq"][half:] = 1.0001 * TINY
    for _ in range(steps):
        g = torch.randn(n)
        g[half:] = 0.0
        p.grad = g
        opt.step()
    return p, opt


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_adam_leaves_no_subnormal_moments_on_any_thread(threads2, fused):
    # Control: torch's Adam leaves the clipped half's moments subnormal (on both threads' chunks).
    _, ref = clipped_adam(torch.optim.Adam, fused=fused)
    st = next(iter(ref.state.values()))
    n = st["exp_avg"].numel()
    assert subnormals(st["exp_avg"][n // 2:3 * n // 4]) > 0 and subnormals(st["exp_avg"][3 * n // 4:]) > 0
    p, opt = clipped_adam(optim.Adam, fused=fused)
    st = opt.state[p]
    for name in ("exp_avg", "exp_avg_sq"):
        assert subnormals(st[name]) == 0, name
    assert int((st["exp_avg"][n // 2:] == 0).sum()) == n - n // 2  # flushed to exact zeros
    assert library.denormals_flushed() == (False, False)  # every thread's mode restored


def test_adam_is_torchs_adam_on_normal_numbers(threads2):
    """Same update rule: on moments that stay normal the two agree to rounding (the flush changes
    only results below 1.2e-38)."""
    p_ref, _ = clipped_adam(torch.optim.Adam, n=4096, steps=5, fused=True)
    p, _ = clipped_adam(optim.Adam, n=4096, steps=5, fused=True)
    torch.testing.assert_close(p[:2048], p_ref[:2048], rtol=0, atol=0)
    # the clipped half moved by ~lr·m/(√v+eps) with m ≤ 2e-38: below fp32 resolution of p either way
    torch.testing.assert_close(p[2048:], p_ref[2048:], rtol=1e-6, atol=1e-12)


def test_adam_keeps_a_caller_that_flushes_flushing(threads2):
    library.set_flush_denormal(True)
    clipped_adam(optim.Adam, n=256, steps=1, fused=True)
    assert library.denormals_flushed() == (True, True)


def test_flush_without_the_compiled_switch_covers_the_calling_thread(monkeypatch):
    """Without sparsevd._C the context falls back to torch.set_flush_denormal (calling thread) and
    restores the state it probed."""
    monkeypatch.setattr(library, "has_op", lambda name: False)
    tiny = torch.tensor([1e-40])
    with optim.flush_denormals():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
    with optim.flush_denormals(enabled=False):
        assert (tiny * 1.0).item() != 0.0


def test_train_adam_is_the_flushing_adam():
    opt = adam(torch.nn.Linear(3, 2).parameters(), 1e-3)
    assert isinstance(opt, optim.Adam) and isinstance(opt, torch.optim.Adam)
    assert opt.defaults["fused"] is True


def _kernel_calls():
    """One call of every native CPU kernel entry point (forward and backward of both LRT layers
    with and without clipping, the KL, the noise generator, the CSR product)."""
    torch.manual_seed(1)
    lin = sparsevd.nn.LinearSVDO(64, 48)
    conv = sparsevd.nn.Conv2dSVDO(3, 8, 3)
    with torch.no_grad():
        lin.log_sigma2.uniform_(-12, 2)
        conv.log_sigma2.uniform_(-12, 2)
    x, xc = torch.randn(128, 64), torch.randn(4, 3, 12, 12)
    for clip in (False, True):
        lin.train_clip = conv.train_clip = clip
        (lin(x).square().sum() + conv(xc).square().sum()).backward()
    sparsevd.kl_divergence(torch.nn.Sequential(lin, conv)).backward()
    torch.ops.sparsevd.philox_randn_(torch.empty(1 << 16), 3, 0)
    w = torch.randn(48, 64) * (torch.rand(48, 64) < 0.2)
    s = w.to_sparse_csr()
    torch.ops.sparsevd.csr_linear(x, s.crow_indices(), s.col_indices(), s.values(), None)


@pytest.mark.parametrize("flushing", [False, True])
def test_kernels_restore_the_callers_mode_on_every_thread(threads2, flushing):
    library.set_flush_denormal(flushing)
    _kernel_calls()
    assert library.denormals_flushed() == (flushing, flushing)


@pytest.mark.parametrize("M", [1, 512])
def test_csr_kernel_reads_subnormals_as_zero_on_every_thread(threads2, M):
    """DAZ inside the kernel: a product of subnormal inputs is exactly 0 on every row (M = 512 runs
    on both threads; without the flush each row would be K·1e-40, itself subnormal), while the caller
    still sees subnormals."""
    K, N = 96, 300
    w = torch.ones(N, K).to_sparse_csr()
    x = torch.full((M, K), 1e-40)
    y = torch.ops.sparsevd.csr_linear(x, w.crow_indices(), w.col_indices(), w.values(), None)
    assert int((y != 0).sum()) == 0
    assert subnormals(x * 1.0) == x.numel()
