"""deploy(): compaction, folding, CSR layers and plans; save/load; the `sparsevd deploy` CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from torch import nn

import sparsevd
from sparsevd.compare import dense_twin
from sparsevd.planner import rule_mode
from sparsevd.models import LeNet5, LeNet300
from sparsevd.nn import Conv1dSVDO, Conv2dSVDO, LinearSVDO, SparseConv1d, SparseConv2d, SparseLinear
from sparsevd.nn.svdo import SVDO_LAYERS
from sparsevd.ops.library import available as extension_available

RTOL, ATOL = 1e-5, 1e-5
DEAD = 20.0  # log σ² that gives log α = 10 ≥ threshold for any θ: the weight is dropped


# ------------------------------------------------------------------------------- helpers
def train_steps(model, steps, shape, batch=16, lr=1e-3):
    """Quick SGVLB steps on random data (the weights and log σ² move off their initialisation);
    one thread, which is faster for these small layers on a shared machine."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = sparsevd.SGVLB(model, train_size=1000)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            x = torch.randn(batch, *shape)
            y = torch.randint(0, 10, (batch,))
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def prune(model, frac=0.9, gen=None):
    """Drop a random ``frac`` of every SVD layer's weights (log σ² pushed up)."""
    for m in model.modules():
        if isinstance(m, SVDO_LAYERS):
            mask = torch.rand(m.log_sigma2.shape, generator=gen) < frac
            m.log_sigma2[mask] = DEAD
    return model


@torch.no_grad()
def kill_rows(layer, idx, bias=None):
    """Neurons ``idx`` of ``layer`` lose all their weights (dead: output act(b))."""
    layer.log_sigma2[idx] = DEAD
    if bias is not None:
        layer.bias[idx] = bias


@torch.no_grad()
def kill_cols(layer, idx):
    """Inputs ``idx`` of ``layer`` are read by no weight."""
    layer.log_sigma2[:, idx] = DEAD


@pytest.fixture(scope="module")
def lenet300():
    torch.manual_seed(1)
    model = train_steps(LeNet300(), 100, (1, 28, 28))
    g = torch.Generator().manual_seed(2)
    prune(model, 0.9, g)
    fc1, fc2, fc3 = model[1], model[3], model[5]
    kill_rows(fc1, torch.arange(0, 20), bias=0.5)     # dead, ReLU(b) > 0: folded into fc2's bias
    kill_rows(fc1, torch.arange(20, 40), bias=-0.5)   # dead, ReLU(b) = 0: just dropped
    kill_cols(fc2, torch.arange(40, 60))              # nobody reads them: dropped
    kill_rows(fc2, torch.arange(0, 10), bias=0.3)     # dead in the second hidden layer
    kill_cols(fc1, torch.arange(0, 784, 7))           # dead input pixels
    return model


@pytest.fixture(scope="module")
def lenet5():
    torch.manual_seed(3)
    model = train_steps(LeNet5(), 30, (1, 28, 28), batch=8)
    g = torch.Generator().manual_seed(4)
    prune(model, 0.9, g)
    conv1, conv2, fc1 = model[0], model[3], model[7]
    kill_rows(conv1, torch.tensor([0, 1, 2]), bias=0.4)    # constant channel: folds into conv2
    kill_rows(conv2, torch.tensor([5, 6, 7, 8]), bias=0.2)  # constant after pool: folds into fc1
    kill_rows(conv2, torch.tensor([9, 10]), bias=-0.2)      # ReLU(b) = 0
    kill_cols(fc1, torch.arange(11 * 16, 14 * 16))          # channels 11..13 unread by fc1
    kill_rows(fc1, torch.arange(0, 50), bias=0.1)
    return model


def expected_outputs(model, batches=(1, 7, 64)):
    xs = {b: torch.randn(b, 1, 28, 28) for b in batches}
    with torch.no_grad():
        return xs, {b: model(x) for b, x in xs.items()}


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("cost_model", ["csr", "dense", "masked", "rule", "measure"])
def test_lenet300_matches_svd_model(lenet300, cost_model):
    xs, ys = expected_outputs(lenet300)
    dep = sparsevd.deploy(lenet300, xs[1], cost_model=cost_model)
    assert not dep.training
    for b, x in xs.items():
        with torch.no_grad():
            assert_close(dep(x), ys[b], RTOL, ATOL, name=f"batch {b}")


