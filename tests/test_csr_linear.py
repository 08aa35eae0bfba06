"""The op family csr_linear (sparsevd/ops/csr_linear/): y = x Wᵀ + b with W in CSR form.

First every implementation on every device from tests/sample_inputs.py (``backend``: ``native``, the
compiled kernels of sparsevd._C, CPU and CUDA, through the checked entry point
sparsevd.ops.csr_linear; ``reference``, the torch.sparse math naive_csr_linear, the fallback; the
CUDA cases skip only where there is no GPU or no CUDA build), against the dense product with the
zero-filled W; then what is particular to the CPU kernels (every ISA path: the ``isa`` fixture; bounds checks
that raise), to the CUDA kernels (bad indices give NaN rows, no host sync) and to the checked entry
point (errors naming the argument, the fallback, the library's coexistence with the Python ops).
scripts/gpu_check.sh runs this module on a GPU, also under compute-sanitizer.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparsevd
from sparsevd.ops import csr_linear, library
from sparsevd.ops.csr_linear import format as csr_format
from sparsevd.ops.csr_linear import naive_csr_linear
from sparsevd.ops.csr_linear import op as csr_op
from sparsevd.ops.csr_linear.format import to_csr

from conftest import assert_close, assert_ieee_close
from sample_inputs import (CSR_BATCHES, CSR_CASE_IDS, CSR_CASES, CSR_TOL, csr_dtypes, csr_of,
                           csr_weight, dense_product, inject_nonfinite, structured_weight)

pytestmark = pytest.mark.skipif(
    not library.available(),
    reason=f"sparsevd._C not built ({library.unavailable_reason()})",
)
#: The CUDA kernels' tests: skipped only where there is no GPU or sparsevd._C has no CUDA kernels.
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and library.has_cuda()),
                                reason="needs a GPU and sparsevd._C built with CUDA")
#: Every device the compiled kernels run on (the tests of the kernels' own checks and opcheck).
KERNEL_DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

OP = "csr_linear"
#: The implementations of csr_linear (conftest.py's ``backend``): the compiled kernels and the
#: torch.sparse math; csr_linear has no Triton kernel and ignores SPARSEVD_BACKEND.
OP_BACKENDS = ("native", "reference")

TOL = CSR_TOL


def backend_runs(backend, device):
    """Why ``backend`` cannot run csr_linear on ``device`` here (conftest.py skips with it), or None."""
    if backend == "native" and not library.kernel_available(device):
        return f"sparsevd._C has no csr_linear kernels for {device.type} tensors"
    return None


def run(backend, x, crow, col, val, bias=None):
    """csr_linear on ``backend``: the checked entry point (the compiled kernels where they run) or
    the torch.sparse math."""
    return (csr_linear if backend == "native" else naive_csr_linear)(x, crow, col, val, bias)


# ------------------------------------------------------------- every implementation and device
@pytest.mark.parametrize("n,k,density,empty_rows", CSR_CASES, ids=CSR_CASE_IDS)
def test_matches_dense(isa, backend, device, n, k, density, empty_rows):
    for dtype in csr_dtypes(backend, device):
        for batch in CSR_BATCHES[device]:
            w = csr_weight(n, k, density, dtype, empty_rows, device)
            b = torch.randn(n, device=device).to(dtype)
            x = torch.randn(batch, k, device=device).to(dtype)
            crow, col, val = csr_of(w)
            rtol, atol = TOL[dtype]
            name = f"{dtype} batch {batch}"
            y = run(backend, x, crow, col, val, b)
            assert y.dtype == dtype and y.device.type == device
            expected = dense_product(x, w, b)
            assert_close(y.to(expected.dtype), expected, rtol, atol, name=name)
            assert_close(run(backend, x, crow, col, val).to(expected.dtype), dense_product(x, w), rtol, atol,
                         name=name + " no bias")


@pytest.mark.parametrize("col_dtype", [torch.uint16, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("crow_dtype", [torch.int32, torch.int64])
def test_index_dtypes_and_layouts(isa, backend, device, col_dtype, crow_dtype):
    w = csr_weight(50, 90, 0.2, device=device)
    crow, col, val = csr_of(w, col_dtype, crow_dtype)
    for x in (torch.randn(1, 90), torch.randn(12, 90), torch.randn(3, 4, 90), torch.randn(90, 7).t(),
              torch.randn(90), torch.randn(5, 180)[:, ::2]):
        x = x.to(device)
        assert_close(run(backend, x, crow, col, val), F.linear(x, w), *TOL[torch.float32],
                     name=f"x {tuple(x.shape)} strides {x.stride()}")
    assert run(backend, torch.randn(0, 90, device=device), crow, col, val).shape == (0, 50)


@pytest.mark.parametrize("where", ["unused", "partial", "full", "mixed"])
def test_nonfinite_inputs_match_dense(isa, backend, device, where):
    """y is F.linear with the zero-filled W in IEEE arithmetic: a NaN or ±inf input that meets a
    zero weight makes the output NaN (0·inf = NaN), at every batch size; every element checked."""
    for dtype in csr_dtypes(backend, device):
        for n, k in ((37, 90), (70, 300)):
            w, cols = structured_weight(n, k, device=device)
            w = w.to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            crow, col, val = csr_of(w)
            for batch in (1, 3, 16, 33, 64):
                x = inject_nonfinite(torch.randn(batch, k), cols, where).to(device).to(dtype)
                name = f"{dtype} {n}x{k} batch {batch}"
                for bias in (b, None):
                    y = run(backend, x, crow, col, val, bias)
                    ref = dense_product(x, w, bias)
                    assert_ieee_close(y.to(ref.dtype), ref.to(dtype).to(ref.dtype), *TOL[dtype],
                                      name=name + ("" if bias is not None else " no bias"))


@pytest.mark.parametrize("kernel_device", KERNEL_DEVICES)
def test_opcheck(kernel_device):
    w = csr_weight(20, 30, 0.3).to(kernel_device)
    crow, col, val = csr_of(w)
    for x, b in [(torch.randn(4, 5, 30), torch.randn(20)), (torch.randn(1, 30), None),
                 (torch.randn(30, 8).t(), torch.randn(20))]:
        torch.library.opcheck(torch.ops.sparsevd.csr_linear.default,
                              (x.to(kernel_device), crow, col, val, None if b is None else b.to(kernel_device)))
    crow64, col64, val64 = csr_of(w.double(), torch.int64, torch.int64)
    torch.library.opcheck(torch.ops.sparsevd.csr_linear.default,
                          (torch.randn(3, 30, dtype=torch.float64, device=kernel_device), crow64, col64, val64,
                           None))


@pytest.mark.parametrize("kernel_device", KERNEL_DEVICES)
def test_checked_entry_point_compiles_in_one_graph(kernel_device):
    """torch.compile(fullgraph=True) traces sparsevd.ops.csr_linear (its checks of metadata, the
    op through its fake implementation): the eager result, no graph break."""
    w = csr_weight(30, 50, 0.2, device=kernel_device)
    crow, col, val = csr_of(w)
    b = torch.randn(30, device=kernel_device)
    fn = torch.compile(lambda x: csr_linear(x, crow, col, val, b, check_indices=False), fullgraph=True)
    for batch in (1, 6):
        x = torch.randn(batch, 50, device=kernel_device)
        assert_close(fn(x), F.linear(x, w, b), *TOL[torch.float32], name=f"batch {batch}")


# ------------------------------------------------------------------------------ the CPU kernels
@pytest.mark.parametrize("batch", [2, 9, 16, 17, 33, 100, 256])
def test_batch_tiles(isa, batch):
    """Batch sizes around the 8/16/32 tile widths (padding of the last tile)."""
    w = csr_weight(96, 200, 0.1)
    b = torch.randn(96)
    x = torch.randn(batch, 200)
    assert_close(csr_linear(x, *csr_of(w), b), F.linear(x, w, b), *TOL[torch.float32])


def test_shapes_and_strides(isa):
    w = csr_weight(40, 64, 0.2)
    b = torch.randn(40)
    crow, col, val = csr_of(w)
    x3 = torch.randn(3, 5, 64)
    assert_close(csr_linear(x3, crow, col, val, b), F.linear(x3, w, b), *TOL[torch.float32], name="3-D")
    x1 = torch.randn(64)
    assert csr_linear(x1, crow, col, val, b).shape == (40,)
    assert_close(csr_linear(x1, crow, col, val, b), F.linear(x1, w, b), *TOL[torch.float32], name="1-D")
    xt = torch.randn(64, 20).t()  # (20, 64), column-major
    assert_close(csr_linear(xt, crow, col, val, b), F.linear(xt, w, b), *TOL[torch.float32], name="transposed")
    xs = torch.randn(30, 128)[::3, ::2]  # strided rows and columns
    assert_close(csr_linear(xs, crow, col, val, b), F.linear(xs, w, b), *TOL[torch.float32], name="strided")
    xv = torch.randn(1, 128)[:, ::2]  # batch 1, non-unit column stride
    assert_close(csr_linear(xv, crow, col, val, b), F.linear(xv, w, b), *TOL[torch.float32], name="strided 1")
    x0 = torch.randn(0, 64)
    assert csr_linear(x0, crow, col, val, b).shape == (0, 40)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """fp16/bf16 accumulate in fp32: error at most ~2x that of torch's own fp32→dtype rounding."""
    w = csr_weight(64, 128, 0.2).to(dtype)
    b = torch.randn(64).to(dtype)
    x = torch.randn(9, 128).to(dtype)
    y = csr_linear(x, *csr_of(w), b)
    assert y.dtype == dtype
    exact = F.linear(x.double(), w.double(), b.double())
    ref_err = (F.linear(x.float(), w.float(), b.float()).to(dtype).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() <= 2 * ref_err + 1e-6


def test_fallback_matches(monkeypatch):
    """Without the extension the wrapper computes the same with torch.sparse and warns."""
    w = csr_weight(30, 50, 0.2)
    b = torch.randn(30)
    x = torch.randn(6, 50)
    crow, col, val = csr_of(w)
    expected = csr_linear(x, crow, col, val, b)
    monkeypatch.setattr(library, "_MODULE", None)
    monkeypatch.setattr(csr_op, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pip install"):
        y = csr_linear(x, crow, col, val, b)
    assert_close(y, expected, *TOL[torch.float32])


# ------------------------------------------------------------------------ non-finite inputs
@pytest.mark.parametrize("batch", [1, 12])
def test_nonfinite_strided_and_explicit_zeros(isa, batch):
    """Strided x (the portable pack and the SpMV copy) and stored zero weights (0·inf counted as
    read: the CSR sum itself gives NaN)."""
    w, cols = structured_weight(20, 64)
    crow, col, val = csr_of(w)
    val = val.clone()
    val[::5] = 0.0
    w = csr_format.csr_to_dense(crow, col, val, 20, 64)
    base = inject_nonfinite(torch.randn(batch, 64), cols, "mixed")
    for x in (base.t().contiguous().t(), torch.stack([base, base], -1)[..., 0]):  # column-major, stride 2
        assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])


