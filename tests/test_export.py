"""Export of deployed models (sparsevd/export.py, the layers' export paths): ONNX with CSR layers
run in onnxruntime against PyTorch at several batch sizes of one dynamic batch dimension;
torch.export with a dynamic batch for every plan; what TorchScript does."""
import logging
import warnings

import pytest
import torch
from conftest import assert_close, assert_ieee_close
from torch import nn

import sparsevd
from sparsevd.models import TransformerEncoderLike
from sparsevd.nn import Conv2dSVDO, LinearSVDO, SparseConv2d, SparseLinear
from sparsevd.nn.svdo import SVDO_LAYERS
from sparsevd.ops import library

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
needs_kernel = pytest.mark.skipif(not library.available(),
                                  reason=f"sparsevd._C not built ({library.unavailable_reason()})")
BATCHES = (1, 7, 32)


@pytest.fixture(autouse=True)
def quiet_exporter():
    """The exporters log progress and warn about deprecations; the tests check results."""
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


@torch.no_grad()
def prune(model, frac, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, SVDO_LAYERS):
            m.log_sigma2.fill_(-30.0)
            m.log_sigma2[torch.rand(m.log_sigma2.shape, generator=g) < frac] = 20.0
            if m.bias is not None:
                m.bias.normal_(generator=g)
    return model.eval()


def mlp():
    torch.manual_seed(21)
    return prune(nn.Sequential(LinearSVDO(48, 64), nn.ReLU(), LinearSVDO(64, 10)), 0.9, 1), (48,)


