"""sparsevd.nn: LinearSVDO, Conv2dSVDO and Conv1dSVDO as drop-in replacements of nn.Linear /
nn.Conv2d / nn.Conv1d
(state_dict, initialisation), their train/eval forwards, log α, KL, sparsity, bad input, empty
batches, and a short training run of a conv net."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

import sparsevd
import sparsevd.functional as SF
from sparsevd.ops import weights as W
from sparsevd.ops.kl import naive_kl_sparse_vd
from sparsevd.ops.lrt_linear import naive_lrt_linear
from sparsevd.nn import Conv1dSVDO, Conv2dSVDO, LinearSVDO



def set_log_alpha(layer, la: torch.Tensor) -> None:
    """Give ``layer`` the log α ``la`` (before the clamp) by setting its log σ²."""
    with torch.no_grad():
        w = layer.weight
        layer.log_sigma2.copy_(la + torch.log(w * w + 1e-8))


# ---------------------------------------------------------------------- drop-in replacement
@pytest.mark.parametrize("bias", [True, False])
def test_linear_state_dict_from_nn_linear(bias):
    dense = nn.Linear(7, 5, bias=bias)
    layer = LinearSVDO(7, 5, bias=bias)
    res = layer.load_state_dict(dense.state_dict(), strict=False)
    assert res.missing_keys == ["log_sigma2"]
    assert res.unexpected_keys == []
    assert torch.equal(layer.weight, dense.weight)
    assert (layer.bias is None) == (not bias)
    if bias:
        assert torch.equal(layer.bias, dense.bias)
    assert set(layer.state_dict()) == {"weight", "log_sigma2"} | ({"bias"} if bias else set())


@pytest.mark.parametrize("kw", [dict(),
                                dict(stride=2, padding=1, dilation=2, groups=2, bias=False)])
def test_conv_state_dict_from_nn_conv2d(kw):
    dense = nn.Conv2d(4, 6, (3, 2), **kw)
    layer = Conv2dSVDO(4, 6, (3, 2), **kw)
    res = layer.load_state_dict(dense.state_dict(), strict=False)
    assert res.missing_keys == ["log_sigma2"]
    assert res.unexpected_keys == []
    assert torch.equal(layer.weight, dense.weight)
    if dense.bias is not None:
        assert torch.equal(layer.bias, dense.bias)
    else:
        assert layer.bias is None


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1, dilation=2, groups=2, bias=False),
                                dict(padding="same")])
def test_conv1d_is_a_drop_in_nn_conv1d(kw):
    """Conv1dSVDO loads nn.Conv1d's state_dict (3-D weight), initialises as it does, and in eval
    mode (cached and uncached paths) equals F.conv1d with the masked weight, also after the
    parameters change in place, through load_state_dict and .to(); unbatched input works."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    dense = nn.Conv1d(4, 6, 3, **kw)
    layer = Conv1dSVDO(4, 6, 3, **kw)
    res = layer.load_state_dict(dense.state_dict(), strict=False)
    assert res.missing_keys == ["log_sigma2"] and res.unexpected_keys == []
    assert layer.weight.shape == dense.weight.shape == layer.log_sigma2.shape
    assert (layer.kernel_size, layer.stride, layer.dilation) == (dense.kernel_size, dense.stride,
                                                                 dense.dilation)
    assert layer.padding == dense.padding and layer.groups == dense.groups
    set_log_alpha(layer, torch.randn_like(layer.weight) * 3 + 2)
    layer.eval()
    x = torch.randn(3, 4, 13)

    def expected(inp):
        w = layer.weight * layer.mask().float()
        return F.conv1d(inp, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    with torch.no_grad():
        assert_close(layer(x), expected(x), rtol=1e-6, atol=1e-6, name="eval cached")
        layer.weight.mul_(-1.5)  # in place: the cache must notice
        assert_close(layer(x), expected(x), rtol=1e-6, atol=1e-6, name="after in-place edit")
        assert_close(layer(x[1]), expected(x[1:2])[0], rtol=1e-6, atol=1e-6, name="unbatched")
    assert_close(layer(x), expected(x), rtol=1e-6, atol=1e-6, name="eval uncached (grad mode)")
    other = Conv1dSVDO(4, 6, 3, **kw)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_close(layer(x), expected(x), rtol=1e-6, atol=1e-6, name="after load_state_dict")
        layer.double()
        assert layer(x.double()).dtype == torch.float64
    assert "Conv1dSVDO(4, 6, kernel_size=(3,)" in repr(layer)


def test_conv1d_constructor_and_input_errors():
    with pytest.raises(ValueError, match="^kernel_size"):
        Conv1dSVDO(2, 3, (3, 3))
    with pytest.raises(ValueError, match="^groups"):
        Conv1dSVDO(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="^padding"):
        Conv1dSVDO(2, 3, 3, padding="full")
    with pytest.raises(ValueError, match="^stride"):
        Conv1dSVDO(2, 3, 3, stride=2, padding="same")
    for train in (True, False):
        layer = Conv1dSVDO(2, 3, 3).train(train)
        with pytest.raises(ValueError, match=r"^x: expected shape \(N, in_channels, L\)"):
            layer(torch.randn(1, 2, 5, 5))
        with pytest.raises(ValueError, match=r"^x: expected shape \(N, in_channels=2"):
            layer(torch.randn(1, 3, 5))
        with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
            layer(torch.randn(1, 2, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"^x: the padded input is smaller"):
            layer(torch.randn(1, 2, 2))


def test_linear_init_matches_nn_linear():
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    dense = nn.Linear(300, 200)
    torch.manual_seed(seed)
    layer = LinearSVDO(300, 200)
    # Same RNG calls in the same order as nn.Linear: identical values.
    assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.bias, dense.bias)
    assert layer.weight.shape == (200, 300) and layer.log_sigma2.shape == (200, 300)
    assert layer.bias.shape == (200,)
    assert (layer.log_sigma2 == -10.0).all()
    _check_uniform(layer.weight, 1.0 / math.sqrt(300), "weight")
    _check_uniform(layer.bias, 1.0 / math.sqrt(300), "bias")
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "log_sigma2"]


