"""sparsevd::csr_linear's CUDA kernels (csrc/cuda/) and deployed layers on a GPU, against the dense
product. Skipped without CUDA or without a CUDA build of sparsevd._C (scripts/gpu_check.sh runs
them, also under compute-sanitizer)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_ieee_close

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


@pytest.mark.parametrize("col_dtype", [torch.uint16, torch.int16, torch.int32, torch.int64])
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


NONFINITE = (float("nan"), float("inf"), float("-inf"))


def structured_weight(n, k):
    """W (n, k) on the GPU with unused columns, columns zero in about half the rows, full columns."""
    w = torch.randn(n, k)
    perm = torch.randperm(k)
    unused, partial, full = perm[: k // 4], perm[k // 4: k // 2], perm[k // 2:]
    w[:, unused] = 0
    drop = torch.zeros(n, k, dtype=torch.bool)
    drop[:, partial] = torch.rand(n, partial.numel()) < 0.5
    w[drop] = 0
    return w.cuda(), {"unused": unused, "partial": partial, "full": full}


def inject_nonfinite(x, cols):
    """Rows 0, 2, ... get 1-3 values from NaN, ±inf at columns of any kind."""
    x = x.clone()
    kinds = list(cols)
    for b in range(0, x.shape[0], 2):
        for _ in range(int(torch.randint(1, 4, ()))):
            c = cols[kinds[int(torch.randint(len(kinds), ()))]]
            x[b, c[int(torch.randint(c.numel(), ()))]] = NONFINITE[int(torch.randint(3, ()))]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16, 33, 64])
def test_nonfinite_inputs_match_dense(batch, dtype):
    """The CPU kernel's semantics: the zero-filled dense product in IEEE arithmetic (0·inf = NaN)."""
    w, cols = structured_weight(70, 300)
    w = w.to(dtype)
    b = torch.randn(70, device="cuda").to(dtype)
    x = inject_nonfinite(torch.randn(batch, 300), cols).cuda().to(dtype)
    y = csr_linear(x, *to_csr(w), b)
    expected = F.linear(x.float(), w.float(), b.float()).to(dtype)
    assert_ieee_close(y.float(), expected.float(), *TOL[dtype])


@pytest.mark.parametrize("batch", [1, 40])
@pytest.mark.parametrize("mode", ["csr", "dense", "masked"])
def test_layer_nonfinite_every_mode_cuda(batch, mode):
    w, cols = structured_weight(50, 120)
    layer = sparsevd.nn.SparseLinear.from_dense(w, torch.randn(50, device="cuda"), plan=mode)
    x = inject_nonfinite(torch.randn(batch, 120), cols).cuda()
    assert_ieee_close(layer(x), F.linear(x, layer.to_dense(), layer.bias), *TOL[torch.float32])


@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32, torch.int64])
def test_bad_indices_give_nan_rows(batch, col_dtype):
    """No host sync to raise: a bad column or row range is not read, its row's outputs are NaN, the
    other rows are right; int64 values that do not fit int32 do not wrap into range."""
    w = random_weight(16, 40, 0.5)
    w[:, 7] = 1.0
    crow, col, val = to_csr(w, col_dtype)
    x = torch.randn(batch, 40, device="cuda")
    expected = F.linear(x, w)
    op = torch.ops.sparsevd.csr_linear
    rows = torch.repeat_interleave(torch.arange(16, device="cuda"), (crow[1:] - crow[:-1]).long())
    for bad in ([20000, -1] + ([2**32 + 5] if col_dtype == torch.int64 else [])):
        for j in (0, col.numel() // 2, col.numel() - 1):
            c = col.clone()
            c[j] = bad
            y = op(x, crow, c, val, None)
            r = int(rows[j])
            assert torch.isnan(y[:, r]).all(), (bad, j)
            keep = torch.arange(16, device="cuda") != r
            assert_close(y[:, keep], expected[:, keep], *TOL[torch.float32])
    for crow_dtype in (torch.int32, torch.int64):
        c = crow.to(crow_dtype).clone()
        c[5] = 10**8 if crow_dtype == torch.int32 else 2**32 + 3
        y = op(x, c, col, val, None)
        assert torch.isnan(y[:, 4]).all() and torch.isnan(y[:, 5]).all()
        shifted = crow.clone()
        shifted[0] = 1  # crow[0] != 0: no row can be trusted
        assert torch.isnan(op(x, shifted, col, val, None)).all()
    # K = 0 with stored nonzeros: the rows that claim them are NaN
    y = op(torch.randn(batch, 0, device="cuda"), torch.tensor([0, 0, 1], dtype=torch.int32, device="cuda"),
           torch.zeros(1, dtype=torch.int16, device="cuda"), torch.ones(1, device="cuda"), None)
    assert (y[:, 0] == 0).all() and torch.isnan(y[:, 1]).all()


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
