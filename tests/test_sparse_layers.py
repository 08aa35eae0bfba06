"""SparseLinear / SparseConv2d (sparsevd/nn/sparse.py): one semantics for non-finite inputs in
every mode, and validation of the CSR buffers on every path that can change them."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_ieee_close
from sample_inputs import NONFINITE, inject_nonfinite, structured_weight

from sparsevd.nn import SparseConv1d, SparseConv2d, SparseLinear
from sparsevd.nn.sparse import to_csr
from sparsevd.ops.csr_linear import op as csr_op
from sparsevd.ops import library

TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}  # (rtol, atol)
needs_kernel = pytest.mark.skipif(not library.available(),
                                  reason=f"sparsevd._C not built ({library.unavailable_reason()})")


def reference(layer, x):
    """The zero-filled dense layer in IEEE arithmetic (the semantics every mode must give)."""
    return F.linear(x, layer.to_dense(), layer.bias)


# ------------------------------------------------------------------- non-finite inputs, linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("where", ["unused", "partial", "full", "mixed"])
@pytest.mark.parametrize("mode", ["csr", "dense", "masked"])
def test_linear_nonfinite_every_mode(mode, where, batch, dtype):
    w, cols = structured_weight(29, 70, dtype)
    layer = SparseLinear.from_dense(w, torch.randn(29, dtype=dtype), plan=mode)
    x = inject_nonfinite(torch.randn(batch, 70, dtype=dtype), cols, where)
    with torch.no_grad():
        assert_ieee_close(layer(x), reference(layer, x), *TOL[dtype])


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3, 16, 33, 64])
def test_linear_nonfinite_portable_kernels(isa, batch):
    w, cols = structured_weight(29, 70)
    layer = SparseLinear.from_dense(w, plan="csr")
    x = inject_nonfinite(torch.randn(batch, 70), cols, "mixed")
    with torch.no_grad():
        assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])


def test_linear_nonfinite_3d_input_dense_mode():
    """(*, K) inputs: the dense mode's fix-up works on every leading dimension."""
    w, cols = structured_weight(12, 40)
    layer = SparseLinear.from_dense(w, torch.randn(12), plan="dense")
    x = inject_nonfinite(torch.randn(4, 5, 40), cols, "unused")
    assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_issue_reproducer_plans_agree(batch):
    """The issue: plan csr at batch 1, masked above gave [nan, 1] and [nan, nan] for the same row."""
    layer = SparseLinear.from_dense(torch.eye(2), plan=[(1, "csr"), (None, "masked")])
    x = torch.tensor([[float("nan"), 1.0]])
    y = layer(x.repeat(batch, 1))
    assert torch.isnan(y).all(), y  # 0·NaN meets the second output too
    assert_ieee_close(y[0], layer(x)[0], 0, 0)


def test_dense_mode_without_unused_columns():
    """All columns used: the dense mode is a plain F.linear (no fix-up needed)."""
    w = torch.randn(6, 8)
    w[0, 0] = 0.0
    layer = SparseLinear.from_dense(w, plan="dense")
    assert layer._used_cols is None
    x = torch.randn(3, 8)
    x[1, 0] = float("nan")
    assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])


