"""sparsevd::csr_linear's CUDA kernels (csrc/cuda/) and deployed layers on a GPU, against the dense
product. Skipped without CUDA or without a CUDA build of sparsevd._C (scripts/gpu_check.sh runs
them, also under compute-sanitizer)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import sparsevd
from sparsevd.nn.sparse import to_csr
from sparsevd.ops import csr_linear, library

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and library.has_cuda()),
    reason="needs a GPU and sparsevd._C built with CUDA",
)

#: (rtol, atol) per dtype; fp16/bf16 accumulate in fp32 and round once.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def random_weight(n, k, density, empty_rows=0):
    w = torch.randn(n, k, device="cuda") * (torch.rand(n, k, device="cuda") < density)
    if empty_rows:
        w[torch.randperm(n)[:empty_rows]] = 0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16, 64, 257])
@pytest.mark.parametrize(
    "n,k,density,empty_rows",
    [(1, 1, 1.0, 0), (37, 123, 0.1, 5), (123, 300, 0.05, 40), (64, 257, 0.0, 0), (33, 70, 1.0, 0),
     (300, 784, 0.3, 3), (1024, 4096, 0.02, 0)],
    ids=["1x1", "sparse", "empty_rows", "all_zero", "fully_dense", "lenet_fc1", "4096_98pct"],
)
def test_matches_dense(n, k, density, empty_rows, batch, dtype):
    w = random_weight(n, k, density, empty_rows)
    b = torch.randn(n, device="cuda")
    x = torch.randn(batch, k, device="cuda")
    crow, col, val = to_csr(w.to(dtype))
    y = csr_linear(x.to(dtype), crow, col, val, b.to(dtype))
    assert y.dtype == dtype and y.device.type == "cuda"
    expected = F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float())
    assert_close(y.float(), expected, *TOL[dtype])


@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("crow_dtype", [torch.int32, torch.int64])
def test_index_dtypes_and_layouts(col_dtype, crow_dtype):
    w = random_weight(50, 90, 0.2)
    crow, col, val = to_csr(w, col_dtype)
    crow = crow.to(crow_dtype)
    for x in (torch.randn(12, 90, device="cuda"), torch.randn(3, 4, 90, device="cuda"),
              torch.randn(90, 7, device="cuda").t(), torch.randn(90, device="cuda"),
              torch.randn(5, 180, device="cuda")[:, ::2]):
        assert_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])
    assert csr_linear(torch.randn(0, 90, device="cuda"), crow, col, val).shape == (0, 50)


def test_opcheck_cuda():
    w = random_weight(20, 30, 0.3)
    crow, col, val = to_csr(w)
    torch.library.opcheck(torch.ops.sparsevd.csr_linear.default,
                          (torch.randn(4, 5, 30, device="cuda"), crow, col, val,
                           torch.randn(20, device="cuda")))


def test_deployed_lenet300_on_cuda():
    """A LeNet-300-100 with sparse-VD layers deployed on the GPU: equal to its eval-mode outputs,
    whatever kernel each layer's measured plan picks."""
    model = sparsevd.models.LeNet300(svd=True).cuda()
    with torch.no_grad():
        for m in model:
            if hasattr(m, "log_sigma2"):
                m.log_sigma2.uniform_(-12.0, 2.0)  # a few percent of the weights kept
    model.eval()
    x = torch.randn(64, 1, 28, 28, device="cuda")
    deployed = sparsevd.deploy(model, x[:1])
    with torch.no_grad():
        for b in (1, 7, 64):
            assert_close(deployed(x[:b]), model(x[:b]), rtol=1e-4, atol=1e-4, name=f"batch {b}")