def test_lenet300_compaction(lenet300):
    dep = sparsevd.deploy(lenet300, cost_model="csr")
    fc1, fc2, fc3 = dep[1], dep[3], dep[5]
    assert isinstance(fc1, SparseLinear) and isinstance(fc3, SparseLinear)
    # interface unchanged, hidden layers compact: 60 neurons of fc1 removed (20 folded, 20 zero,
    # 20 unread), at least the 10 dead neurons of fc2
    assert fc1.in_features == 784 and fc3.out_features == 10
    assert fc1.out_features <= 300 - 60 and fc2.in_features == fc1.out_features
    assert fc2.out_features <= 100 - 10 and fc3.in_features == fc2.out_features
    # CSR storage: int32 row pointers, uint16 columns (≤ 65536 inputs), fp32 values
    assert fc1.crow_indices.dtype == torch.int32 and fc1.col_indices.dtype == torch.uint16
    assert fc1.values.dtype == torch.float32
    # report() counts the deployed layers against the trained shapes
    r_svd, r_dep = sparsevd.report(lenet300), sparsevd.report(dep)
    assert r_dep.params == r_svd.params == 266200
    assert r_dep.nonzero <= r_svd.nonzero
    assert [tuple(r.shape) for r in r_dep.layers] == [(300, 784), (100, 300), (10, 100)]


@pytest.mark.parametrize("cost_model", ["csr", "dense", "rule"])
def test_lenet5_matches_svd_model(lenet5, cost_model):
    xs, ys = expected_outputs(lenet5)
    dep = sparsevd.deploy(lenet5, xs[1], cost_model=cost_model)
    for b, x in xs.items():
        with torch.no_grad():
            assert_close(dep(x), ys[b], RTOL, ATOL, name=f"batch {b}")


def test_lenet5_compaction(lenet5):
    dep = sparsevd.deploy(lenet5, cost_model="csr")
    conv1, conv2, fc1, fc2 = dep[0], dep[3], dep[7], dep[9]
    assert isinstance(conv1, SparseConv2d) and isinstance(fc1, SparseLinear)
    assert conv1.in_channels == 1 and conv1.out_channels <= 17 and conv2.in_channels == conv1.out_channels
    assert conv2.out_channels <= 50 - 9
    assert fc1.in_features == conv2.out_channels * 16  # 4x4 positions per channel after the pools
    assert fc1.out_features <= 450 and fc2.in_features == fc1.out_features and fc2.out_features == 10


def test_lenet5_measured_plan(lenet5):
    """The measured cost model on the convolutions needs the example input's size."""
    xs, ys = expected_outputs(lenet5, (1, 5))
    dep = sparsevd.deploy(lenet5, xs[1], cost_model="measure", buckets=(1, 16))
    for m in dep.modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            assert m.plan and m.plan[-1][0] is None
    for b, x in xs.items():
        with torch.no_grad():
            assert_close(dep(x), ys[b], RTOL, ATOL, name=f"batch {b}")


class Custom(nn.Module):
    """Not a Sequential: its trace links a → relu → b's first layer (sparsevd/surgery.py)."""

    def __init__(self):
        super().__init__()
        self.a = LinearSVDO(12, 9)
        self.b = nn.Sequential(LinearSVDO(9, 8), nn.Tanh(), LinearSVDO(8, 5))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + 1


