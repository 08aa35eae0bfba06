"""sparsevd::csr_linear (csrc/ CPU kernels) and the checked wrapper sparsevd.ops.csr_linear."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparsevd
from sparsevd.nn.sparse import to_csr
from sparsevd.ops import csr as csr_mod
from sparsevd.ops import csr_linear, library

from conftest import assert_close, assert_ieee_close

pytestmark = pytest.mark.skipif(
    not library.available(),
    reason=f"sparsevd._C not built ({library.unavailable_reason()})",
)

TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}  # (rtol, atol)


def random_weight(n, k, density, dtype=torch.float32, empty_rows=0):
    w = torch.randn(n, k, dtype=dtype) * (torch.rand(n, k) < density)
    if empty_rows:
        w[torch.randperm(n)[:empty_rows]] = 0
    return w


def csr_of(w, col_dtype=None, crow_dtype=torch.int32):
    crow, col, val = to_csr(w, col_dtype)
    return crow.to(crow_dtype), col, val


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize(
    "n,k,density,empty_rows",
    [(1, 1, 1.0, 0), (37, 123, 0.1, 5), (123, 300, 0.05, 40), (64, 257, 0.0, 0), (33, 70, 1.0, 0),
     (300, 784, 0.3, 3)],
    ids=["1x1", "sparse", "empty_rows", "all_zero", "fully_dense", "lenet_fc1"],
)
def test_matches_dense(simd, n, k, density, empty_rows, batch, dtype):
    w = random_weight(n, k, density, dtype, empty_rows)
    b = torch.randn(n, dtype=dtype)
    x = torch.randn(batch, k, dtype=dtype)
    crow, col, val = csr_of(w)
    rtol, atol = TOL[dtype]
    assert_close(csr_linear(x, crow, col, val, b), F.linear(x, w, b), rtol, atol)
    assert_close(csr_linear(x, crow, col, val), F.linear(x, w), rtol, atol, name="no bias")


@pytest.mark.parametrize("batch", [2, 9, 16, 17, 33, 100, 256])
def test_batch_tiles(simd, batch):
    """Batch sizes around the 8/16/32 tile widths (padding of the last tile)."""
    w = random_weight(96, 200, 0.1)
    b = torch.randn(96)
    x = torch.randn(batch, 200)
    assert_close(csr_linear(x, *csr_of(w), b), F.linear(x, w, b), *TOL[torch.float32])


@pytest.mark.parametrize("col_dtype", [torch.uint16, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("crow_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch", [1, 12])
def test_index_dtypes(simd, col_dtype, crow_dtype, batch):
    w = random_weight(50, 90, 0.2)
    x = torch.randn(batch, 90)
    y = csr_linear(x, *csr_of(w, col_dtype, crow_dtype))
    assert_close(y, F.linear(x, w), *TOL[torch.float32])


def test_shapes_and_strides(simd):
    w = random_weight(40, 64, 0.2)
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
    w = random_weight(64, 128, 0.2).to(dtype)
    b = torch.randn(64).to(dtype)
    x = torch.randn(9, 128).to(dtype)
    y = csr_linear(x, *csr_of(w), b)
    assert y.dtype == dtype
    exact = F.linear(x.double(), w.double(), b.double())
    ref_err = (F.linear(x.float(), w.float(), b.float()).to(dtype).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() <= 2 * ref_err + 1e-6


def test_opcheck():
    w = random_weight(20, 30, 0.3)
    crow, col, val = csr_of(w)
    for x, b in [(torch.randn(4, 5, 30), torch.randn(20)), (torch.randn(1, 30), None),
                 (torch.randn(30, 8).t(), torch.randn(20))]:
        torch.library.opcheck(torch.ops.sparsevd.csr_linear.default, (x, crow, col, val, b))
    crow64, col64, val64 = csr_of(w.double(), torch.int64, torch.int64)
    torch.library.opcheck(torch.ops.sparsevd.csr_linear.default,
                          (torch.randn(3, 30, dtype=torch.float64), crow64, col64, val64, None))


def test_fallback_matches(monkeypatch):
    """Without the extension the wrapper computes the same with torch.sparse and warns."""
    w = random_weight(30, 50, 0.2)
    b = torch.randn(30)
    x = torch.randn(6, 50)
    crow, col, val = csr_of(w)
    expected = csr_linear(x, crow, col, val, b)
    monkeypatch.setattr(library, "_MODULE", None)
    monkeypatch.setattr(csr_mod, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pip install"):
        y = csr_linear(x, crow, col, val, b)
    assert_close(y, expected, *TOL[torch.float32])


# ------------------------------------------------------------------------ non-finite inputs
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def structured_weight(n, k, dtype=torch.float32):
    """W (n, k) with three kinds of columns: unused (all zero), partial (zero in about half the
    rows) and full (nonzero in every row); returns W and the three index sets."""
    w = torch.randn(n, k, dtype=dtype)
    perm = torch.randperm(k)
    unused, partial, full = perm[: k // 4], perm[k // 4: k // 2], perm[k // 2:]
    w[:, unused] = 0
    drop = torch.zeros(n, k, dtype=torch.bool)
    drop[:, partial] = torch.rand(n, partial.numel()) < 0.5
    w[drop] = 0
    return w, {"unused": unused, "partial": partial, "full": full}


def inject_nonfinite(x, cols, where):
    """Every other batch row (0, 2, ...) gets 1-3 values from NaN, +inf, -inf at columns of kind
    ``where`` (``"mixed"``: any kind); the other rows stay finite. Returns a new tensor."""
    x = x.clone()
    kinds = list(cols) if where == "mixed" else [where]
    for b in range(0, x.shape[0], 2):
        for _ in range(int(torch.randint(1, 4, ()))):
            c = cols[kinds[int(torch.randint(len(kinds), ()))]]
            x[b, c[int(torch.randint(c.numel(), ()))]] = NONFINITE[int(torch.randint(3, ()))]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("where", ["unused", "partial", "full", "mixed"])
def test_nonfinite_inputs_match_dense(simd, where, batch, dtype):
    """y is F.linear with the zero-filled W in IEEE arithmetic: a NaN or ±inf input that meets a
    zero weight makes the output NaN (0·inf = NaN), at every batch size; every element checked."""
    w, cols = structured_weight(37, 90, dtype)
    b = torch.randn(37, dtype=dtype)
    x = inject_nonfinite(torch.randn(batch, 90, dtype=dtype), cols, where)
    crow, col, val = csr_of(w)
    y = csr_linear(x, crow, col, val, b)
    assert_ieee_close(y, F.linear(x, w, b), *TOL[dtype])
    assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[dtype], name="no bias")


@pytest.mark.parametrize("batch", [1, 12])
def test_nonfinite_strided_and_explicit_zeros(simd, batch):
    """Strided x (the portable pack and the SpMV copy) and stored zero weights (0·inf counted as
    read: the CSR sum itself gives NaN)."""
    w, cols = structured_weight(20, 64)
    crow, col, val = csr_of(w)
    val = val.clone()
    val[::5] = 0.0
    w = csr_mod.csr_to_dense(crow, col, val, 20, 64)
    base = inject_nonfinite(torch.randn(batch, 64), cols, "mixed")
    for x in (base.t().contiguous().t(), torch.stack([base, base], -1)[..., 0]):  # column-major, stride 2
        assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])


def test_nonfinite_many_rows(simd):
    """More than 64 batch rows with non-finite values (the fix-up takes 64 per pass over W)."""
    w, cols = structured_weight(40, 80)
    crow, col, val = csr_of(w)
    x = torch.randn(150, 80)
    x[torch.arange(150), torch.randint(0, 80, (150,))] = float("inf")
    x[::3, 5] = float("nan")
    assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])


def test_issue_reproducer_kernel(simd):
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


def test_parallel_paths_bounds_and_nonfinite(simd):
    """Two threads (the OpenMP regions: tile 0 checked, the other tiles after the barrier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, cols = structured_weight(512, 700)
        crow, col, val = csr_of(w)
        for batch in (1, 40):
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
    monkeypatch.setattr(csr_mod, "_warned", True)
    for batch in (1, 7):
        x = inject_nonfinite(torch.randn(batch, 50), cols, "mixed")
        assert_ieee_close(csr_linear(x, crow, col, val), F.linear(x, w), *TOL[torch.float32])


# ------------------------------------------------------------------------ bounds of the kernel
def _bad_index_case(col_dtype=None, crow_dtype=torch.int32):
    w = random_weight(16, 40, 0.5)
    w[:, 7] = 1.0  # nnz >= 16
    return csr_of(w, col_dtype, crow_dtype)


@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("col_dtype", [torch.uint16, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [20000, -1, 40])
@pytest.mark.parametrize("at", ["first", "middle", "last"])
def test_kernel_rejects_bad_columns(simd, batch, col_dtype, bad, at):
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
def test_kernel_rejects_bad_row_pointers(simd, batch, crow_dtype):
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
    monkeypatch.setattr(csr_mod, "_warned", True)
    x = torch.randn(3, 40)
    bad_col = col.clone()
    bad_col[3] = 20000
    bad_crow = crow.clone()
    bad_crow[5] = 10**8
    for fn in (csr_linear, csr_mod.csr_linear_torch):
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
    w = random_weight(8, 10, 0.4)
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
def test_uint16_indices_above_int16_range(simd, batch, k):
    """to_csr writes uint16 indices up to 65536 input features (2 bytes per stored weight, where
    int16 stopped at 32768); columns ≥ 32768 are read unsigned by every kernel path, and a bad
    one is still named."""
    w = random_weight(24, k, 0.002)
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


def test_large_layer_parallel_paths(simd):
    """A layer big enough for the OpenMP paths (nnz·M above the serial threshold)."""
    w = random_weight(1024, 1024, 0.05)
    b = torch.randn(1024)
    for batch in (1, 40):
        x = torch.randn(batch, 1024)
        assert_close(csr_linear(x, *csr_of(w), b), F.linear(x, w, b), *TOL[torch.float32])


def test_package_exports():
    assert sparsevd.ops.csr_linear is csr_linear
    assert sparsevd.nn.SparseLinear is sparsevd.nn.sparse.SparseLinear
