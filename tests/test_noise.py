"""The LRT noise ξ (sparsevd.ops.noise): the torch specification of Philox against Triton's
tl.randn, the compiled CPU generator (csrc/cpu/noise_cpu.cpp) against the specification with every
kernel set this CPU runs (``isa``) and on 2 threads, and the statistics of the stream."""
import math

import pytest
import torch
from conftest import assert_close
from sample_inputs import NOISE_RANGES

from sparsevd.ops import library
from sparsevd.ops.noise import draw_seed, lrt_noise, randn_torch

N_SE = 5.0  # statistical bound, in standard errors (see test_weights.py)


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _randn_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    """out[i] = tl.randn(seed, offset + i) for i < n (int32 offsets, as in the LRT kernels)."""
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    tl.store(out_ptr + o_i, tl.randn(seed, offset + o_i), mask=m_i)


def triton_randn(seed: int, n: int, offset: int = 0) -> torch.Tensor:
    out = torch.full((n,), float("nan"))
    block = 1024
    _randn_kernel[(triton.cdiv(n, block),)](out, seed, offset, n, BLOCK=block)
    return out


@pytest.mark.parametrize("seed_kind", ["fresh", "small", "high_word_only", "max"])
def test_noise_equals_triton_randn(seed_kind):
    seed = {
        "fresh": int(draw_seed()),
        "small": int(torch.randint(0, 1000, ())),
        "high_word_only": int(torch.randint(1, 2**30, ())) << 32,
        "max": 2**63 - 1,
    }[seed_kind]
    n = 3001
    expected = triton_randn(seed, n)
    assert_close(lrt_noise(seed, (n,)), expected, rtol=1e-5, atol=1e-5, name="noise")
    got = lrt_noise(torch.tensor([seed]), (3, 1000, 1))
    assert got.shape == (3, 1000, 1) and got.dtype == torch.float32
    assert_close(got.reshape(-1), expected[:3000], rtol=1e-5, atol=1e-5, name="lrt_noise")


def test_noise_equals_triton_randn_at_an_offset():
    seed, offset = int(draw_seed()), int(torch.randint(1, 2**30, ()))
    expected = triton_randn(seed, 777, offset)
    assert_close(lrt_noise(seed, (777,), offset=offset), expected, rtol=1e-5, atol=1e-5,
                 name="noise at offset")
    # The offset form is a slice of the long sequence.
    assert torch.equal(lrt_noise(seed, (50,), offset=offset + 10),
                       lrt_noise(seed, (777,), offset=offset)[10:60])


def test_noise_moments():
    n = 1 << 20
    xi = lrt_noise(int(draw_seed()), (n,)).double()
    assert torch.isfinite(xi).all()
    se = 1.0 / math.sqrt(n)
    assert abs(xi.mean().item()) < N_SE * se
    assert abs(xi.var().item() - 1.0) < N_SE * math.sqrt(2.0) * se
    c = xi - xi.mean()
    kurt = (c ** 4).mean().item() / xi.var().item() ** 2
    assert abs(kurt - 3.0) < N_SE * math.sqrt(24.0) * se
    assert abs((c ** 3).mean().item()) < N_SE * math.sqrt(15.0) * se  # E[ξ⁶] = 15
    # Normal CDF at a few points: each fraction is a binomial proportion.
    for t in (-2.0, -1.0, 0.0, 0.5, 1.5):
        p = 0.5 * math.erfc(-t / math.sqrt(2.0))
        frac = (xi < t).double().mean().item()
        assert abs(frac - p) < N_SE * math.sqrt(p * (1 - p) / n), f"P(ξ < {t})"
    # Neighbours (and elements one "row" apart) are uncorrelated.
    for lag in (1, 2, 7, 1024):
        r = (c[lag:] * c[:-lag]).mean().item() / xi.var().item()
        assert abs(r) < N_SE * se, f"lag-{lag} correlation {r}"


def test_noise_streams_of_two_seeds_are_uncorrelated():
    n = 1 << 18
    s = int(draw_seed())
    a = lrt_noise(s, (n,)).double()
    b = lrt_noise(s ^ 1, (n,)).double()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) < N_SE / math.sqrt(n)


def test_noise_same_seed_same_output_different_seed_different():
    s = draw_seed()
    a = lrt_noise(s, (64, 33))
    assert torch.equal(a, lrt_noise(s.clone(), (64, 33)))
    for other in (s + 1, s ^ (1 << 40)):  # low word and high word of the 64-bit key
        b = lrt_noise(other, (64, 33))
        assert (a != b).float().mean() > 0.999


# ------------------------------------------------------------------- compiled CPU generator
@pytest.mark.skipif(not library.has_op("philox_randn_"), reason="sparsevd._C not built")
@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, 2**62 - 1, -3])
@pytest.mark.parametrize("numel,offset", NOISE_RANGES)
def test_native_matches_torch_spec(isa, seed, numel, offset):
    """philox_randn_ (the vectorized generator of each kernel set) against randn_torch, across
    the 2^32 wrap of the counter and for every tail length of the 16/48-element blocks; every
    element written (the output starts as NaN)."""
    out = torch.full((numel,), float("nan"))
    torch.ops.sparsevd.philox_randn_(out, seed, offset)
    spec = randn_torch(seed, numel, offset=offset)
    assert torch.isfinite(out).all(), "unwritten elements"
    assert_close(out, spec, rtol=1e-5, atol=2e-6, name=f"noise {isa}")
    fast = lrt_noise(seed, (numel,), offset=offset)  # what the library calls
    assert fast.shape == (numel,) and fast.dtype == torch.float32 and torch.equal(fast, out)


@pytest.mark.skipif(not library.has_op("philox_randn_"), reason="sparsevd._C not built")
def test_native_kernel_sets_agree_with_each_other():
    """All kernel sets give the same numbers to an ulp or two of log/cos, at every offset of a
    block (the Philox integer part is exact: any difference there would be O(1))."""
    seed, n = int(draw_seed()), 3001
    isas = library.supported_cpu_isas()
    outs = {}
    old = library.cpu_isa()
    try:
        for isa in isas:
            library.set_cpu_isa(isa)
            outs[isa] = lrt_noise(seed, (n,), offset=2**32 - 1500)
    finally:
        library.set_cpu_isa(old)
    for isa, o in outs.items():
        assert_close(o, outs[isas[-1]], rtol=2e-6, atol=1e-6, name=f"{isa} vs {isas[-1]}")


@pytest.mark.skipif(not library.has_op("philox_randn_"), reason="sparsevd._C not built")
def test_native_threads_same_numbers():
    seed, n = int(draw_seed()), 200_001
    one = lrt_noise(seed, (n,))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = lrt_noise(seed, (n,))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.skipif(not library.has_op("philox_randn_"), reason="sparsevd._C not built")
def test_native_rejects_bad_output():
    with pytest.raises(RuntimeError, match="out"):
        torch.ops.sparsevd.philox_randn_(torch.empty(4, dtype=torch.float64), 1, 0)
    with pytest.raises(RuntimeError, match="out"):
        torch.ops.sparsevd.philox_randn_(torch.empty(4, 2).t(), 1, 0)


@pytest.mark.skipif(not library.has_op("native_set_isa"), reason="sparsevd._C not built")
def test_cpu_isa_switch_names_the_argument():
    with pytest.raises(RuntimeError, match="isa"):
        library.set_cpu_isa("sse9")
    assert library.cpu_isa() in library.CPU_ISAS