def _edge_models():
    torch.manual_seed(5)
    sig = nn.Sequential(LinearSVDO(10, 16), nn.Sigmoid(), nn.Dropout(0.2), LinearSVDO(16, 6))
    kill_rows(sig[0], torch.arange(0, 8), bias=0.3)  # sigmoid(b) ≠ 0 always: folded
    pad = nn.Sequential(Conv2dSVDO(3, 8, 3, padding=1), nn.ReLU(), Conv2dSVDO(8, 4, 3, padding=1))
    kill_rows(pad[0], torch.tensor([0, 1]), bias=0.5)   # padding: cannot fold, channels stay
    kill_rows(pad[0], torch.tensor([2, 3]), bias=-0.5)  # ReLU(b) = 0: dropped anyway
    avg = nn.Sequential(Conv2dSVDO(2, 6, 3), nn.ReLU(), nn.AvgPool2d(2, padding=1), nn.Flatten(),
                        LinearSVDO(6 * 16, 7))
    kill_rows(avg[0], torch.tensor([0, 4]), bias=0.5)   # counted padding: not uniform, kept
    alldead = nn.Sequential(LinearSVDO(6, 5), nn.ReLU(), LinearSVDO(5, 4), nn.ReLU(), LinearSVDO(4, 3))
    kill_rows(alldead[2], torch.arange(4), bias=0.7)    # a whole layer dead: a constant output
    grouped = Conv2dSVDO(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    nobias = nn.Sequential(LinearSVDO(8, 6, bias=False), nn.ELU(), LinearSVDO(6, 3, bias=False))
    kill_rows(nobias[0], torch.tensor([1]))             # ELU(0) = 0
    return {
        "custom": (Custom(), (4, 12)),
        "sigmoid_dropout": (sig, (5, 10)),
        "conv_padding": (pad, (2, 3, 9, 9)),
        "avgpool_padding": (avg, (3, 2, 8, 8)),
        "all_dead_layer": (alldead, (4, 6)),
        "grouped_conv": (grouped, (2, 4, 9, 9)),
        "no_bias_elu": (nobias, (3, 8)),
        "bare_linear": (LinearSVDO(7, 3), (2, 7)),
    }


@pytest.mark.parametrize("name", list(_edge_models()))
@pytest.mark.parametrize("cost_model", ["csr", "rule"])
def test_edge_models_match(name, cost_model):
    model, shape = _edge_models()[name]
    prune(model.eval(), 0.5)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
        dep = sparsevd.deploy(model, cost_model=cost_model)
        assert_close(dep(x), expected, RTOL, ATOL)
    assert not any(isinstance(m, SVDO_LAYERS) for m in dep.modules())
    if name == "conv_padding":
        assert dep[0].out_channels == 6  # the two foldable-but-padded channels stay
    if name == "all_dead_layer":
        assert dep[2].out_features == 1 and dep[2].num_nonzero == 0


@pytest.mark.parametrize("cost_model", ["csr", "dense", "rule", "measure"])
def test_conv1d_model_deploys(cost_model, tmp_path):
    """A model of Conv1dSVDO layers (a 1-D conv net: conv, ReLU, conv with groups, flatten,
    linear) deploys to SparseConv1d layers whose outputs equal the eval model's and the dense
    twin's, unbatched too; it saves and loads bit-exactly; asymmetric padding raises."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = nn.Sequential(Conv1dSVDO(3, 8, 5, padding=2), nn.ReLU(),
                          Conv1dSVDO(8, 8, 3, stride=2, dilation=2, padding="valid", groups=2),
                          nn.ReLU(), nn.Flatten(), LinearSVDO(8 * 7, 10))
    model = train_steps(model, 5, (3, 17), batch=8)
    prune(model, 0.7, torch.Generator().manual_seed(5))
    dep = sparsevd.deploy(model, cost_model=cost_model, example_input=torch.randn(2, 3, 17))
    assert [type(m) for m in dep if not isinstance(m, (nn.ReLU, nn.Flatten))] == [
        SparseConv1d, SparseConv1d, SparseLinear]
    # nn.Conv1d's attributes (1-tuples), read-only
    assert [(m.kernel_size, m.stride, m.padding, m.dilation) for m in (dep[0], dep[2])] == [
        ((5,), (1,), (2,), (1,)), ((3,), (2,), (0,), (2,))]
    with pytest.raises(AttributeError):
        dep[2].stride = (1,)
    twin = dense_twin(model)
    assert isinstance(twin[0], nn.Conv1d)
    for b in (1, 5, 33):
        x = torch.randn(b, 3, 17)
        with torch.no_grad():
            e = model(x)
            assert_close(dep(x), e, rtol=RTOL, atol=ATOL, name=f"batch {b}")
            assert_close(twin(x), e, rtol=RTOL, atol=ATOL, name=f"dense twin, batch {b}")
    with torch.no_grad():
        one = dep[0](x[0])
        assert_close(one, model[0](x[0]), rtol=RTOL, atol=ATOL, name="unbatched")
    loaded = sparsevd.load(sparsevd.save(dep, tmp_path / "c1.safetensors"))
    assert str(loaded) == str(dep) and isinstance(loaded[0], SparseConv1d)
    with torch.no_grad():
        assert torch.equal(loaded(x), dep(x))
    with pytest.raises(ValueError, match="^x: expected shape"):
        dep[0](torch.randn(2, 3, 1, 17))
    with pytest.raises(ValueError, match="asymmetric padding"):
        sparsevd.deploy(Conv1dSVDO(2, 3, 4, padding="same").eval())


def test_fp64_model():
    torch.manual_seed(6)
    model = prune(LeNet300().double().eval(), 0.8)
    kill_rows(model[1], torch.arange(10), bias=0.2)
    x = torch.randn(5, 784, dtype=torch.float64)
    dep = sparsevd.deploy(model, cost_model="csr")
    assert dep[1].values.dtype == torch.float64
    with torch.no_grad():
        assert_close(dep(x), model(x), 1e-12, 1e-12)


def test_threshold_argument(lenet300):
    dep_default = sparsevd.deploy(lenet300, cost_model="csr")
    dep_loose = sparsevd.deploy(lenet300, cost_model="csr", threshold=8.0)
    nnz = lambda m: sum(l.num_nonzero for l in m.modules() if isinstance(l, SparseLinear))  # noqa: E731
    assert nnz(dep_loose) >= nnz(dep_default)


# ------------------------------------------------------------------------------ the plans
def test_plan_buckets_and_modes():
    layer = SparseLinear.from_dense(torch.randn(6, 5), plan=[(2, "masked"), (None, "csr")])
    assert layer.mode_for(1) == "masked" and layer.mode_for(3) == "csr"
    layer.set_plan([(8, "csr"), (2, "csr"), (None, "dense")])
    assert layer.plan == ((8, "csr"), (None, "dense"))
    with pytest.raises(ValueError, match="plan: unknown mode 'fast'"):
        layer.set_plan("fast")
    conv = SparseConv2d.from_dense(torch.randn(4, 1, 3, 3), groups=1)
    with pytest.raises(ValueError, match="plan: unknown mode 'masked'"):
        conv.set_plan("masked")
    grouped = SparseConv2d.from_dense(torch.randn(4, 1, 3, 3), groups=2, plan="dense")
    with pytest.raises(ValueError, match="needs groups == 1"):
        grouped.set_plan("csr")


def test_rule_mode_follows_density():
    sparse = SparseLinear.from_dense(torch.randn(256, 256) * (torch.rand(256, 256) < 0.05))
    dense = SparseLinear.from_dense(torch.randn(256, 256))
    tiny = SparseLinear.from_dense(torch.randn(40, 40) * (torch.rand(40, 40) < 0.05))
    if extension_available():
        assert rule_mode(sparse, 1) == "csr" and rule_mode(sparse, 64) == "csr"
        assert rule_mode(tiny, 64) == "csr"
    assert rule_mode(dense, 1) == "masked" and rule_mode(dense, 64) == "masked"
    assert rule_mode(tiny, 1) != "csr"  # call overheads dominate
    conv = SparseConv2d.from_dense(torch.randn(4, 2, 3, 3) * (torch.rand(4, 2, 3, 3) < 0.1))
    assert rule_mode(conv, 1) == "dense"


# ------------------------------------------------------------ never bigger, never slower
def _dense_layer_bytes(m):
    return math.prod(m.matrix_shape) * m.stored_weight.element_size() + (0 if m.bias is None else m.bias.nbytes)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.98])
@pytest.mark.parametrize("cost_model,dtype", [("measure", torch.float32), ("rule", torch.float32),
                                              ("rule", torch.bfloat16)])
def test_deployed_layers_are_never_bigger_than_dense(sparsity, cost_model, dtype):
    """Each deployed layer stores one format, CSR or the dense weight, never both, and never more
    bytes than the dense layer of its shape (CSR only where it is smaller: uint16 columns)."""
    torch.manual_seed(11)
    model = prune(LeNet300().to(dtype).eval(), sparsity)
    dep = sparsevd.deploy(model, cost_model=cost_model, buckets=(1, 16))
    layers = [m for m in dep.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 3
    for m in layers:
        assert len(m.plan) == 1 and m.storage == ("csr" if m.plan[0][1] == "csr" else "dense")
        assert (m._buffers["weight"] is None) == (m.values is not None)
        assert m.nbytes() <= _dense_layer_bytes(m), (m, m.nbytes())
    if sparsity == 0.1:
        assert all(m.storage == "dense" for m in layers)  # CSR would take 5.4 bytes per weight
    x = torch.randn(3, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close(dep(x), model(x), tol, tol)


def test_planner_times_with_the_model_threads_and_needs_every_bucket(monkeypatch):
    """The cost model times on the thread count the model will run on (recorded in the plan), and
    CSR must beat the dense product at every bucket: a loss at the largest makes the layer dense."""
    from sparsevd import planner

    calls = []

    def fake(fns, device, threads=1, **kw):  # CSR wins at the first two buckets, loses at the third
        calls.append(threads)
        return {"masked": 1.0, "csr": 0.5 if len(calls) % 3 else 1.2}

    monkeypatch.setattr(planner, "_measure", fake)
    w = torch.randn(256, 256) * (torch.rand(256, 256) < 0.05)
    layer = SparseLinear.from_dense(w)
    planner.plan_layer(layer, buckets=(1, 16, 64), threads=2)
    assert calls == [2, 2, 2] and layer.plan == ((None, "masked"),) and layer.storage == "dense"
    assert layer.plan_threads == 2
    calls.clear()
    planner.plan_layer(layer, buckets=(1, 16), threads=3)
    assert calls == [3, 3] and layer.plan == ((None, "csr"),) and layer.storage == "csr"
    model = nn.Sequential(LinearSVDO(256, 256)).eval()
    prune(model, 0.95)
    calls.clear()
    dep = sparsevd.deploy(model, buckets=(1, 16), threads=1)
    assert calls == [1, 1] and dep[0].plan_threads == 1 and dep[0].storage == "csr"
    with pytest.raises(ValueError, match="threads: expected a positive int"):
        sparsevd.deploy(model, threads=0)


def test_planner_times_linear_layers_at_the_rows_of_the_example_input(monkeypatch):
    """With an example input (B, T, ...) the linear layers see B·T rows per batch of B: the buckets
    are timed at bucket·T rows (at most MAX_TIMED_ROWS), not at bucket rows (a transformer never
    runs a single row, where call overheads can make CSR lose)."""
    from sparsevd import planner

    rows = []

    def fake(fns, device, threads=1, **kw):
        y = fns["csr"]()  # runs the layer on the timing input: its rows
        rows.append(y.shape[:-1].numel())
        return {"masked": 1.0, "csr": 0.5}

    monkeypatch.setattr(planner, "_measure", fake)
    model = nn.Sequential(LinearSVDO(256, 256), nn.ReLU(), LinearSVDO(256, 64)).eval()
    prune(model, 0.9, torch.Generator().manual_seed(3))
    dep = sparsevd.deploy(model, torch.randn(2, 16, 256), buckets=(1, 16, 256))
    assert rows and set(rows) == {16, 256, planner.MAX_TIMED_ROWS}, rows
    assert all(m.plan == ((None, "csr"),) for m in dep if isinstance(m, SparseLinear))
    rows.clear()
    sparsevd.deploy(model, buckets=(1, 16))  # no example: a bucket is that many rows
    assert set(rows) == {1, 16}, rows


def test_example_input_as_positional_or_keyword_arguments(monkeypatch):
    """example_input is model(x), model(*tuple) or model(**dict) (an encoder-decoder's two
    inputs); the batch is the first tensor's; a model that raises on it is a ValueError naming
    example_input with the model's message; another type is a TypeError."""
    from sparsevd import planner

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = LinearSVDO(256, 256), LinearSVDO(192, 256)

        def forward(self, src, tgt=None):
            if tgt is None:
                raise ValueError("You must specify tgt")
            return self.enc(src).sum(1, keepdim=True) + self.dec(tgt)

    rows = []

    def fake(fns, device, threads=1, **kw):
        rows.append(fns["csr"]().shape[:-1].numel())
        return {"masked": 1.0, "csr": 0.5}

    monkeypatch.setattr(planner, "_measure", fake)
    model = prune(TwoInputs().eval(), 0.9, torch.Generator().manual_seed(4))
    src, tgt = torch.randn(2, 8, 256), torch.randn(2, 3, 192)
    expected = model(src, tgt)
    for example in ((src, tgt), [src, tgt], {"src": src, "tgt": tgt}):
        rows.clear()
        dep = sparsevd.deploy(model, example, buckets=(1, 4))
        assert set(rows) == {8, 32, 3, 12}, (type(example), rows)  # T = 8 and 3 rows per sample
        assert_close(dep(src, tgt), expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"^example_input: the model raised ValueError on it "
                                         r"\(You must specify tgt\).*decoder_input_ids") as info:
        sparsevd.deploy(model, src)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(TypeError, match="^example_input: expected a Tensor, a tuple .* got int"):
        sparsevd.deploy(model, 3, cost_model="csr")


def test_planner_keeps_dense_where_csr_is_not_smaller(monkeypatch):
    """fp16 at density 0.6: CSR (4 bytes per weight) would outgrow the dense weight (2 bytes per
    weight): dense, and nothing is timed."""
    from sparsevd import planner

    monkeypatch.setattr(planner, "_measure", lambda *a, **k: pytest.fail("timed a layer"))
    monkeypatch.setattr(planner, "CSR_MAX_DENSITY", 1.0)
    w = (torch.randn(128, 128) * (torch.rand(128, 128) < 0.6)).half()
    layer = SparseLinear.from_dense(w)
    assert planner.csr_bytes(layer) > planner.dense_weight_bytes(layer)
    planner.plan_layer(layer, buckets=(1, 16))
    assert layer.plan == ((None, "masked"),) and layer.storage == "dense"


def test_load_version_2_files(tmp_path):
    """Files of format version 2 (int16 columns, CSR beside a masked plan) still load: the layer
    takes its plan's storage, the outputs are the saved model's."""
    from safetensors.torch import save_file

    from sparsevd._files import digest
    from sparsevd.io import FORMAT

    torch.manual_seed(12)
    w = torch.randn(12, 40) * (torch.rand(12, 40) < 0.4)
    b = torch.randn(12)
    crow, col, val = sparsevd.nn.sparse.to_csr(w, torch.int16)
    tensors = {"0.crow_indices": crow, "0.col_indices": col, "0.values": val, "0.bias": b}
    spec = {"type": "Sequential", "children": [["0", {
        "type": "SparseLinear", "dense_shape": [12, 40], "num_weights": 480, "bias": True,
        "in_features": 40, "out_features": 12, "plan": [[1, "csr"], [None, "masked"]]}],
        ["1", {"type": "ReLU", "args": {"inplace": False}}]]}
    for plan, storage in (([[1, "csr"], [None, "masked"]], "csr"), ([[None, "masked"]], "dense")):
        spec["children"][0][1]["plan"] = plan
        config = json.dumps(spec)
        path = tmp_path / f"v2-{storage}.safetensors"
        save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": "2", "config": config,
                                                "sha256": digest(tensors, FORMAT, "2", config)})
        loaded = sparsevd.load(path)
        assert loaded[0].storage == storage
        x = torch.randn(5, 40)
        with torch.no_grad():
            assert_close(loaded(x), torch.relu(x @ w.T + b), RTOL, ATOL, name=storage)
            assert_close(loaded(x[:1]), torch.relu(x[:1] @ w.T + b), RTOL, ATOL, name=storage)