def test_conv_init_matches_nn_conv2d():
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    dense = nn.Conv2d(16, 32, (3, 5), groups=2)
    torch.manual_seed(seed)
    layer = Conv2dSVDO(16, 32, (3, 5), groups=2)
    assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.bias, dense.bias)
    assert layer.weight.shape == (32, 8, 3, 5) == layer.log_sigma2.shape
    assert (layer.log_sigma2 == -10.0).all()
    fan_in = 8 * 3 * 5
    _check_uniform(layer.weight, 1.0 / math.sqrt(fan_in), "weight")
    _check_uniform(layer.bias, 1.0 / math.sqrt(fan_in), "bias")
    layer.reset_parameters()
    assert (layer.log_sigma2 == -10.0).all()
    _check_uniform(layer.weight, 1.0 / math.sqrt(fan_in), "weight after reset")


def _check_uniform(t: torch.Tensor, bound: float, name: str):
    """t ~ U(−bound, bound): inside the bounds, mean 0 and variance bound²/3 within 5 SE."""
    v = t.detach().double().reshape(-1)
    n = v.numel()
    assert v.abs().max() <= bound, name
    assert v.abs().max() > bound * (1 - 10.0 / n), f"{name}: does not fill its range"
    var = bound ** 2 / 3
    assert abs(v.mean().item()) < 5 * math.sqrt(var / n), f"{name}: mean"
    # Var of the sample variance of U(−b, b): (μ4 − σ⁴)/n with μ4 = b⁴/5.
    se_var = math.sqrt((bound ** 4 / 5 - var ** 2) / n)
    assert abs(v.var().item() - var) < 5 * se_var, f"{name}: var"


