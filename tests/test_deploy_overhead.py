"""Deployed-model overhead (issue 11, item 2): a transformer-shaped model deploys with the eval
model's outputs at every sparsity and with 3-D inputs; at low sparsity the plan is the dense
product and nothing else; the forward of a one-mode dense plan dispatches exactly the ops of
F.linear / F.conv2d (no scans, no host syncs); the cost model times nothing that cannot win and
shares measurements between layers of the same shape. No timing assertions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import sparsevd
from sparsevd import planner
from sparsevd.compare import dense_twin
from sparsevd.planner import plan_layer
from sparsevd.models import TransformerEncoderLike
from sparsevd.nn import LinearSVDO, SparseConv2d, SparseLinear

DEAD = 20.0  # log σ² that drops a weight whatever θ
KEEP = -30.0  # log σ² that keeps every nonzero θ (log α ≤ -30 + 18.5 < 3)


class OpLog(TorchDispatchMode):
    """The aten ops dispatched inside the context, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_of(fn, *args):
    with torch.no_grad(), OpLog() as log:
        fn(*args)
    return log.ops


@torch.no_grad()
def sparse_transformer(sparsity, hidden=64, layers=2, heads=4, **kw):
    """A TransformerEncoderLike with LinearSVDO layers, a random ``sparsity`` of every layer's
    weights dropped (log σ² = 20), the rest kept (log σ² = -30), in eval mode."""
    model = TransformerEncoderLike(hidden=hidden, layers=layers, heads=heads, svd=True, **kw)
    for m in model.modules():
        if isinstance(m, LinearSVDO):
            m.log_sigma2.fill_(KEEP)
            m.log_sigma2[torch.rand(m.log_sigma2.shape) < sparsity] = DEAD
    return model.eval()


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.98])
def test_deployed_transformer_matches_the_eval_model(sparsity):
    model = sparse_transformer(sparsity)
    dep = sparsevd.deploy(model, buckets=(1, 16, 64))
    assert sum(isinstance(m, SparseLinear) for m in dep.modules()) == 13
    for b, t in ((1, 16), (4, 7), (32, 16)):
        x = torch.randn(b, t, 64)
        with torch.no_grad():
            assert_close(dep(x), model(x), rtol=1e-4, atol=1e-5, name=f"B={b}, T={t}")


@pytest.mark.parametrize("mode", ["csr", "dense", "masked"])
def test_every_mode_on_3d_inputs(mode):
    model = sparse_transformer(0.9)
    dep = sparsevd.deploy(model, cost_model=mode)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert_close(dep(x), model(x), rtol=1e-4, atol=1e-5, name=mode)
        blk = dep.blocks[0]
        y = torch.randn(2, 3, 5, 64)  # any leading dimensions
        assert_close(blk.q(y), y @ blk.q.to_dense().T + blk.q.bias, 1e-5, 1e-5, name="4-D input")


def test_low_sparsity_plan_is_the_dense_product_and_nothing_else(monkeypatch):
    """0 %: every layer's plan is the one F.linear (masked = the full weight, no gather, no
    masking work), chosen without timing; the deployed model dispatches the dense twin's ops."""
    monkeypatch.setattr(planner, "_measure", lambda *a, **k: pytest.fail("timed a layer"))
    model = sparse_transformer(0.0)
    dep = sparsevd.deploy(model)
    layers = [m for m in dep.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.plan == ((None, "masked"),) for m in layers)
    twin = dense_twin(model)
    for m, d in zip(layers, [m for m in twin.modules() if isinstance(m, torch.nn.Linear)]):
        assert torch.equal(m._fast[0], d.weight) and torch.equal(m._fast[1], d.bias)
    x = torch.randn(1, 16, 64)
    assert ops_of(dep, x) == ops_of(twin, x)
    with torch.no_grad():
        assert_close(dep(x), twin(x), rtol=1e-6, atol=1e-6, name="vs the dense twin")


@pytest.mark.parametrize("shape", [(384,), (1, 16, 384), (4, 2, 3, 384)])
@pytest.mark.parametrize("mode", ["masked", "dense"])
def test_dense_plan_forward_dispatches_only_the_linear(shape, mode):
    w = torch.randn(96, 384) * (torch.rand(96, 384) < 0.7)
    w[:, :] += (w == 0).all(0) * 1.0  # every column used: "dense" has nothing to gather
    b = torch.randn(96)
    layer = SparseLinear.from_dense(w, b, plan=mode)
    x = torch.randn(shape)
    assert ops_of(layer, x) == ops_of(F.linear, x, w, b)
    with torch.no_grad():
        assert_close(layer(x), F.linear(x, w, b), 1e-5, 1e-5)
    nobias = SparseLinear.from_dense(w, plan=mode)
    assert ops_of(nobias, x) == ops_of(F.linear, x, w)