# ------------------------------------------------------------------- non-finite inputs, conv
def _conv_weight(out_c, in_c, k):
    w = torch.randn(out_c, in_c, k, k) * (torch.rand(out_c, in_c, k, k) < 0.4)
    w[:, 0] = 0  # an unused input channel
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["csr", "dense"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_conv_nonfinite_pixels(mode, batch, dtype, stride, padding, dilation):
    """NaN / ±inf pixels, with padding: both modes give F.conv2d with the zero-filled weight."""
    w = _conv_weight(6, 3, 3).to(dtype)
    b = torch.randn(6, dtype=dtype)
    layer = SparseConv2d.from_dense(w, b, stride=stride, padding=padding, dilation=dilation, plan=mode)
    x = torch.randn(batch, 3, 9, 9, dtype=dtype)
    for n in range(batch):
        for _ in range(3):
            c, h, v = (int(torch.randint(s, ())) for s in (3, 9, 9))
            x[n, c, h, v] = NONFINITE[int(torch.randint(3, ()))]
    w_zero = layer.to_dense().reshape(w.shape)
    expected = F.conv2d(x, w_zero, b, stride, padding, dilation)
    with torch.no_grad():
        assert_ieee_close(layer(x), expected, *TOL[dtype])
        assert_ieee_close(layer(x[0]), expected[0], *TOL[dtype], name="unbatched")


# ------------------------------------------------------------------ validation of the buffers
def _layer(plan="csr"):
    return SparseLinear.from_dense(torch.eye(40)[:16] * torch.arange(1.0, 17.0)[:, None],
                                   torch.randn(16), plan=plan)


def test_load_state_dict_rejects_bad_row_pointers_and_keeps_the_layer():
    """The issue's segfault: crow[5] = 10**8 through load_state_dict."""
    layer = _layer()
    x = torch.randn(1, 40)
    y = layer(x)
    sd = layer.state_dict()
    sd["crow_indices"] = sd["crow_indices"].clone()
    sd["crow_indices"][5] = 10**8
    with pytest.raises(RuntimeError, match="crow_indices: expected a non-decreasing"):
        layer.load_state_dict(sd)
    assert torch.equal(layer(x), y)  # the previous buffers are back


def test_load_state_dict_rejects_bad_columns():
    """The issue's garbage output: a column index of 20000 in a 40-column layer."""
    layer = _layer()
    sd = copy.deepcopy(layer.state_dict())
    sd["col_indices"][3] = 20000
    with pytest.raises(RuntimeError, match=r"col_indices: expected values in \[0, in_features=40\)"):
        layer.load_state_dict(sd)
    x = torch.randn(2, 40)
    assert torch.equal(layer(x), F.linear(x, layer.to_dense(), layer.bias))


def test_load_state_dict_assign_and_valid_loads():
    layer, other = _layer(), SparseLinear.from_dense(torch.eye(40)[:16] * 3.0, torch.zeros(16))
    x = torch.randn(3, 40)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    bad = copy.deepcopy(other.state_dict())
    bad["col_indices"] = bad["col_indices"].to(torch.int32)
    bad["col_indices"][0] = -1
    with pytest.raises(RuntimeError, match="col_indices: expected values in"):
        layer.load_state_dict(bad, assign=True)
    assert layer.col_indices.dtype == torch.uint16 and torch.equal(layer(x), other(x))


def test_load_state_dict_nested_prefix():
    model = torch.nn.Sequential(torch.nn.Identity(), _layer())
    sd = copy.deepcopy(model.state_dict())
    sd["1.col_indices"][0] = 99
    with pytest.raises(RuntimeError, match=r"1\.col_indices: expected values in"):
        model.load_state_dict(sd)


#: Plans that keep the CSR buffers: CSR alone, and CSR beside each dense mode's cache (mixed plans;
#: batch 2 and up run the dense mode), whose caches must follow edits of the CSR.
CSR_PLANS = {"csr": "csr", "csr+dense": [(1, "csr"), (None, "dense")],
             "csr+masked": [(1, "csr"), (None, "masked")]}


@pytest.mark.parametrize("plan", list(CSR_PLANS))
def test_inplace_edits_are_followed(plan):
    """In-place edits of values, col and crow (version counters): outputs follow, caches rebuilt."""
    layer = _layer(CSR_PLANS[plan])
    x = torch.randn(3, 40)
    with torch.no_grad():
        layer.values.mul_(2.0)
        assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32], name="values")
        assert layer.to_dense()[1, 1] == 4.0
        layer.col_indices[0] = 39  # row 0 now reads column 39
        assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32], name="col")
        assert layer.to_dense()[0, 39] == 2.0
        layer.crow_indices[1] = 2  # row 0 takes the first nonzero of row 1; row 1 is empty
        assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32], name="crow")
        assert (layer.to_dense()[1] == 0).all()


@pytest.mark.parametrize("mode", ["dense", "masked"])
def test_inplace_edits_of_the_dense_weight_are_followed(mode):
    """A dense plan stores the zero-filled weight; edits of it (version counter) reach the output."""
    layer = _layer(mode)
    assert layer.storage == "dense" and layer.values is None and layer.weight.shape == (16, 40)
    x = torch.randn(3, 40)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32], name="scaled")
        assert layer.to_dense()[1, 1] == 4.0
        layer.weight[0, 39] = 5.0  # a new nonzero (an unused column before)
        assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32], name="new nonzero")
        assert layer.num_nonzero == 17


