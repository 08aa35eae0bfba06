"""The compiled CPU generator (csrc/cpu/philox_cpu.cpp) against the torch specification."""
import pytest
import torch

from sparsevd.ops import noise


@pytest.mark.skipif(not noise._NATIVE_CPU, reason="sparsevd._C not built")
@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, 2**62 - 1, -3])
@pytest.mark.parametrize("numel,offset", [(1, 0), (100_003, 0), (4099, 2**32 - 50)])
def test_native_matches_torch_spec(seed, numel, offset):
    native = noise.randn_like_index(seed, numel, offset=offset)
    spec = noise.randn_torch(seed, numel, offset=offset)
    assert native.shape == (numel,) and native.dtype == torch.float32
    assert torch.isfinite(native).all()
    torch.testing.assert_close(native, spec, rtol=1e-5, atol=2e-6)


@pytest.mark.skipif(not noise._NATIVE_CPU, reason="sparsevd._C not built")
def test_native_rejects_bad_output():
    with pytest.raises(RuntimeError, match="out"):
        torch.ops.sparsevd.philox_randn_(torch.empty(4, dtype=torch.float64), 1, 0)
    with pytest.raises(RuntimeError, match="out"):
        torch.ops.sparsevd.philox_randn_(torch.empty(4, 2).t(), 1, 0)
