"""sparsevd.loss (SGVLB, β warm-up, kl_divergence) and sparsevd.convert (convert, report)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

import sparsevd
from sparsevd.ops import weights as W
from sparsevd.ops.kl import naive_kl_sparse_vd
from sparsevd.convert import LayerReport, Report
from sparsevd.loss import kl_divergence, svdo_layers
from sparsevd.nn import Conv1dSVDO, Conv2dSVDO, LinearSVDO

F64 = torch.float64



def svdo_model(dtype=torch.float32):
    """conv → relu → flatten → linear → relu → linear, all sparse VD, log σ² spread out."""
    model = nn.Sequential(
        Conv2dSVDO(2, 3, 3, dtype=dtype), nn.ReLU(), nn.Flatten(),
        LinearSVDO(3 * 3 * 3, 10, dtype=dtype), nn.ReLU(), LinearSVDO(10, 4, dtype=dtype),
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, (LinearSVDO, Conv2dSVDO)):
                m.log_sigma2.copy_(torch.log(m.weight ** 2) + torch.randn_like(m.weight) * 4)
    return model


def ce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy with the math module."""
    total = 0.0
    for row, t in zip(logits.double().tolist(), targets.tolist()):
        m = max(row)
        lse = m + math.log(math.fsum(math.exp(v - m) for v in row))
        total += lse - row[t]
    return total / len(targets)


def kl_by_hand(model) -> float:
    total = 0.0
    for m in model.modules():
        if isinstance(m, (LinearSVDO, Conv2dSVDO)):
            w, s = m.weight.detach().double(), m.log_sigma2.detach().double()
            total += naive_kl_sparse_vd([w], [s], False)[0].item()
    return total


# ------------------------------------------------------------------------------------- SGVLB
def test_sgvlb_value_by_hand_through_the_warmup():
    model = svdo_model()
    x = torch.randn(6, 2, 5, 5)
    y = torch.randint(0, 4, (6,))
    loss_fn = sparsevd.SGVLB(model, train_size=1000, kl_warmup_epochs=4)
    model.eval()
    logits = model(x)
    ce, kl = ce_by_hand(logits, y), kl_by_hand(model)
    assert kl > 1.0
    for epoch, beta in ((0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0), (7, 1.0)):
        loss_fn.epoch = epoch
        assert loss_fn.beta == pytest.approx(beta, abs=1e-12)
        loss = loss_fn(logits, y)
        assert loss.dim() == 0 and loss.dtype == torch.float32
        expected = 1000 * ce + beta * kl
        assert loss.item() == pytest.approx(expected, rel=1e-5), f"epoch {epoch}"


def test_sgvlb_gradients_reach_every_parameter():
    model = svdo_model()
    loss_fn = sparsevd.SGVLB(model, train_size=50, kl_warmup_epochs=0)
    loss_fn(model(torch.randn(3, 2, 5, 5)), torch.randint(0, 4, (3,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), name
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}


def test_beta_schedule():
    m = nn.Linear(2, 2)
    s = sparsevd.SGVLB(m, 10, kl_warmup_epochs=5)
    betas = []
    for _ in range(8):
        betas.append(s.beta)
        s.step_epoch()
    assert betas == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0], abs=1e-12)
    s.epoch = 2.5  # fractional epochs interpolate
    assert s.beta == pytest.approx(0.5)
    assert sparsevd.SGVLB(m, 10, kl_warmup_epochs=0).beta == 1.0
    s0 = sparsevd.SGVLB(m, 10, kl_warmup_epochs=0)
    s0.step_epoch()
    assert s0.beta == 1.0
    sb = sparsevd.SGVLB(m, 10, kl_warmup_epochs=4, beta_start=0.2)
    assert sb.beta == pytest.approx(0.2)
    sb.epoch = 2
    assert sb.beta == pytest.approx(0.6)
    sb.epoch = 10
    assert sb.beta == 1.0
    sf = sparsevd.SGVLB(m, 10, kl_warmup_epochs=2.5)
    sf.epoch = 1
    assert sf.beta == pytest.approx(0.4)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(train_size=0), ValueError, "train_size"),
    (dict(train_size=-10), ValueError, "train_size"),
    (dict(train_size=2.5), ValueError, "train_size"),
    (dict(train_size=float("nan")), ValueError, "train_size"),
    (dict(train_size=None), TypeError, "train_size"),
    (dict(train_size="60000"), TypeError, "train_size"),
    (dict(train_size=True), TypeError, "train_size"),
    (dict(train_size=10, kl_warmup_epochs=-1), ValueError, "kl_warmup_epochs"),
    (dict(train_size=10, kl_warmup_epochs=float("nan")), ValueError, "kl_warmup_epochs"),
    (dict(train_size=10, kl_warmup_epochs=None), TypeError, "kl_warmup_epochs"),
    (dict(train_size=10, beta_start=1.5), ValueError, "beta_start"),
    (dict(train_size=10, beta_start=float("nan")), ValueError, "beta_start"),
])
def test_sgvlb_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=rf"^{match}: "):
        sparsevd.SGVLB(nn.Linear(2, 2), **kw)