@pytest.mark.parametrize("plan", list(CSR_PLANS))
@pytest.mark.parametrize("edit,match", [
    (lambda l: l.col_indices.__setitem__(3, 20000), r"col_indices: expected values in \[0, in_features=40\)"),
    (lambda l: l.col_indices.__setitem__(slice(3, 4), torch.tensor([65531]).to(torch.uint16)),
     "col_indices: expected values in"),
    (lambda l: l.crow_indices.__setitem__(5, 10**8), "crow_indices: expected a non-decreasing"),
    (lambda l: l.crow_indices.__setitem__(16, 3), r"crow_indices: expected crow\[0\] = 0 and crow\[-1\] = nnz"),
])
def test_bad_inplace_edits_raise_at_forward(plan, edit, match):
    layer = _layer(CSR_PLANS[plan])
    with torch.no_grad():
        edit(layer)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 40))
    with pytest.raises(ValueError, match=match):
        layer.to_dense()


def test_buffer_reassignment_is_validated():
    layer = _layer()
    x = torch.randn(2, 40)
    layer.values = layer.values * -1.0
    assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])
    layer.col_indices = torch.full_like(layer.col_indices, 40)
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, in_features=40\)"):
        layer(x)
    layer.col_indices = torch.arange(16, dtype=torch.int16)
    assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])
    layer.crow_indices = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="crow_indices"):
        layer(x)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 4, 40])
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_edits_bypassing_version_counters_hit_the_kernel_checks(isa, batch, how):
    """.data and numpy views do not bump the version counter: the kernel's own checks raise."""
    layer = _layer("csr")
    x = torch.randn(batch, 40)
    layer(x)
    col = layer.col_indices.data if how == "data" else layer.col_indices.numpy()
    col[3] = 20000
    with pytest.raises(RuntimeError, match=r"col_indices\[3\] = 20000 is outside \[0, in_features=40\)"):
        layer(x)
    col[3] = 3
    crow = layer.crow_indices.data if how == "data" else layer.crow_indices.numpy()
    crow[5] = 10**8
    with pytest.raises(RuntimeError, match=r"crow_indices\[5\] = 100000000 is outside"):
        layer(x)


def test_to_float64_and_back():
    layer = SparseLinear.from_dense(*_weight_and_bias(), plan=[(1, "csr"), (4, "dense"), (None, "masked")])
    x = torch.randn(6, 30)
    y = [layer(x[:b]) for b in (1, 3, 6)]
    d = layer.to(torch.float64)
    assert d.values.dtype == torch.float64 and d.col_indices.dtype == torch.uint16
    for b, yb in zip((1, 3, 6), y):
        assert_ieee_close(d(x[:b].double()), yb, 1e-6, 1e-6, name=f"fp64 batch {b}")
    f = d.float()
    assert f.values.dtype == torch.float32
    for b, yb in zip((1, 3, 6), y):
        assert_ieee_close(f(x[:b]), yb, 1e-6, 1e-6, name=f"fp32 batch {b}")


def _weight_and_bias():
    w, _ = structured_weight(20, 30)
    return w, torch.randn(20)


def test_to_empty_then_load_state_dict():
    """The meta-init idiom: to_empty() leaves garbage buffers (raising at use), the load fixes them."""
    src = _layer()
    with torch.device("meta"):
        layer = SparseLinear(40, 16, src.crow_indices.to("meta"), src.col_indices.to("meta"),
                             src.values.to("meta"), src.bias.to("meta"), check=False)
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.state_dict())
    x = torch.randn(2, 40)
    assert torch.equal(layer(x), src(x))


def test_inference_mode_buffers():
    """Inference tensors have no version counters: identity checks only, still correct."""
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(3, 40)
        y = layer(x)
    assert_ieee_close(y, reference(layer, x), *TOL[torch.float32])


def test_fallback_layer_validates(monkeypatch):
    """Without sparsevd._C the layer runs torch.sparse, which never sees bad indices either."""
    monkeypatch.setattr(library, "_MODULE", None)
    monkeypatch.setattr(csr_op, "_warned", True)
    layer = _layer()
    assert not layer._use_kernel
    x = torch.randn(3, 40)
    x[0, 39] = float("nan")  # column 39 is unused: row 0 all NaN
    assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])
    layer.col_indices.data[3] = 20000  # no version bump
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, in_features=40\)"):
        layer(x)