# ----------------------------------------------------------------------------- bad inputs
def test_deployed_layers_reject_bad_inputs(lenet300, lenet5):
    dep = sparsevd.deploy(lenet300, cost_model="csr")
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 784\)"):
        dep[1](torch.randn(2, 700))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        dep[1](torch.randn(2, 784, dtype=torch.float64))
    dep5 = sparsevd.deploy(lenet5, cost_model="csr")
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 1, H, W\)"):
        dep5[0](torch.randn(2, 3, 28, 28))
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        sparsevd.deploy("lenet")
    with pytest.raises(ValueError, match="cost_model"):
        sparsevd.deploy(LinearSVDO(3, 2), cost_model="fastest")


def test_sparse_layer_construction_errors():
    crow = torch.tensor([0, 1, 2], dtype=torch.int32)
    col = torch.tensor([0, 3], dtype=torch.int16)
    with pytest.raises(ValueError, match="crow_indices: expected out_features \\+ 1 = 4"):
        SparseLinear(4, 3, crow, col, torch.ones(2))
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, in_features=3\)"):
        SparseLinear(3, 2, crow, col, torch.ones(2))
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32"):
        SparseLinear(4, 2, crow, col, torch.ones(2), torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------------------ save/load
def _mixed_plans(dep):
    """Plans that exercise every mode at the batch sizes of the round-trip test."""
    for m in dep.modules():
        if isinstance(m, SparseLinear):
            m.set_plan([(1, "csr"), (8, "dense"), (None, "masked")])
        elif isinstance(m, SparseConv2d):
            m.set_plan([(1, "csr"), (None, "dense")])
    return dep


@pytest.mark.parametrize("which", ["lenet300", "lenet5"])
def test_save_load_bit_exact(which, request, tmp_path):
    model = request.getfixturevalue(which)
    dep = _mixed_plans(sparsevd.deploy(model, cost_model="csr"))
    path = sparsevd.save(dep, tmp_path / "m.safetensors")
    loaded = sparsevd.load(path)
    assert str(loaded) == str(dep)
    for b in (1, 7, 64):
        x = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded(x), dep(x)), f"batch {b}"
    for (n1, t1), (n2, t2) in zip(dep.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_save_load_other_modules(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True),
        Conv2dSVDO(3, 4, 3, padding=1), nn.GELU(approximate="tanh"), nn.Flatten(),
        LinearSVDO(4 * 25, 6), nn.Softplus(beta=2.0), nn.Linear(6, 3), nn.LogSoftmax(dim=-1),
    ).eval()
    dep = sparsevd.deploy(model, cost_model="csr")
    loaded = sparsevd.load(sparsevd.save(dep, tmp_path / "m.safetensors"))
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), dep(x))
        assert_close(dep(x), model(x), RTOL, ATOL)