def test_sgvlb_accepts_integral_train_sizes():
    m = nn.Linear(2, 2)
    assert sparsevd.SGVLB(m, 60000.0).train_size == 60000
    assert sparsevd.SGVLB(m, torch.tensor(7)).train_size == 7


def test_kl_divergence_equals_reference_value_and_gradients():
    model = svdo_model(F64)
    kl = kl_divergence(model)
    assert kl.dtype == F64
    params = [p for m in model.modules() if isinstance(m, (LinearSVDO, Conv2dSVDO))
              for p in (m.weight, m.log_sigma2)]
    grads = torch.autograd.grad(kl, params)
    kl_ref = naive_kl_sparse_vd(params[0::2], params[1::2], False)[0]
    grads_ref = torch.autograd.grad(kl_ref, params)
    assert_close(kl, kl_ref, rtol=1e-12, atol=1e-12, name="kl")
    for i, (a, e) in enumerate(zip(grads, grads_ref)):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name=f"grad {i}")
    # fp32 model against the fp64 reference.
    model32 = copy.deepcopy(model).float()
    assert_close(kl_divergence(model32), kl_ref, rtol=1e-5, atol=1e-5, name="kl fp32")
    assert [n for n, _ in svdo_layers(model)] == ["0", "3", "5"]


def test_kl_divergence_without_sparse_layers():
    assert kl_divergence(nn.Sequential(nn.Linear(3, 2), nn.ReLU())).item() == 0.0
    assert kl_divergence(nn.ReLU()).item() == 0.0


# ----------------------------------------------------------------------------------- convert
def dense_mlp():
    """A small MLP trained a few SGD steps on random data (weights no longer at their init)."""
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                          nn.Linear(16, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _tiny(w: torch.Tensor) -> torch.Tensor:
    """Weights with log α ≥ 3 at log σ² = −10: θ² + 1e-8 ≤ e⁻¹³."""
    return (w.double() ** 2 + 1e-8) <= math.exp(-13.0)


def test_convert_keeps_the_function_at_init():
    dense = dense_mlp()
    with torch.no_grad():  # tiny weights, which log σ² = −10 alone would drop at once
        dense[0].weight[0, :4] = torch.tensor([1e-4, -5e-4, 0.0, 1e-3])
    model = sparsevd.convert(copy.deepcopy(dense))
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["LinearSVDO", "ReLU", "LinearSVDO", "Tanh", "LinearSVDO"]
    for d, m in zip(dense, model):
        if isinstance(m, LinearSVDO):
            assert torch.equal(m.weight, d.weight) and torch.equal(m.bias, d.bias)
            tiny = _tiny(m.weight)
            assert (m.log_sigma2[~tiny] == -10.0).all() and m.threshold == 3.0
            # the weights −10 would drop at once start just under the threshold instead
            la = W.log_alpha(m.weight.double(), m.log_sigma2.double())
            assert torch.allclose(la[tiny], torch.full_like(la[tiny], 2.0), atol=1e-4)
            assert (la < 3.0).all()
    x = torch.randn(50, 20)

    # Train mode: every layer is its dense twin plus N(0, (x²)(σ²)ᵀ + 1e-8) noise, σ² ≤ e⁻¹⁰.
    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append((mod, inp[0], out)))
             for m in model if isinstance(m, LinearSVDO)]
    model.train()
    y_train = model(x)
    for h in hooks:
        h.remove()
    z = []
    for mod, inp, out in captured:
        mu = F.linear(inp.double(), mod.weight.double(), mod.bias.double())
        s2 = F.linear(inp.double() ** 2, mod.log_sigma2.double().exp())
        z.append(((out.double() - mu) / torch.sqrt(s2 + 1e-8)).reshape(-1))
    z = torch.cat(z)
    assert z.abs().max() < 6.5  # 2650 standard normals
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    assert y_train.shape == (50, 5) and torch.isfinite(y_train).all()

    # Eval mode: exactly the dense network, its tiny weights included (none dropped at init).
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))
    assert sparsevd.report(model).nonzero == sparsevd.report(dense).params  # nothing dropped