def convnet():
    torch.manual_seed(22)
    model = nn.Sequential(Conv2dSVDO(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          Conv2dSVDO(8, 6, 3, stride=2, dilation=1), nn.ReLU(), nn.Flatten(),
                          LinearSVDO(6 * 1 * 1, 5))
    return prune(model, 0.7, 2), (3, 8, 8)


def transformer():
    torch.manual_seed(23)
    return prune(TransformerEncoderLike(hidden=32, layers=1, heads=2, svd=True), 0.9, 3), (5, 32)


MODELS = {"mlp": mlp, "convnet": convnet, "transformer": transformer}


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@needs_kernel
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_of_csr_layers_runs_in_onnxruntime(name, tmp_path):
    """torch.onnx.export as it is (dynamo exporter, one dynamic batch dimension) of a model whose
    every layer runs CSR: onnxruntime gives PyTorch's outputs at batches 1, 7, 32, NaN inputs
    included (the dense product with the zero-filled weight)."""
    model, shape = MODELS[name]()
    dep = sparsevd.deploy(model, cost_model="csr")
    sparse = [m for m in dep.modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    assert sparse and all(m.plan == ((None, "csr"),) for m in sparse)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(dep, (torch.randn(2, *shape),), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    for b in BATCHES:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            assert_close(run_onnx(path, x), dep(x), 1e-5, 1e-5, name=f"batch {b}")
    x = torch.randn(3, *shape)
    x.view(3, -1)[1, 0] = float("nan")
    with torch.no_grad():
        assert_ieee_close(run_onnx(path, x), dep(x), 1e-5, 1e-5, name="NaN input")


@needs_kernel
def test_onnx_file_holds_the_csr_not_the_dense_weight(tmp_path):
    """The ONNX file of a CSR layer stores the CSR (the dense weight is rebuilt in the graph; no
    zero-filled constant): at 95 % sparsity it is a fraction of the dense layer's file."""
    torch.manual_seed(26)
    w = torch.randn(512, 512) * (torch.rand(512, 512) < 0.05)
    b = torch.randn(512)
    paths = {}
    for plan in ("csr", "masked"):
        layer = SparseLinear.from_dense(w, b, plan=plan).eval()
        paths[plan] = sparsevd.export_onnx(layer, (torch.randn(2, 512),), tmp_path / f"{plan}.onnx")
    x = torch.randn(3, 512)
    assert_close(run_onnx(paths["csr"], x), run_onnx(paths["masked"], x), 1e-5, 1e-5)
    assert paths["csr"].stat().st_size < 0.25 * paths["masked"].stat().st_size


@needs_kernel
def test_onnx_of_an_exported_program_with_the_op(tmp_path):
    """An ExportedProgram holds sparsevd::csr_linear itself: export_onnx passes its translation."""
    model, shape = mlp()
    dep = sparsevd.deploy(model, cost_model="csr")
    ep = torch.export.export(dep, (torch.randn(4, *shape),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert any("sparsevd.csr_linear" in str(n.target) for n in ep.graph.nodes)
    path = sparsevd.export_onnx(ep, (torch.randn(4, *shape),), tmp_path / "ep.onnx")
    for b in BATCHES:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            assert_close(run_onnx(path, x), dep(x), 1e-5, 1e-5, name=f"batch {b}")
    with pytest.raises(ValueError, match="args: a dynamic batch needs example inputs with a batch"):
        sparsevd.export_onnx(dep, (torch.randn(1, *shape),), tmp_path / "one.onnx")


@needs_kernel
def test_torchscript_based_onnx_exporter(tmp_path):
    """The deprecated TorchScript-based exporter cannot store uint16 tensors: a clear error, and
    int32 column indices export."""
    model, shape = mlp()
    dep = sparsevd.deploy(model, cost_model="csr")
    path = tmp_path / "ts.onnx"
    kwargs = dict(dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(TypeError, match="col_indices: the TorchScript-based ONNX exporter"):
        torch.onnx.export(dep, (torch.randn(2, *shape),), str(path), **kwargs)
    for m in dep.modules():
        if isinstance(m, SparseLinear):
            m.col_indices = m.col_indices.int()
    torch.onnx.export(dep, (torch.randn(2, *shape),), str(path), **kwargs)
    for b in BATCHES:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            assert_close(run_onnx(path, x), dep(x), 1e-5, 1e-5, name=f"batch {b}")


PLANS = {"csr": "csr", "masked": "masked", "dense": "dense",
         "csr_then_masked": [(16, "csr"), (None, "masked")],
         "masked_then_csr": [(4, "masked"), (None, "csr")]}


@pytest.mark.parametrize("plan", list(PLANS))
def test_torch_export_with_a_dynamic_batch_for_every_plan(plan):
    """A plan that switches kernels at a batch size does not guard the dynamic batch: the
    exported graph runs the plan's last mode at every batch size (the same outputs)."""
    if "csr" in plan and not library.available():
        pytest.skip("sparsevd._C not built")
    torch.manual_seed(24)
    w = torch.randn(40, 96) * (torch.rand(40, 96) < 0.2)
    w[:, :10] = 0  # unused columns: the dense mode gathers
    layer = SparseLinear.from_dense(w, torch.randn(40), plan=PLANS[plan])
    model = nn.Sequential(layer, nn.Tanh()).eval()
    ep = torch.export.export(model, (torch.randn(8, 3, 96),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    for b in (1, 2, 7, 32, 100):
        x = torch.randn(b, 3, 96)
        with torch.no_grad():
            assert_close(ep.module()(x), torch.tanh(x @ w.T + layer.bias), 1e-5, 1e-5, name=f"batch {b}")


@pytest.mark.parametrize("plan", ["csr", "dense", [(2, "csr"), (None, "dense")]])
def test_torch_export_conv_with_a_dynamic_batch(plan):
    if "csr" in str(plan) and not library.available():
        pytest.skip("sparsevd._C not built")
    torch.manual_seed(25)
    w = torch.randn(6, 3, 3, 3) * (torch.rand(6, 3, 3, 3) < 0.4)
    conv = SparseConv2d.from_dense(w, torch.randn(6), padding=1, plan=plan).eval()
    ep = torch.export.export(conv, (torch.randn(4, 3, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    for b in (1, 5):
        x = torch.randn(b, 3, 8, 8)
        with torch.no_grad():
            assert_close(ep.module()(x), torch.nn.functional.conv2d(x, w, conv.bias, padding=1),
                         1e-5, 1e-5, name=f"batch {b}")


@pytest.mark.parametrize("plan", ["csr", "masked"])
def test_torchscript(plan):
    """torch.jit.script raises a clear error naming what works; torch.jit.trace works."""
    if plan == "csr" and not library.available():
        pytest.skip("sparsevd._C not built")
    w = torch.randn(12, 30) * (torch.rand(12, 30) < 0.3)
    model = nn.Sequential(SparseLinear.from_dense(w, torch.randn(12), plan=plan), nn.ReLU()).eval()
    with pytest.raises(RuntimeError, match="SparseLinear cannot be compiled by torch.jit.script.*"
                                           "torch.jit.trace works"):
        torch.jit.script(model)
    traced = torch.jit.trace(model, (torch.randn(4, 30),))
    x = torch.randn(9, 30)
    with torch.no_grad():
        assert_close(traced(x), model(x), 1e-6, 1e-6)