def test_constructor_errors():
    with pytest.raises(ValueError, match="groups"):
        Conv2dSVDO(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="groups"):
        Conv2dSVDO(4, 6, 3, groups=0)
    with pytest.raises(ValueError, match="threshold"):
        LinearSVDO(3, 2, threshold=float("nan"))
    with pytest.raises(ValueError, match="in_features"):
        LinearSVDO(-1, 2)
    with pytest.raises(ValueError, match="^padding: expected an int, a pair of ints, 'same' or 'valid'"):
        Conv2dSVDO(2, 2, 3, padding="full")
    with pytest.raises(ValueError, match="^stride: padding='same' needs stride 1"):
        Conv2dSVDO(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2dSVDO(2, 2, (3, 3, 3))


# --------------------------------------------------------------------------------- forwards
def test_linear_train_forward_is_the_lrt_with_a_drawn_seed():
    layer = LinearSVDO(9, 4)
    set_log_alpha(layer, torch.randn(4, 9) - 1)
    x = torch.randn(3, 9)
    s = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(s)
    y = layer(x)
    torch.manual_seed(s)
    seed = SF.draw_seed()
    expected = naive_lrt_linear(x.double(), layer.weight.double(), layer.log_sigma2.double(),
                                layer.bias.double(), seed)[0]
    assert_close(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,x_shape", [
    (lambda **kw: LinearSVDO(9, 4, **kw), (3, 9)),
    (lambda **kw: Conv2dSVDO(3, 4, 3, padding=1, **kw), (2, 3, 5, 5)),
    (lambda **kw: Conv1dSVDO(3, 4, 3, padding=1, **kw), (2, 3, 7)),
])
def test_train_clip_layers_clip_in_training_only(make, x_shape):
    """train_clip=True: the training forward is the LRT with clip_threshold = threshold (the
    dropped weights get no LRT gradient); eval mode is unchanged; the default does not clip."""
    layer = make(train_clip=True)
    assert layer.train_clip and "train_clip=True" in repr(layer)
    set_log_alpha(layer, torch.randn_like(layer.weight) * 3 + 2)
    m = layer.mask()
    assert 0 < int(m.sum()) < m.numel()
    x = torch.randn(x_shape)
    fn = {LinearSVDO: SF.lrt_linear, Conv2dSVDO: SF.lrt_conv2d, Conv1dSVDO: SF.lrt_conv1d}[type(layer)]
    conv = () if isinstance(layer, LinearSVDO) else (layer.stride, layer.padding)
    for clip in (True, False):
        layer.train_clip = clip
        torch.manual_seed(5)
        y = layer(x)
        y.square().sum().backward()
        torch.manual_seed(5)
        expected = fn(x, layer.weight, layer.log_sigma2, layer.bias, *conv,
                      clip_threshold=layer.threshold if clip else None)
        assert torch.equal(y, expected)
        if clip:
            assert torch.all(layer.weight.grad[~m] == 0) and torch.all(layer.log_sigma2.grad[~m] == 0)
        else:
            assert torch.all(layer.weight.grad[~m] != 0)
        layer.zero_grad()
    layer.eval()
    layer.train_clip = True
    with torch.no_grad():
        a = layer(x)
        layer.train_clip = False
        assert torch.equal(a, layer(x))
    with pytest.raises(TypeError, match="train_clip"):
        make(train_clip=1)


def test_linear_3d_input():
    layer = LinearSVDO(6, 5)
    x = torch.randn(2, 7, 6)
    assert layer(x).shape == (2, 7, 5)
    layer.eval()
    y = layer(x)
    w = W.masked_weight(layer.weight.double(), layer.log_sigma2.double(), 3.0)
    assert_close(y, F.linear(x.double(), w, layer.bias.double()), rtol=1e-5, atol=1e-6)


def test_init_drops_only_tiny_weights_at_eval():
    """log σ² = −10 at init: log α ≥ 3 exactly where θ² + 1e-8 ≤ e⁻¹³ (|θ| ≲ 1.5e-3), so the eval
    forward equals the dense layer up to the contribution of those tiny weights."""
    layer = LinearSVDO(40, 30)
    with torch.no_grad():
        tiny = torch.rand(30, 40) < 0.1
        layer.weight[tiny] = torch.empty(int(tiny.sum())).uniform_(-1.4e-3, 1.4e-3)
        rest = layer.weight[~tiny]
        layer.weight[~tiny] = torch.where(rest < 0, -1.0, 1.0) * rest.abs().clamp_min(1.6e-3)
    assert torch.equal(~layer.mask(), tiny)
    layer.eval()
    x = torch.randn(5, 40)
    y = layer(x)
    dense = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    bound = (x.double().abs() @ (layer.weight.double().abs() * tiny).t())
    assert ((y.double() - dense).abs() <= bound + 1e-5).all()
    kept = layer.weight.double() * ~tiny
    assert_close(y, F.linear(x.double(), kept, layer.bias.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,x_shape", [
    (lambda: LinearSVDO(8, 5), (4, 8)),
    (lambda: Conv2dSVDO(3, 4, 3, padding=1), (2, 3, 6, 6)),
])
def test_eval_deterministic_train_stochastic(make, x_shape):
    layer = make()
    with torch.no_grad():
        layer.log_sigma2.fill_(-2.0)
    x = torch.randn(x_shape)
    a, b = layer(x), layer(x)
    assert (a != b).float().mean() > 0.99
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)