def test_convert_train_clip():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(1, 2, 3))
    assert not any(m.train_clip for _, m in svdo_layers(sparsevd.convert(copy.deepcopy(model))))
    clipped = sparsevd.convert(model, train_clip=True, threshold=2.0)
    assert [m.train_clip for _, m in svdo_layers(clipped)] == [True, True]
    assert all(m.threshold == 2.0 for _, m in svdo_layers(clipped))
    with pytest.raises(TypeError, match="train_clip"):
        sparsevd.convert(nn.Linear(2, 2), train_clip="yes")


def test_converted_model_loads_dense_state_dict():
    dense = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    model = sparsevd.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)))
    res = model.load_state_dict(dense.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["0.log_sigma2", "2.log_sigma2"]
    assert res.unexpected_keys == []


class _MyLinear(nn.Linear):
    pass


def test_convert_include_filter_and_kinds():
    def make():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, stride=2, dilation=1, groups=1, bias=False),
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)),
            _MyLinear(4, 2),
            nn.Conv1d(2, 2, 1),
            nn.Conv3d(2, 2, 1),
        )

    model = sparsevd.convert(make())
    assert isinstance(model[0], Conv2dSVDO) and model[0].bias is None
    assert (model[0].stride, model[0].padding) == ((2, 2), (1, 1))
    assert isinstance(model[1][0], LinearSVDO) and isinstance(model[1][2], LinearSVDO)
    assert type(model[2]) is _MyLinear and type(model[4]) is nn.Conv3d  # left alone
    assert isinstance(model[3], Conv1dSVDO)
    dense = {e.name: e.reason for e in sparsevd.plan_conversion(make()).dense()}
    assert "subclass of nn.Linear" in dense["2"] and "no sparse-VD twin" in dense["4"]

    model = sparsevd.convert(make(), include=["1.2", "0"])
    assert isinstance(model[0], Conv2dSVDO)
    assert type(model[1][0]) is nn.Linear and isinstance(model[1][2], LinearSVDO)

    model = sparsevd.convert(make(), include=lambda name: name.startswith("1."), threshold=1.5)
    assert type(model[0]) is nn.Conv2d
    assert isinstance(model[1][0], LinearSVDO) and model[1][0].threshold == 1.5

    assert isinstance(sparsevd.convert(nn.Linear(3, 2)), LinearSVDO)
    assert isinstance(sparsevd.convert(nn.Conv2d(3, 2, 1)), Conv2dSVDO)