@pytest.mark.parametrize("unbatched", [False, True])
def test_dense_conv_plan_forward_dispatches_only_the_conv(unbatched):
    w = torch.randn(8, 3, 3, 3) * (torch.rand(8, 3, 3, 3) < 0.5)
    b = torch.randn(8)
    layer = SparseConv2d.from_dense(w, b, stride=2, padding=1, plan="dense")
    x = torch.randn(3, 9, 9) if unbatched else torch.randn(2, 3, 9, 9)
    assert ops_of(layer, x) == ops_of(F.conv2d, x, w, b, 2, 1)
    with torch.no_grad():
        assert_close(layer(x), F.conv2d(x, w, b, 2, 1), 1e-5, 1e-5)


def test_fast_path_still_names_bad_inputs():
    layer = SparseLinear.from_dense(torch.randn(6, 5), torch.randn(6), plan="masked")
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 5\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected a tensor with data"):
        layer(torch.randn(2, 5, device="meta"))
    conv = SparseConv2d.from_dense(torch.randn(4, 2, 3, 3), plan="dense")
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 2, H, W\)"):
        conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="x: expected dtype"):
        conv(torch.randn(1, 2, 8, 8, dtype=torch.float64))


def test_fast_path_follows_edits_and_reassignment():
    w = torch.randn(6, 5)
    layer = SparseLinear.from_dense(w, torch.zeros(6), plan="masked")
    x = torch.randn(3, 5)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: version counter (the masked plan stores the dense weight)
        assert_close(layer(x), x @ (2 * w).T, 1e-5, 1e-5, name="values edited")
        layer.bias = torch.ones(6)  # reassigned buffer
        assert_close(layer(x), x @ (2 * w).T + 1, 1e-5, 1e-5, name="bias reassigned")
        layer.set_plan([(1, "csr"), (None, "masked")])  # two modes: the general path
        assert layer._fast is None
        assert_close(layer(x), x @ (2 * w).T + 1, 1e-5, 1e-5, name="two modes")


def test_cost_model_skips_what_cannot_win_and_shares_measurements(monkeypatch):
    calls = []
    real = planner._measure

    def counting(fns, device, **kw):
        calls.append(sorted(fns))
        return real(fns, device, **kw)

    monkeypatch.setattr(planner, "_measure", counting)
    dense = SparseLinear.from_dense(torch.randn(64, 64) * (torch.rand(64, 64) < 0.6))
    plan_layer(dense, buckets=(1, 16))  # density 0.6 > 0.5, every column used: nothing to time
    assert dense.plan == ((None, "masked"),) and not calls
    w = torch.randn(256, 256) * (torch.rand(256, 256) < 0.05)
    a = SparseLinear.from_dense(w)
    b = SparseLinear.from_dense(w[torch.randperm(256)])  # another layer, same sizes and density
    cache = {}
    plan_layer(a, buckets=(1, 16), cache=cache)
    n = len(calls)
    assert 1 <= n <= 2 and all("masked" in c and "csr" in c for c in calls)  # vs the dense product
    plan_layer(b, buckets=(1, 16), cache=cache)
    assert len(calls) == n and b.plan == a.plan  # the second layer reused the measurements
    for mode in {m for _, m in a.plan}:
        assert mode in ("csr", "dense", "masked")


def test_full_size_transformer_deploys(monkeypatch):
    """The issue's model: 6 layers, hidden 384, 37 linear layers, 23 % sparsity, (1, 16, 384)."""
    model = sparse_transformer(0.23, hidden=384, layers=6, heads=6)
    assert sum(isinstance(m, LinearSVDO) for m in model.modules()) == 37
    dep = sparsevd.deploy(model)
    layers = [m for m in dep.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 37 and all(m.plan == ((None, "masked"),) for m in layers)
    x = torch.randn(1, 16, 384)
    with torch.no_grad():
        assert_close(dep(x), model(x), rtol=1e-4, atol=1e-5, name="deployed transformer")


def test_transformer_model_shapes_and_errors():
    m = TransformerEncoderLike(svd=False)
    assert sum(isinstance(l, torch.nn.Linear) for l in m.modules()) == 37
    assert sum(l.weight.numel() for l in m.modules() if isinstance(l, torch.nn.Linear)) == 10_620_672
    small = TransformerEncoderLike(hidden=16, layers=1, heads=2, mlp=2, num_classes=None)
    assert small(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    tok = TransformerEncoderLike(vocab_size=11, hidden=16, layers=1, heads=2, num_classes=3, max_len=8)
    assert tok(torch.randint(0, 11, (2, 8))).shape == (2, 3)
    with pytest.raises(ValueError, match="heads: hidden=16 must be divisible by heads=3"):
        TransformerEncoderLike(hidden=16, heads=3)
    with pytest.raises(ValueError, match="hidden: expected a positive int"):
        TransformerEncoderLike(hidden=0)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 16\)"):
        small(torch.randn(2, 16))
    with pytest.raises(ValueError, match="x: sequence length 9 exceeds max_len=8"):
        tok(torch.randint(0, 11, (1, 9)))
