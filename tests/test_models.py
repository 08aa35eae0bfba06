"""Tests for sparsevd.models: shapes, parameter counts, layer types, chain structure."""
import pytest
import torch

import sparsevd
from torch import nn

from sparsevd.models import LeNet5, LeNet300, build_model, count_parameters
from sparsevd.nn import Conv2dSVDO, LinearSVDO

# LeNet-300-100: 784·300 + 300 + 300·100 + 100 + 100·10 + 10
LENET300_PARAMS = 266_610
# LeNet-5-Caffe: 20·1·25 + 20 + 50·20·25 + 50 + 800·500 + 500 + 500·10 + 10
LENET5_PARAMS = 431_080

# What deploy() may meet along the chain: weight layers, elementwise activations, pool, flatten.
CHAIN_TYPES = (nn.Linear, nn.Conv2d, LinearSVDO, Conv2dSVDO, nn.ReLU, nn.MaxPool2d, nn.Flatten)


@pytest.mark.parametrize("svd", [True, False])
@pytest.mark.parametrize("ctor,params", [(LeNet300, LENET300_PARAMS), (LeNet5, LENET5_PARAMS)])
def test_parameter_count(ctor, params, svd):
    model = ctor(svd=svd)
    assert count_parameters(model) == params
    log_sigma2 = sum(p.numel() for n, p in model.named_parameters() if n.endswith("log_sigma2"))
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight"))
    assert log_sigma2 == (weights if svd else 0)
    assert count_parameters(model, include_log_sigma2=True) == params + log_sigma2


def test_lenet300_layers():
    svd, dense = LeNet300(svd=True), LeNet300(svd=False)
    for model, lin in ((svd, LinearSVDO), (dense, nn.Linear)):
        weights = [m for m in model if isinstance(m, (nn.Linear, LinearSVDO))]
        assert [type(m) for m in weights] == [lin] * 3
        assert [(m.in_features, m.out_features) for m in weights] == [(784, 300), (300, 100),
                                                                      (100, 10)]
        assert [type(m) for m in model] == [nn.Flatten, lin, nn.ReLU, lin, nn.ReLU, lin]


def test_lenet5_layers():
    for svd, conv, lin in ((True, Conv2dSVDO, LinearSVDO), (False, nn.Conv2d, nn.Linear)):
        model = LeNet5(svd=svd)
        assert [type(m) for m in model] == [conv, nn.ReLU, nn.MaxPool2d, conv, nn.ReLU,
                                            nn.MaxPool2d, nn.Flatten, lin, nn.ReLU, lin]
        shapes = [tuple(m.weight.shape) for m in model if hasattr(m, "weight")]
        assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize("svd", [True, False])
def test_chain_is_plain_sequential(name, svd):
    model = build_model(name, svd=svd)
    assert type(model) is nn.Sequential
    for m in model:
        assert isinstance(m, CHAIN_TYPES), type(m)
        assert not list(m.children())  # flat: no nested containers


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize("svd", [True, False])
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_shapes(name, svd, batch):
    model = build_model(name, svd=svd)
    x = torch.rand(batch, 1, 28, 28)
    for mode in (model.train, model.eval):
        mode()
        y = model(x)
        assert y.shape == (batch, 10) and y.dtype == torch.float32
        assert torch.isfinite(y).all()


def test_lenet300_accepts_flat_input():
    model = LeNet300(svd=True).eval()
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(model(x), model(x.reshape(5, 784)))


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_eval_deterministic_train_noisy(name):
    model = build_model(name, svd=True)
    with torch.no_grad():  # a large σ² so the LRT noise is visible
        for m in model:
            if isinstance(m, (LinearSVDO, Conv2dSVDO)):
                m.log_sigma2.fill_(-4.0)
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_threshold_passed_to_layers():
    for name in ("lenet300", "lenet5"):
        model = build_model(name, svd=True, threshold=1.5)
        ts = {m.threshold for m in model if isinstance(m, (LinearSVDO, Conv2dSVDO))}
        assert ts == {1.5}


def test_build_model_names():
    assert isinstance(build_model("LeNet-300")[1], LinearSVDO)
    assert isinstance(build_model("lenet_5", svd=False)[0], nn.Conv2d)
    with pytest.raises(ValueError, match="unknown model 'vgg'.*lenet300"):
        build_model("vgg")


# ---------------------------------------------------------------------------------- VGG-like
def test_vgglike_shapes_counts_and_width():
    from sparsevd.models import VGG_LIKE_CONVS, VGGLike

    m = VGGLike(svd=False)
    convs = [l for l in m if isinstance(l, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in VGG_LIKE_CONVS if v != "M"]
    assert sum(c.weight.numel() for c in convs) == 14_710_464  # the 3x3 stack of VGG-16
    assert sum(isinstance(l, torch.nn.BatchNorm2d) for l in m) == 13
    small = VGGLike(svd=True, width=0.25)
    assert [c.out_channels for c in small if isinstance(c, sparsevd.nn.Conv2dSVDO)][:2] == [16, 16]
    assert small(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match="width"):
        VGGLike(width=0)


def test_vgglike_trains_on_the_cpu_and_deploys(tmp_path):
    """A narrow VGG-like net on generated CIFAR-10-shaped data: dense pre-training, conversion,
    SGVLB, then deploy (batch norms folded into the convolutions, one chain through them) and
    save/load with the eval outputs."""
    from sparsevd.models import VGGLike
    from sparsevd.train import fit

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]

    class L(list):
        dataset = x

    model = VGGLike(svd=False, width=0.125)
    s = fit(model, L(loader), L(loader[:1]), epochs=2, pretrain_epochs=1, kl_warmup_epochs=0,
            mc_samples=2)
    assert [h["phase"] for h in s["history"]] == ["dense", "sparse_vd"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])
    with torch.no_grad():  # prune a share of every layer, some whole channels too
        for m in model.modules():
            if isinstance(m, (sparsevd.nn.Conv2dSVDO, sparsevd.nn.LinearSVDO)):
                m.log_sigma2[torch.rand_like(m.log_sigma2) < 0.6] = 20.0
                m.log_sigma2[: max(1, m.log_sigma2.shape[0] // 4)] = 20.0
    model.eval()
    dep = sparsevd.deploy(model, x[:1], cost_model="rule")
    kept = [l.out_channels for l in dep if isinstance(l, sparsevd.nn.SparseConv2d)]
    folded = [l for l in dep if isinstance(l, torch.nn.Identity) and "folded_into" in l.sparsevd_origin]
    assert not any(isinstance(l, torch.nn.BatchNorm2d) for l in dep)
    assert len(folded) == sum(isinstance(l, torch.nn.BatchNorm2d) for l in model) > 0
    assert sum(kept) < sum(c.out_channels for c in model if isinstance(c, sparsevd.nn.Conv2dSVDO))  # compacted
    with torch.no_grad():
        ref = model(x[:8])
        assert torch.allclose(dep(x[:8]), ref, rtol=1e-4, atol=1e-4)
        loaded = sparsevd.load(sparsevd.save(dep, tmp_path / "vgg.safetensors"))
        assert torch.equal(loaded(x[:8]), dep(x[:8]))