class RMSNormLike(nn.Module):
    """A model's own RMSNorm class (not nn.RMSNorm)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


def test_convert_reaches_layers_inside_modules_with_parameters():
    """A module holding parameters of its own (position embeddings beside a projection) is
    listed dense with them named, and the layers inside it convert; a weight-normed layer and
    a normalization of the model's own class say why they stay dense."""
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4))
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) + self.pos

    from torch.nn.utils import parametrizations

    normed = parametrizations.weight_norm(nn.Conv1d(4, 4, 3))
    report = {e.name: e for e in sparsevd.plan_conversion(nn.Sequential(normed, RMSNormLike()))}
    assert set(report) == {"0", "1"}  # the parametrizations inside the conv are not rows
    assert "reparametrized" in report["0"].reason and "remove_parametrizations" in report["0"].reason
    assert report["1"].reason.startswith("a normalization")
    model = nn.Sequential(Embed(), nn.Linear(4, 2))
    report = {e.name: e for e in sparsevd.plan_conversion(model)}
    assert report["0"].action == "dense" and "(pos)" in report["0"].reason
    assert report["0.proj"].action == "convert"
    x = torch.randn(3, 4)
    expected = model(x)
    sparsevd.convert(model).eval()
    assert isinstance(model[0].proj, LinearSVDO)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_convert_says_when_nothing_was_converted():
    """A typo in include is an error; a model left without a sparse-VD layer (everything
    excluded, a model quantized by torch.ao.quantization, no layer at all) is a warning that
    names why; a model already converted, or partly included, is neither."""
    def make():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    with pytest.raises(ValueError, match=r"^include: 'blocks\.\*' matches none .* e\.g\. '0', '2'"):
        sparsevd.convert(make(), include="blocks.*")
    with pytest.warns(UserWarning, match=r"no layer .* \(0: matched by exclude; 2: matched by exclude\)"):
        sparsevd.convert(make(), exclude="*")
    with pytest.warns(UserWarning, match=r"0: not matched by include"):
        sparsevd.convert(make(), include=lambda name: False)
    with pytest.warns(UserWarning, match=r"no nn\.Linear, nn\.Conv2d"):
        sparsevd.convert(nn.Sequential(nn.ReLU()))

    quantized = make()
    quantized[0] = torch.ao.nn.quantized.dynamic.Linear(4, 8)
    quantized[2] = torch.ao.nn.quantized.dynamic.Linear(8, 2)
    report = {e.name: e.reason for e in sparsevd.plan_conversion(quantized).dense()}
    assert set(report) == {"0", "2"} and "quantized module" in report["0"]
    with pytest.warns(UserWarning, match=r"0: a quantized module .*convert the float model"):
        sparsevd.convert(quantized)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = sparsevd.convert(make(), include=["2", "encoder.*"])
        assert isinstance(converted[2], LinearSVDO) and type(converted[0]) is nn.Linear
        sparsevd.convert(converted, include="blocks.*")  # already sparse VD: nothing to say

