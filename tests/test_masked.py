"""The masked-matmul family: the eval mode of the sparse-VD layers (the masked weight
θ ⊙ [log α < threshold], cached until the parameters change), against the masked dense reference,
including after every way the parameters can change."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import sparsevd
from sparsevd.ops import weights as W
from sparsevd.nn import Conv2dSVDO, LinearSVDO


def _expected(layer, x):
    """The masked dense reference: the mask from the parameters in their own dtype (so that a
    log α right at the threshold is decided as the layer decides it), the product in fp64."""
    w = W.masked_weight(layer.weight.detach(), layer.log_sigma2.detach(), layer.threshold).double()
    b = None if layer.bias is None else layer.bias.detach().double()
    if isinstance(layer, LinearSVDO):
        return F.linear(x.double(), w, b)
    return F.conv2d(x.double(), w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def _layer(kind, device="cpu"):
    if kind == "linear":
        layer, x = LinearSVDO(20, 12), torch.randn(2, 5, 20)
    else:
        layer, x = Conv2dSVDO(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-12.0, 6.0)  # a third or so of the weights dropped
    return layer.to(device).eval(), x.to(device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a GPU"))]


def _check(layer, x, name):
    with torch.no_grad():
        y = layer(x)
        e = _expected(layer, x)
        assert_close(y, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_follows_every_change_of_the_parameters(kind, device, monkeypatch):
    if device == "cuda":  # IEEE fp32 convolutions, as the fp64 reference is compared at 1e-5
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    layer, x = _layer(kind, device)
    _check(layer, x, "first call")
    _check(layer, x, "cached")
    with torch.no_grad():  # in-place edits of each parameter
        layer.log_sigma2.view(-1)[:5] = 20.0
    _check(layer, x, "log_sigma2 edited in place")
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    _check(layer, x, "weight edited in place")
    with torch.no_grad():
        layer.bias.add_(1.0)
    _check(layer, x, "bias edited in place")
    layer.threshold = 0.0
    _check(layer, x, "threshold changed")
    other, _ = _layer(kind)  # on the CPU: load_state_dict copies across devices
    layer.load_state_dict(other.state_dict())
    _check(layer, x, "load_state_dict")
    layer.weight.data = torch.randn_like(layer.weight)
    _check(layer, x, ".data replaced")
    if device != "cpu":  # moved away and back: the cache follows the device
        layer.cpu()
        _check(layer, x.cpu(), ".cpu()")
        with torch.no_grad():
            layer.weight.neg_()
        layer.to(device)
        _check(layer, x, f".to({device!r}) after an edit on the CPU")
    layer.double()
    _check(layer, x.double(), ".double()")
    layer.float()
    _check(layer, x, ".float() back")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)  # an optimizer step in training mode
    layer.train()
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    _check(layer, x, "after an optimizer step")
    _check(copy.deepcopy(layer), x, "deepcopy")
    for kw in (dict(fused=True), dict(foreach=True)):
        # fused Adam writes the parameters without bumping their version counters: a step, in
        # eval mode or around a train()/eval() switch, must still be seen
        opt = torch.optim.Adam(layer.parameters(), lr=0.3, **kw)
        for switch in (False, True):
            _check(layer, x, "before the step")  # cache built
            if switch:
                layer.train()
            layer(x).square().sum().backward()
            opt.step()
            layer.zero_grad()
            if switch:
                layer.eval()
            _check(layer, x, f"after an Adam{kw} step (train/eval switch: {switch})")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_gradients_reach_the_kept_weights_only(kind):
    """With grad mode on, eval runs the uncached path: ∂θ is zero where the weight is dropped."""
    layer, x = _layer(kind)
    layer(x).sum().backward()
    mask = layer.mask()
    assert (layer.weight.grad[~mask] == 0).all() and (layer.weight.grad[mask] != 0).any()


def test_eval_nan_parameters_raise_once_per_change():
    layer, x = _layer("linear")
    with torch.no_grad():
        layer(x)
        layer.log_sigma2[0, 0] = float("nan")
        with pytest.raises(ValueError, match="^log_sigma2: contains NaN"):
            layer(x)


def test_eval_under_autocast_and_bad_inputs():
    layer, x = _layer("linear")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), _expected(layer, x), rtol=3e-2, atol=3e-2, name="bf16 autocast")
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
            layer(x.double())
        with pytest.raises(ValueError, match=r"^x: expected shape \(\*, in_features=20\)"):
            layer(torch.randn(3, 19))
        with pytest.raises(ValueError, match=r"^x: expected a tensor on cpu"):
            layer(torch.randn(3, 20, device="meta"))


def test_eval_compiles():
    layer, x = _layer("linear")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), _expected(layer, x), rtol=1e-5, atol=1e-5, name="compiled")