@pytest.mark.parametrize("mode", ["csr", "dense", "masked"])
def test_meta_input_names_x(mode):
    layer = _layer(mode)
    with pytest.raises(ValueError, match="x: expected a tensor with data on cpu .*got a meta tensor"):
        layer(torch.empty(2, 40, device="meta"))
    conv = SparseConv2d.from_dense(_conv_weight(4, 2, 3), plan="csr" if mode == "csr" else "dense")
    with pytest.raises(ValueError, match="x: expected a tensor with data on cpu .*got a meta tensor"):
        conv(torch.empty(1, 2, 8, 8, device="meta"))


def test_meta_layer_shapes_in_dense_modes():
    """A layer on meta computes shapes in the dense modes; the CSR kernel needs data, and so
    does building a CSR from a meta dense weight."""
    src = _layer()
    layer = SparseLinear(40, 16, src.crow_indices, src.col_indices, src.values, src.bias,
                         plan="masked").to("meta")
    assert layer(torch.empty(3, 40, device="meta")).shape == (3, 16)
    with pytest.raises(ValueError, match="plan: storing the weight as CSR needs its data"):
        layer.set_plan("csr")
    assert layer.plan == ((None, "masked"),)  # unchanged
    csr = SparseLinear(40, 16, src.crow_indices, src.col_indices, src.values, src.bias).to("meta")
    with pytest.raises(ValueError, match="x: expected a tensor with data on meta"):
        csr(torch.empty(3, 40, device="meta"))


@pytest.mark.parametrize("name,value", [("stride", 0), ("stride", (1, -1)), ("padding", -1),
                                        ("dilation", 0), ("stride", "same")])
def test_conv_scalar_arguments_checked_at_construction(name, value):
    with pytest.raises(ValueError, match=f"{name}: "):
        SparseConv2d.from_dense(_conv_weight(4, 2, 3), **{name: value})


@needs_kernel
def test_conv_csr_bad_columns_through_data():
    conv = SparseConv2d.from_dense(_conv_weight(4, 2, 3), plan="csr")
    x = torch.randn(2, 2, 8, 8)
    conv(x)
    conv.col_indices.data[0] = 10**4
    with pytest.raises(RuntimeError, match=r"col_indices\[0\] = 10000 is outside \[0, in_features=18\)"):
        conv(x)


@pytest.mark.parametrize("plan,key", [("dense", "weight"), ("csr+dense", "values")])
def test_state_dict_roundtrip_through_numpy(plan, key):
    """A state dict edited as numpy arrays and loaded back (copy_ bumps the versions)."""
    layer = _layer(CSR_PLANS.get(plan, plan))
    sd = {k: torch.from_numpy(np.array(v.numpy())) for k, v in layer.state_dict().items()}
    sd[key] *= 3.0
    layer.load_state_dict(sd)
    x = torch.randn(2, 40)
    assert_ieee_close(layer(x), reference(layer, x), *TOL[torch.float32])
    assert layer.to_dense()[0, 0] == 3.0


# --------------------------------------------------------------- storage follows the plan
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_storage_follows_the_plan_exactly(dtype):
    """CSR plans store the CSR only, dense plans the zero-filled weight only (the dense layer's
    bytes, no CSR beside it); set_plan converts both ways without changing a weight."""
    w, _ = structured_weight(20, 30, dtype)
    b = torch.randn(20, dtype=dtype)
    layer = SparseLinear.from_dense(w, b)
    crow, col, val = (t.clone() for t in layer.csr())
    assert layer.storage == "csr" and layer._buffers["weight"] is None
    assert set(layer.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}
    # weight reads as nn.Linear's: a new dense tensor from the CSR each time, built only when an op
    # reads its values (its dtype, device and shape do not build it)
    assert torch.equal(layer.weight, w) and layer.weight is not layer.weight
    builds = []
    to_dense = layer.to_dense
    layer.to_dense = lambda: builds.append(1) or to_dense()
    meta = layer.weight
    assert (meta.dtype, meta.device, meta.shape, isinstance(meta, torch.Tensor)) == (
        dtype, w.device, w.shape, True) and not builds
    assert torch.equal(meta.t(), w.t()) and builds == [1]
    del layer.to_dense
    x = torch.randn(5, 30, dtype=dtype)
    y = layer(x)
    for mode in ("masked", "dense"):
        layer.set_plan(mode)
        assert layer.storage == "dense" and layer.values is None and layer.col_indices is None
        assert torch.equal(layer.weight, w)
        assert layer.nbytes() == w.numel() * w.element_size() + b.numel() * b.element_size()
        assert set(layer.state_dict()) == {"weight", "bias"}
        assert layer.num_nonzero == int((w != 0).sum())
        assert_ieee_close(layer(x), y, *TOL[dtype], name=mode)
        layer.set_plan("csr")
        assert layer.storage == "csr" and layer._buffers["weight"] is None
        assert all(torch.equal(a, b_) for a, b_ in zip(layer.csr(), (crow, col, val)))
        assert torch.equal(layer(x), y)