def test_convert_keeps_mode_dtype_and_rejects_unsupported_padding():
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    out = sparsevd.convert(model)
    assert out is model and not out[0].training and out[0].weight.dtype == F64
    assert out[0].log_sigma2.dtype == F64
    with pytest.raises(ValueError, match=r"^model: 0 uses padding_mode='reflect'"):
        sparsevd.convert(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("padding,kernel,dilation", [("same", 3, 1), ("same", (2, 4), (1, 2)),
                                                     ("valid", 3, 1)])
def test_convert_string_padding(padding, kernel, dilation):
    """nn.Conv2d with padding="same" / "valid" converts; the layer resolves it to per-side padding
    as torch does (even kernels: one more at the bottom / right), so the converted layer in eval
    mode computes what the dense one does on the kept weights."""
    dense = nn.Conv2d(2, 3, kernel, padding=padding, dilation=dilation).double()
    layer = sparsevd.convert(dense)
    assert isinstance(layer, Conv2dSVDO) and layer.padding == padding
    x = torch.randn(2, 2, 7, 8, dtype=F64)
    layer.eval()
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, dense.weight * layer.mask(), dense.bias,
                                              padding=padding, dilation=dilation)
        assert torch.allclose(layer(x), expected, atol=1e-12)
        if padding == "same":
            assert layer(x).shape[2:] == x.shape[2:]
    assert f"padding={padding}" in repr(layer)
    layer.train()
    assert layer(x).shape == expected.shape
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        sparsevd.convert(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")))


@pytest.mark.parametrize("kw", [dict(padding="same", dilation=2), dict(stride=2, groups=2, bias=False)])
def test_convert_conv1d_keeps_the_function(kw):
    """nn.Conv1d converts to Conv1dSVDO with its options; in eval mode at initialisation the
    converted layer computes what the dense one does (nothing dropped), and it trains."""
    dense = nn.Conv1d(4, 6, 4, **kw).double()
    layer = sparsevd.convert(copy.deepcopy(dense))
    assert isinstance(layer, Conv1dSVDO)
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == (
        dense.stride, dense.padding, dense.dilation, dense.groups)
    x = torch.randn(3, 4, 19, dtype=F64)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), dense(x), atol=1e-12)
    layer.train()
    (layer(x).square().mean() + layer.kl() * 1e-3).backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.log_sigma2.grad).all()
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        sparsevd.convert(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular")))


# ------------------------------------------------------------------------------------ report
class _Deployed(nn.Module):
    """Stands in for a deployed sparse layer (duck-typed by report)."""
    num_weights, num_nonzero, dense_shape = 50, 7, (5, 10)


def test_report_rows_and_totals():
    model = nn.Sequential(
        Conv2dSVDO(2, 4, 3),      # 72 weights
        nn.Flatten(),
        LinearSVDO(4, 10),        # 40 weights
        nn.Linear(10, 3),         # 30 weights, some exactly zero
        _Deployed(),
    )
    with torch.no_grad():
        model[0].log_sigma2[:3] = 30.0   # 54 weights at log α = 10: dropped
        model[0].log_sigma2[3:] = -20.0  # log α < −1.5 whatever θ: kept
        la = torch.full((10, 4), -5.0)
        la[0, :] = 4.0                   # 4 above the threshold 3
        la[1, 0] = 2.5                   # just below: kept
        model[2].log_sigma2.copy_(la + torch.log(model[2].weight ** 2 + 1e-8))
        model[3].weight[0] = 0.0         # 10 zeros in the dense layer
    rep = sparsevd.report(model)
    assert isinstance(rep, Report)
    rows = [(r.name, r.kind, r.shape, r.params, r.nonzero) for r in rep.layers]
    assert rows == [
        ("0", "Conv2dSVDO", (4, 2, 3, 3), 72, 18),
        ("2", "LinearSVDO", (10, 4), 40, 36),
        ("3", "Linear", (3, 10), 30, 20),
        ("4", "_Deployed", (5, 10), 50, 7),
    ]
    assert rep.params == 192 and rep.nonzero == 81
    assert rep.sparsity == pytest.approx(100 * (1 - 81 / 192))
    assert rep.compression == pytest.approx(192 / 81)
    assert rep.layers[0].sparsity == pytest.approx(75.0)
    assert rep.layers[0].compression == pytest.approx(4.0)
    d = rep.as_dict()
    assert d["params"] == 192 and d["nonzero"] == 81 and len(d["layers"]) == 4
    assert d["layers"][1] == {"name": "2", "kind": "LinearSVDO", "shape": [10, 4], "params": 40,
                              "nonzero": 36, "sparsity": pytest.approx(10.0),
                              "compression": pytest.approx(40 / 36)}
    # A threshold passed to report overrides the layers' own.
    rep2 = sparsevd.report(model, threshold=2.0)
    assert [r.nonzero for r in rep2.layers] == [18, 35, 20, 7]


def test_report_table_and_edge_cases():
    model = nn.Sequential()
    model.add_module("encoder", LinearSVDO(6, 5))
    model.add_module("head", Conv2dSVDO(1, 2, 1))
    with torch.no_grad():
        model.head.log_sigma2.fill_(40.0)  # everything dropped
    rep = sparsevd.report(model)
    assert rep.layers[1].nonzero == 0 and rep.layers[1].compression == float("inf")
    assert rep.layers[1].sparsity == 100.0
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "shape"]
    assert any(line.startswith("encoder") and "LinearSVDO" in line and "5x6" in line
               for line in lines)
    assert any(line.startswith("head") and "infx" in line for line in lines)
    assert lines[-1].startswith("total") and "32" in lines[-1]
    empty = sparsevd.report(nn.ReLU())
    assert empty.layers == [] and empty.params == 0 and empty.sparsity == 0.0
    assert "total" in str(empty)
    assert LayerReport("x", "Linear", (0, 3), 0, 0).sparsity == 0.0