def test_eval_forward_masks_weights_with_large_log_alpha():
    layer = LinearSVDO(10, 6)
    la = torch.randn(6, 10) * 5
    set_log_alpha(layer, la)
    layer.eval()
    x = torch.randn(4, 10)
    manual = layer.weight.detach().clone()
    manual[la >= 3.0] = 0.0
    assert_close(layer(x), F.linear(x.double(), manual.double(), layer.bias.double()),
                 rtol=1e-5, atol=1e-6)
    conv = Conv2dSVDO(2, 3, 3, stride=2, dilation=1, padding=2)
    cla = torch.randn(3, 2, 3, 3) * 5
    set_log_alpha(conv, cla)
    conv.eval()
    xc = torch.randn(2, 2, 7, 7)
    manual = conv.weight.detach().clone()
    manual[cla >= 3.0] = 0.0
    assert_close(conv(xc), F.conv2d(xc.double(), manual.double(), conv.bias.double(), 2, 2),
                 rtol=1e-5, atol=1e-6)


def test_log_alpha_kl_mask_sparsity_and_repr():
    layer = LinearSVDO(10, 8, threshold=3.0)
    la = torch.empty(8, 10).uniform_(-9, 9)
    la = torch.where((la - 3.0).abs() < 0.01, la + 0.1, la)  # fp32 and fp64 agree on the mask
    set_log_alpha(layer, la)
    expected_la = W.log_alpha(layer.weight.double(), layer.log_sigma2.double())
    assert_close(layer.log_alpha, expected_la, rtol=1e-5, atol=1e-5, name="log_alpha")
    assert_close(layer.kl(), naive_kl_sparse_vd([layer.weight.double()], [layer.log_sigma2.double()], False)[0],
                 rtol=1e-5, atol=1e-5, name="kl")
    kept = int((expected_la < 3.0).sum())
    assert torch.equal(layer.mask(), expected_la < 3.0)
    assert layer.num_weights == 80 and layer.num_nonzero == kept
    assert layer.sparsity == pytest.approx(1 - kept / 80)
    rep = repr(layer)
    assert f"sparsity={100 * (1 - kept / 80):.1f}%" in rep
    assert "in_features=10, out_features=8" in rep and "threshold=3.0" in rep
    conv = Conv2dSVDO(2, 4, 3, padding=1, groups=2)
    with torch.no_grad():
        conv.log_sigma2[:2] = 20.0  # log α clamps at 10: half the weights are dropped
        conv.log_sigma2[2:] = -20.0  # log α ≤ −20 − log(θ² + 1e-8) < −1.5: kept
    assert conv.num_nonzero == 18 and conv.sparsity == 0.5
    assert "sparsity=50.0%" in repr(conv) and "groups=2" in repr(conv)
    conv.log_sigma2.data.fill_(-20.0)
    assert "sparsity=0.0%" in repr(conv)


def test_kl_is_differentiable_and_pushes_log_sigma2_up():
    layer = LinearSVDO(5, 4)
    layer.kl().backward()
    assert layer.log_sigma2.grad.shape == (4, 5)
    assert (layer.log_sigma2.grad < 0).all()  # the KL falls as log σ² (and log α) grows
    assert layer.bias.grad is None