def test_weight_constructor_and_conv_storage():
    w, _ = structured_weight(12, 18)
    layer = SparseLinear(18, 12, weight=w)
    assert layer.plan == ((None, "masked"),) and layer.storage == "dense"
    assert layer._fast[0] is layer.weight  # the fast path runs on the stored weight, no copy
    with pytest.raises(ValueError, match="weight: give the CSR weight .* or a dense weight, not both"):
        SparseLinear(18, 12, *to_csr(w), weight=w)
    with pytest.raises(ValueError, match=r"weight: expected shape \(12, 18\)"):
        SparseLinear(18, 12, weight=w.t())
    with pytest.raises(ValueError, match="the CSR weight \\(or weight=\\) is required"):
        SparseLinear(18, 12)
    cw = _conv_weight(6, 3, 3)
    conv = SparseConv2d.from_dense(cw, plan="dense")
    assert conv.storage == "dense" and conv.weight.shape == (6, 3, 3, 3) and conv._fast[0] is conv.weight
    x = torch.randn(2, 3, 8, 8)
    assert_ieee_close(conv(x), F.conv2d(x, cw), *TOL[torch.float32])
    conv.set_plan("csr")
    assert conv.storage == "csr" and conv._buffers["weight"] is None and torch.equal(conv.weight, cw)
    conv1d = SparseConv1d.from_dense(cw[:, :, 0], stride=2)  # nn.Conv1d's 3-D weight, both storages
    assert conv1d.storage == "csr" and torch.equal(conv1d.weight, cw[:, :, 0])
    conv1d.set_plan("dense")
    assert conv1d._buffers["weight"].shape == (6, 3, 1, 3) and torch.equal(conv1d.weight, cw[:, :, 0])
    assert conv1d.weight.data_ptr() == conv1d._buffers["weight"].data_ptr()  # a view, no copy
    assert_ieee_close(conv(x), F.conv2d(x, cw), *TOL[torch.float32], name="csr")


@pytest.mark.parametrize("src_plan,dst_plan", [("csr", "masked"), ("masked", "csr"), ("dense", "masked")])
@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_across_storages(src_plan, dst_plan, assign):
    """A state dict of the other storage loads (the layer keeps its plan's storage); a bad one is
    rejected with the layer unchanged."""
    w, _ = structured_weight(16, 40)
    src = SparseLinear.from_dense(w, torch.randn(16), plan=src_plan)
    dst = _layer(dst_plan)
    x = torch.randn(3, 40)
    before = dst(x)
    storage = dst.storage
    dst.load_state_dict(src.state_dict(), assign=assign)
    assert dst.storage == storage and dst.plan == SparseLinear.from_dense(w, plan=dst_plan).plan
    assert_ieee_close(dst(x), F.linear(x, w, src.bias), *TOL[torch.float32])
    bad = {k: v.clone() for k, v in _layer(src_plan).state_dict().items()}
    if "weight" in bad:
        bad["weight"] = bad["weight"][:, :30]
        match = "weight: expected shape|size mismatch"
    else:
        bad["col_indices"][0] = 40
        match = r"col_indices: expected values in \[0, in_features=40\)"
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(bad, assign=assign)
    assert_ieee_close(dst(x), F.linear(x, w, src.bias), *TOL[torch.float32], name="after a bad load")
    assert before.shape == dst(x).shape


def test_dense_and_csr_buffers_together_are_rejected():
    layer = _layer("masked")
    layer.values = torch.ones(16)
    with pytest.raises(ValueError, match="weight: the layer stores its weight as CSR"):
        layer(torch.randn(2, 40))