def test_save_training_layers_and_models_that_are_not_trees(tmp_path):
    model = prune(LeNet300().eval(), 0.5)  # sparse-VD layers: a tree, log σ² and all
    loaded = sparsevd.load(sparsevd.save(model, tmp_path / "a.safetensors"))
    assert type(loaded[1]) is LinearSVDO and loaded[1].threshold == model[1].threshold
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    dep = sparsevd.deploy(prune(Custom().eval(), 0.5), cost_model="csr")
    path = sparsevd.save(dep, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"a test_deploy\.Custom, is not a tree.*model=\.\.\."):
        sparsevd.load(path)
    into = sparsevd.load(path, model=Custom())  # the user's constructor builds the architecture
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(into(x), dep(x))


@pytest.fixture
def saved(lenet300, tmp_path):
    return sparsevd.save(sparsevd.deploy(lenet300, cost_model="csr"), tmp_path / "m.safetensors")


def test_load_corrupted_data(saved):
    raw = bytearray(saved.read_bytes())
    raw[-5] ^= 0xFF  # a bit flip inside the tensor data
    saved.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted file: the checksum"):
        sparsevd.load(saved)


def test_load_truncated(saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupted or not a safetensors file"):
        sparsevd.load(saved)


def test_load_garbage_and_missing(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ValueError, match="corrupted or not a safetensors file"):
        sparsevd.load(p)
    with pytest.raises(FileNotFoundError):
        sparsevd.load(tmp_path / "none.safetensors")


def test_load_foreign_files(tmp_path, lenet300):
    from safetensors.torch import save_file

    from sparsevd.checkpoint import save_checkpoint

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(ValueError, match="not a sparsevd deployed model"):
        sparsevd.load(p)
    ck = save_checkpoint(lenet300, tmp_path / "ck", {"model": "lenet300", "svd": True, "threshold": 3.0})
    with pytest.raises(ValueError, match="not a sparsevd deployed model.*load_checkpoint"):
        sparsevd.load(ck)


def test_load_bad_config(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparsevd._files import digest
    from sparsevd.io import FORMAT, FORMAT_VERSION

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["config"])
    spec["tree"]["children"][1][1]["type"] = "FancyLinear"

    def signed(config):  # a file whose checksum is consistent (a newer writer, a buggy one)
        return dict(meta, config=config, sha256=digest(tensors, FORMAT, str(FORMAT_VERSION), config))

    save_file(tensors, str(saved), metadata=dict(meta, config=json.dumps(spec)))
    with pytest.raises(ValueError, match="corrupted file: the checksum"):  # an edit is caught
        sparsevd.load(saved)
    save_file(tensors, str(saved), metadata=signed(json.dumps(spec)))
    with pytest.raises(ValueError, match="unknown module type 'FancyLinear'"):
        sparsevd.load(saved)
    save_file(tensors, str(saved), metadata=dict(meta, format_version="99"))
    with pytest.raises(ValueError, match="format version 99 is newer"):
        sparsevd.load(saved)
    save_file(tensors, str(saved), metadata=signed("{not json"))
    with pytest.raises(ValueError, match="corrupted config"):
        sparsevd.load(saved)


# ------------------------------------------------------------------------------------ CLI
def test_cli_deploy(lenet300, tmp_path, capsys):
    from sparsevd.checkpoint import save_checkpoint
    from sparsevd.cli.deploy import main

    ck = tmp_path / "run"
    save_checkpoint(lenet300, ck, {"model": "lenet300", "svd": True, "threshold": 3.0})
    out = tmp_path / "deployed.safetensors"
    rc = main([str(ck), "--out", str(out), "--cost-model", "rule", "--min-time", "0.02"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "dense size : 1066440 bytes" in text  # (266200 weights + 410 biases) x 4 bytes
    assert "sparse size:" in text and "smaller" in text
    lines = text.splitlines()
    header = next(i for i, l in enumerate(lines) if "deployed ms" in l)
    rows = [l.split() for l in lines[header + 1:]]
    assert [r[0] for r in rows] == ["1", "64"] and all(r[3].endswith("x") for r in rows)
    loaded = sparsevd.load(out)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close(loaded(x), lenet300(x), RTOL, ATOL)


def test_cli_deploy_errors(tmp_path, capsys):
    from sparsevd.checkpoint import save_checkpoint
    from sparsevd.cli.deploy import main

    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o.safetensors")]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
    save_checkpoint(LeNet300(svd=False), tmp_path / "dense", {"model": "lenet300", "svd": False,
                                                             "threshold": 3.0})
    assert main([str(tmp_path / "dense"), "--out", str(tmp_path / "o.safetensors")]) == 1
    assert "no sparse-VD layers" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["x", "--out", "y", "--batch", "0"]) == 2


def test_cli_wiring(lenet300, tmp_path, capsys):
    """`sparsevd deploy ...` (sparsevd.cli.main) reaches sparsevd.cli.deploy.main."""
    from sparsevd.checkpoint import save_checkpoint
    from sparsevd.cli import main

    ck = tmp_path / "run"
    save_checkpoint(lenet300, ck, {"model": "lenet300", "svd": True, "threshold": 3.0})
    out = tmp_path / "d.safetensors"
    assert main(["deploy", str(ck), "--out", str(out), "--cost-model", "csr", "--min-time", "0.01",
                 "--batch", "2"]) == 0
    assert Path(out).is_file() and "deployed ms" in capsys.readouterr().out


def test_deployed_model_copies_pickles_and_casts(lenet300, tmp_path):
    import copy

    dep = _mixed_plans(sparsevd.deploy(lenet300, cost_model="csr"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = dep(x)
        assert torch.equal(copy.deepcopy(dep)(x), y)
        torch.save(dep, tmp_path / "m.pt")
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), y)
        d64 = copy.deepcopy(dep).double()
        assert d64[1].values.dtype == torch.float64 and d64[1].col_indices.dtype == torch.uint16
        assert_close(d64(x.double()), y, RTOL, ATOL)