def test_double_precision_module():
    layer = LinearSVDO(4, 3, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and (layer.log_sigma2 == -10).all()
    y = layer(torch.randn(2, 4, dtype=torch.float64))
    assert y.dtype == torch.float64
    layer.float()
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
        layer(torch.randn(2, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("train", [True, False])
def test_linear_bad_input(train):
    layer = LinearSVDO(6, 3).train(train)
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
        layer(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point"):
        layer(torch.randint(0, 4, (2, 6)))
    with pytest.raises(ValueError, match=r"^x: expected a tensor on cpu.*meta"):
        layer(torch.randn(2, 6, device="meta"))
    with pytest.raises(ValueError, match=r"^x: expected shape \(\*, in_features=6\)"):
        layer(torch.randn(2, 5))
    with torch.no_grad():
        layer.log_sigma2[0, 0] = float("nan")
    if train:  # no per-call pass: the output shows it, sparsevd.train.fit stops the run
        y = layer(torch.randn(2, 6))
        assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()
    else:
        with pytest.raises(ValueError, match=r"^log_sigma2: contains NaN"):
            layer(torch.randn(2, 6))
    with torch.no_grad():
        layer.log_sigma2[0, 0] = float("inf")
    if not train:
        with pytest.raises(ValueError, match=r"^log_sigma2: contains infinite"):
            layer(torch.randn(2, 6))


@pytest.mark.parametrize("train", [True, False])
def test_conv_bad_input(train):
    layer = Conv2dSVDO(2, 3, 3).train(train)
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
        layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point"):
        layer(torch.randint(0, 4, (1, 2, 5, 5)))
    with pytest.raises(ValueError, match=r"^x: expected a tensor on cpu.*meta"):
        layer(torch.randn(1, 2, 5, 5, device="meta"))
    with pytest.raises(ValueError, match=r"^x: expected shape \(N, in_channels=2, H, W\)"):
        layer(torch.randn(1, 3, 5, 5))
    with torch.no_grad():
        layer.log_sigma2[0, 0, 0, 0] = float("nan")
    if train:  # no per-call pass: the output shows it, sparsevd.train.fit stops the run
        y = layer(torch.randn(1, 2, 5, 5))
        assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()
    else:
        with pytest.raises(ValueError, match=r"^log_sigma2: contains NaN"):
            layer(torch.randn(1, 2, 5, 5))


# ---------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make,x_shape,y_shape", [
    (lambda: LinearSVDO(6, 4), (0, 6), (0, 4)),
    (lambda: LinearSVDO(6, 4, bias=False), (3, 0, 6), (3, 0, 4)),
    (lambda: Conv2dSVDO(2, 5, 3, padding=1), (0, 2, 6, 6), (0, 5, 6, 6)),
    (lambda: Conv2dSVDO(4, 4, 3, groups=2, bias=False), (0, 4, 5, 5), (0, 4, 3, 3)),
    (lambda: Conv1dSVDO(2, 4, 3, padding="same"), (0, 2, 9), (0, 4, 9)),
])
def test_empty_batch(make, x_shape, y_shape, train):
    layer = make().train(train)
    x = torch.randn(x_shape, requires_grad=True)
    y = layer(x)
    assert y.shape == y_shape and y.dtype == torch.float32
    (y.sum() + layer.kl()).backward()
    assert x.grad.shape == x_shape
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("train_clip", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make,x_shape", [
    (lambda **kw: LinearSVDO(6, 4, **kw), (3, 2, 6)),
    (lambda **kw: Conv2dSVDO(4, 6, 3, groups=2, padding="same", **kw), (2, 4, 7, 7)),
    (lambda **kw: Conv1dSVDO(2, 4, 3, stride=2, **kw), (2, 2, 9)),
])
def test_meta_device_gives_shapes_then_materialises(make, x_shape, train, train_clip):
    """Built on the meta device (deferred initialisation), a layer runs forward, KL and backward
    for shapes only, with the shapes of the same layer on the CPU; ``to_empty`` and
    ``reset_parameters`` then give a working layer (finite output and gradients)."""
    with torch.device("meta"):
        layer = make(train_clip=train_clip).train(train)
    expected = make(train_clip=train_clip).train(train)(torch.randn(x_shape)).shape  # on the CPU
    x = torch.randn(x_shape, device="meta", requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == expected
    (y.sum() + layer.kl()).backward()
    assert x.grad.shape == x_shape
    for name, p in layer.named_parameters():
        assert p.grad.device.type == "meta" and p.grad.shape == p.shape, name
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    layer.zero_grad(set_to_none=True)
    y = layer(torch.randn(x_shape))
    assert torch.isfinite(y).all() and y.shape == expected
    (y.sum() + layer.kl()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# --------------------------------------------------------------------------------- training
def test_conv_net_with_bias_trains_without_nan():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = nn.Sequential(
        Conv2dSVDO(1, 4, 3, padding=1, bias=True), nn.ReLU(),
        Conv2dSVDO(4, 4, 3, stride=2, bias=True), nn.ReLU(), nn.Flatten(),
        LinearSVDO(4 * 2 * 2, 3),
    )
    x = torch.randn(32, 1, 6, 6)
    y = torch.randint(0, 3, (32,))
    loss_fn = sparsevd.SGVLB(model, train_size=32, kl_warmup_epochs=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    conv = model[0]
    la0 = conv.log_alpha.detach().clone()
    losses = []
    for step in range(300):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        loss.backward()
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), f"step {step}: grad of {name}"
        opt.step()
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"step {step}: {name}"
        losses.append(loss.item())
    la = conv.log_alpha.detach()
    assert (la - la0).abs().mean() > 1.0, "log α of the conv layer did not move"
    assert la.mean() > la0.mean() + 1.0  # the KL term pushes log α up
    assert sum(losses[-10:]) < sum(losses[:10])
    model.eval()
    assert torch.isfinite(model(x)).all()