def test_nonfinite_many_rows(isa):
    """More than 64 batch rows with non-finite values (the fix-up takes 64 per pass over W)."""
    w, cols = structured_weight(40, 80)
    crow, col, val = csr_of(w)
    x = torch.randn(150, 80)
    x[torch.arange(150), torch.randint(0, 80, (150,))] = float("inf")
    x[::3, 5] = float("nan")
    assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])


def test_issue_reproducer_kernel(isa):
    crow, col, val = csr_of(torch.eye(2))
    x = torch.tensor([[float("nan"), 1.0]])
    for xb in (x, x.repeat(2, 1), x.repeat(20, 1)):
        assert_ieee_close(csr_linear(xb, crow, col, val), F.linear(xb, torch.eye(2)), 0, 0)


def test_nonfinite_without_nonzeros():
    """nnz = 0: y = bias, NaN in the rows with a non-finite input (every weight is a zero)."""
    crow = torch.zeros(5, dtype=torch.int32)
    col = torch.zeros(0, dtype=torch.int16)
    val = torch.zeros(0)
    b = torch.randn(4)
    x = torch.randn(3, 6)
    x[1, 2] = float("inf")
    expected = F.linear(x, torch.zeros(4, 6), b)
    assert_ieee_close(torch.ops.sparsevd.csr_linear(x, crow, col, val, b), expected, 0, 0)
    assert_ieee_close(torch.ops.sparsevd.csr_linear(x[1], crow, col, val, b), expected[1], 0, 0)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_parallel_paths_bounds_and_nonfinite(isa, nthreads):
    """The OpenMP regions of the SpMV and of the SpMM, with every column index checked before any
    tile runs. Batches of 1 to 5 tiles of 32: on one thread the tiles reuse one buffer; on two,
    batch 40 is one own tile per thread, 80 two own tiles then one shared; on three, 160 is three
    own tiles then two shared, packed into two alternating buffers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        w, cols = structured_weight(512, 700)
        crow, col, val = csr_of(w)
        for batch in (1, 40, 80, 160):
            x = inject_nonfinite(torch.randn(batch, 700), cols, "mixed")
            assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])
            for j in (0, col.numel() // 2, col.numel() - 1):
                bad = col.clone()
                bad[j] = 20000
                with pytest.raises(RuntimeError, match=rf"col_indices\[{j}\] = 20000 is outside"):
                    torch.ops.sparsevd.csr_linear(x, crow, bad, val, None)
    finally:
        torch.set_num_threads(threads)


def test_fallback_nonfinite_semantics(monkeypatch):
    w, cols = structured_weight(30, 50)
    crow, col, val = csr_of(w)
    monkeypatch.setattr(library, "_MODULE", None)
    monkeypatch.setattr(csr_op, "_warned", True)
    for batch in (1, 7):
        x = inject_nonfinite(torch.randn(batch, 50), cols, "mixed")
        assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])


# ----------------------------------------------------------------------------- the CUDA kernels
@pytest.mark.parametrize("batch", [1, 40])
@pytest.mark.parametrize("mode", ["csr", "dense", "masked"])
@needs_cuda
def test_layer_nonfinite_every_mode_cuda(batch, mode):
    w, cols = structured_weight(50, 120, device="cuda")
    layer = sparsevd.nn.SparseLinear.from_dense(w, torch.randn(50, device="cuda"), plan=mode)
    x = inject_nonfinite(torch.randn(batch, 120), cols, "mixed").cuda()
    assert_ieee_close(layer(x), F.linear(x, layer.to_dense(), layer.bias), *TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32, torch.int64])
def test_bad_indices_give_nan_rows(batch, col_dtype):
    """No host sync to raise: a bad column or row range is not read, its row's outputs are NaN, the
    other rows are right; int64 values that do not fit int32 do not wrap into range."""
    w = csr_weight(16, 40, 0.5, device="cuda")
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


@needs_cuda
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


# ------------------------------------------------------------------------ bounds of the kernel
def _bad_index_case(col_dtype=None, crow_dtype=torch.int32):
    w = csr_weight(16, 40, 0.5)
    w[:, 7] = 1.0  # nnz >= 16
    return csr_of(w, col_dtype, crow_dtype)


@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("col_dtype", [torch.uint16, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [20000, -1, 40])
@pytest.mark.parametrize("at", ["first", "middle", "last"])
def test_kernel_rejects_bad_columns(isa, batch, col_dtype, bad, at):
    """The op checks every column index itself (no read out of bounds, a RuntimeError naming it);
    uint16 indices are read unsigned (-1 is stored as 65535)."""
    crow, col, val = _bad_index_case(col_dtype)
    j = {"first": 0, "middle": col.numel() // 2, "last": col.numel() - 1}[at]
    col = col.clone()
    if col_dtype == torch.uint16 and bad < 0:
        bad += 65536
        col[j:j + 1] = torch.tensor([bad], dtype=torch.int32).to(torch.uint16)
    else:
        col[j] = bad
    x = torch.randn(batch, 40)
    with pytest.raises(RuntimeError, match=rf"csr_linear: col_indices\[{j}\] = {bad} is outside "
                                           r"\[0, in_features=40\)"):
        torch.ops.sparsevd.csr_linear(x, crow, col, val, None)
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, in_features=40\)"):
        csr_linear(x, crow, col, val)


@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("crow_dtype", [torch.int32, torch.int64])
def test_kernel_rejects_bad_row_pointers(isa, batch, crow_dtype):
    crow, col, val = _bad_index_case(crow_dtype=crow_dtype)
    x = torch.randn(batch, 40)
    nnz = col.numel()
    op = torch.ops.sparsevd.csr_linear
    for value, match in [(10**8, rf"crow_indices\[5\] = 100000000 is outside \[0, nnz={nnz}\]"),
                         (-3, r"crow_indices\[5\] = -3 is outside"),
                         (int(crow[8]), r"crow_indices must be non-decreasing, got crow_indices\[5\]")]:
        bad = crow.clone()
        bad[5] = value
        if value == int(crow[8]) and int(crow[8]) == int(crow[6]):
            bad[6] = value - 1
        with pytest.raises(RuntimeError, match=match):
            op(x, bad, col, val, None)
    with pytest.raises(RuntimeError, match="crow_indices must start at 0 and end at nnz"):
        op(x, torch.cat([crow[:-1], crow[-1:] + 1]), col, val, None)


def test_kernel_rejects_columns_without_features():
    """K = 0 with stored nonzeros: every column index is out of range."""
    crow = torch.tensor([0, 1], dtype=torch.int32)
    col = torch.tensor([0], dtype=torch.int16)
    with pytest.raises(RuntimeError, match=r"col_indices\[0\] = 0 is outside \[0, in_features=0\)"):
        torch.ops.sparsevd.csr_linear(torch.randn(3, 0), crow, col, torch.ones(1), None)
    with pytest.raises(ValueError, match="col_indices: expected values in"):
        csr_linear(torch.randn(3, 0), crow, col, torch.ones(1))


def test_fallback_validates_indices(monkeypatch):
    """Without the compiled library, torch.sparse never sees bad indices (check_invariants=False)."""
    crow, col, val = _bad_index_case()
    monkeypatch.setattr(library, "_MODULE", None)
    monkeypatch.setattr(csr_op, "_warned", True)
    x = torch.randn(3, 40)
    bad_col = col.clone()
    bad_col[3] = 20000
    bad_crow = crow.clone()
    bad_crow[5] = 10**8
    for fn in (csr_linear, naive_csr_linear):
        with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, in_features=40\)"):
            fn(x, crow, bad_col, val)
        with pytest.raises(ValueError, match="crow_indices: expected a non-decreasing"):
            fn(x, bad_crow, col, val)
    with pytest.raises(ValueError, match="col_indices"):
        csr_linear(x, crow, bad_col, val, check_indices=False)  # the fallback checks anyway


def test_meta_input_is_rejected():
    crow, col, val = _bad_index_case()
    with pytest.raises(ValueError, match="x: expected a tensor with data, got a meta tensor"):
        csr_linear(torch.empty(2, 40, device="meta"), crow, col, val)


# ---------------------------------------------------------------------------------- errors
def _args():
    w = csr_weight(8, 10, 0.4)
    w[0, 0] = 1.0
    crow, col, val = csr_of(w)
    return torch.randn(3, 10), crow, col, val, torch.randn(8)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(x=a["x"].double()), TypeError, "values: expected dtype torch.float64"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x: expected a floating-point"),
        (lambda a: a.update(values=a["values"].double()), TypeError, "values: expected dtype"),
        (lambda a: a.update(crow=a["crow"].float()), TypeError, "crow_indices: expected dtype int32 or int64"),
        (lambda a: a.update(col=a["col"].float()), TypeError, "col_indices: expected dtype"),
        (lambda a: a.update(col=a["col"][:-1]), ValueError, "col_indices: expected nnz"),
        (lambda a: a.update(crow=a["crow"][:-1]), ValueError, r"(crow_indices|bias): expected"),
        (lambda a: a.update(crow=a["crow"] + 1), ValueError, r"crow_indices: expected crow\[0\] = 0"),
        (lambda a: a.update(crow=a["crow"].flip(0).contiguous()), ValueError, "crow_indices"),
        (lambda a: a["col"].__setitem__(0, 10), ValueError, r"col_indices: expected values in \[0, in_features=10\)"),
        (lambda a: a["col"].__setitem__(0, -1), ValueError, "col_indices: expected values in"),
        (lambda a: a.update(bias=torch.randn(7)), ValueError, r"bias: expected shape \(8,\)"),
        (lambda a: a.update(bias=torch.randn(8).double()), TypeError, "bias: expected dtype"),
        (lambda a: a.update(values=a["values"].reshape(1, -1)), ValueError, "values: expected a 1-D"),
        (lambda a: a.update(x=torch.tensor(1.0)), ValueError, "x: expected shape"),
    ],
)
def test_errors_name_the_argument(change, exc, match):
    x, crow, col, val, b = _args()
    a = dict(x=x, crow=crow, col=col, values=val, bias=b)
    change(a)
    with pytest.raises(exc, match=match):
        csr_linear(a["x"], a["crow"], a["col"], a["values"], a["bias"])


def test_16_bit_indices_need_small_in_features():
    """int16 indices address 32768 input features, uint16 65536 (the checked op and the raw op)."""
    crow = torch.tensor([0, 1], dtype=torch.int32)
    col = torch.tensor([3], dtype=torch.int16)
    with pytest.raises(TypeError, match="col_indices: int16 indices address at most 32768"):
        csr_linear(torch.randn(1, 40000), crow, col, torch.ones(1))
    with pytest.raises(RuntimeError, match="int16 col_indices address at most 32768 input features"):
        torch.ops.sparsevd.csr_linear(torch.randn(1, 40000), crow, col, torch.ones(1), None)
    col = col.to(torch.uint16)
    with pytest.raises(TypeError, match="col_indices: uint16 indices address at most 65536"):
        csr_linear(torch.randn(1, 65537), crow, col, torch.ones(1))
    with pytest.raises(RuntimeError, match="uint16 col_indices address at most 65536 input features"):
        torch.ops.sparsevd.csr_linear(torch.randn(1, 65537), crow, col, torch.ones(1), None)


@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("k", [32769, 65536])
def test_uint16_indices_above_int16_range(isa, batch, k):
    """to_csr writes uint16 indices up to 65536 input features (2 bytes per stored weight, where
    int16 stopped at 32768); columns ≥ 32768 are read unsigned by every kernel path, and a bad
    one is still named."""
    w = csr_weight(24, k, 0.002)
    w[:, -3:] = torch.randn(24, 3)  # the highest columns, whose int16 view would be negative
    crow, col, val = to_csr(w)
    assert col.dtype == torch.uint16
    x = torch.randn(batch, k)
    b = torch.randn(24)
    assert_close(csr_linear(x, crow, col, val, b), F.linear(x, w, b), *TOL[torch.float32])
    x[0, -1] = float("nan")  # the NaN semantics read the same columns
    assert_ieee_close(csr_linear(x, crow, col, val, b), F.linear(x, w, b), *TOL[torch.float32])
    if k < 65536:
        col = col.clone()
        col[-1:] = torch.tensor([k], dtype=torch.int32).to(torch.uint16)
        with pytest.raises(RuntimeError, match=rf"col_indices\[{col.numel() - 1}\] = {k} is outside"):
            torch.ops.sparsevd.csr_linear(x, crow, col, val, None)


def test_raw_op_checks():
    """The C++ op checks metadata itself (RuntimeError naming the argument)."""
    x, crow, col, val, b = _args()
    with pytest.raises(RuntimeError, match="x has dtype Double but values has dtype Float"):
        torch.ops.sparsevd.csr_linear(x.double(), crow, col, val, b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.sparsevd.csr_linear(x, crow, col, val, b[:3])
    with pytest.raises(RuntimeError, match="crow_indices must start at 0 and end at nnz"):
        torch.ops.sparsevd.csr_linear(x, crow + 1, col, val, b)
    with pytest.raises(RuntimeError, match="col_indices must be uint16, int16, int32 or int64"):
        torch.ops.sparsevd.csr_linear(x, crow, col.to(torch.uint8), val, b)


# ------------------------------------------------------------------------- library coexistence
@pytest.mark.parametrize("order", ["extension_first", "package_first"])
def test_cpp_and_python_ops_coexist(order):
    """TORCH_LIBRARY(sparsevd) in C++ and torch.library.custom_op("sparsevd::...") in Python."""
    so = library.module().__file__
    first = f"torch.ops.load_library({so!r})" if order == "extension_first" else "import sparsevd"
    code = textwrap.dedent(f"""
        import torch
        {first}
        import sparsevd, sparsevd._C
        ops = torch.ops.sparsevd
        assert hasattr(ops, "csr_linear") and hasattr(ops, "lrt_linear") and hasattr(ops, "kl_sparse_vd")
        w = torch.randn(4, 6)
        y = sparsevd.ops.csr_linear(torch.randn(2, 6), *sparsevd.nn.sparse.to_csr(w))
        assert y.shape == (2, 4)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_package_imports_without_extension():
    """With sparsevd._C unimportable the package imports, and deploy() warns how to build it."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["sparsevd._C"] = None  # makes `from .. import _C` raise ImportError
        import torch, sparsevd
        from sparsevd.ops import library
        assert not library.available() and "sparsevd._C" in library.unavailable_reason()
        layer = sparsevd.nn.LinearSVDO(6, 4).eval()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            dep = sparsevd.deploy(layer, cost_model="csr")
        assert any("pip install --no-build-isolation -e ." in str(r.message) for r in rec), rec
        x = torch.randn(3, 6)
        torch.testing.assert_close(dep(x), layer(x), rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_large_layer_parallel_paths(isa):
    """A layer big enough for the OpenMP paths (nnz·M above the serial threshold)."""
    w = csr_weight(1024, 1024, 0.05)
    b = torch.randn(1024)
    for batch in (1, 40):
        x = torch.randn(batch, 1024)
        assert_close(csr_linear(x, *csr_of(w), b), F.linear(x, w, b), *TOL[torch.float32])


def test_package_exports():
    assert sparsevd.ops.csr_linear is csr_linear
    assert sparsevd.nn.SparseLinear is sparsevd.nn.sparse.SparseLinear
