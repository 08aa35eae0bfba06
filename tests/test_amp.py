"""Mixed precision: bf16 autocast on the CPU (``fit(amp="bf16")``, ``sparsevd train --amp bf16``)
against fp32, by the rule of ../shared/STYLE.md: the error of sparsevd in bf16 is at most 2× the
error of the same computation done by PyTorch in bf16 (plus a small floor)."""
import math

import pytest
import torch
import torch.nn.functional as F
from sample_inputs import op_noise

import sparsevd
from sparsevd.ops.lrt_conv2d import naive_lrt_conv2d
from sparsevd.ops.lrt_linear import naive_lrt_linear
from sparsevd.ops.noise import draw_seed, lrt_noise
from sparsevd.train import fit
from test_robustness import _Loader

F64 = torch.float64
#: CPU backends with bf16 autocast on the CPU (the Triton kernels' bf16 dots run on a GPU only).
CPU_BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not sparsevd.ops.library.available(), reason="sparsevd._C not built"))]


def _err(a, e):
    return (a.double() - e).abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m,k,n", [(100, 784, 300), (37, 129, 65)])
def test_linear_under_bf16_autocast(monkeypatch, backend, m, k, n):
    """y and every gradient of a LinearSVDO under CPU bf16 autocast, against fp64 math on the same
    bf16 inputs and noise: within 2× PyTorch's own bf16 error (the naive math under autocast)."""
    monkeypatch.setenv("SPARSEVD_BACKEND", backend)
    layer = sparsevd.nn.LinearSVDO(k, n)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6.0, 0.0)
    x = torch.randn(m, k).bfloat16()
    g = torch.randn(m, n).bfloat16()
    seed = draw_seed()
    xi = op_noise((m, n), seed)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, layer.weight, layer.log_sigma2, layer.bias)]
    y64 = naive_lrt_linear(*leaves64, None, noise=xi)[0]
    y64.backward(g.double())
    exact = [y64.detach()] + [t.grad for t in leaves64]

    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparsevd.functional.lrt_linear(xs, layer.weight, layer.log_sigma2, layer.bias, seed=seed)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    ours = [y, xs.grad, layer.weight.grad, layer.log_sigma2.grad, layer.bias.grad]
    assert all(t.dtype == torch.float32 for t in ours[2:])  # fp32 parameter gradients

    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.log_sigma2, layer.bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_pt = naive_lrt_linear(*leaves, None, noise=xi.bfloat16())[0]  # PyTorch's own autocast version
    y_pt.backward(g)
    theirs = [y_pt] + [t.grad for t in leaves]
    for name, a, e, p in zip(("y", "grad_x", "grad_weight", "grad_log_sigma2", "grad_bias"),
                             ours, exact, theirs):
        assert torch.isfinite(a).all(), name
        assert _err(a, e) <= 2.0 * _err(p, e) + 1e-3 * e.abs().max().item(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_under_bf16_autocast(monkeypatch, backend):
    """A Conv2dSVDO forward under CPU bf16 autocast against fp64 math on the same inputs and noise:
    within 2× the error of PyTorch's own autocast version of the math (the naive math under autocast)."""
    monkeypatch.setenv("SPARSEVD_BACKEND", backend)
    layer = sparsevd.nn.Conv2dSVDO(3, 8, 3, padding=1)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6.0, 0.0)
    x = torch.randn(4, 3, 12, 12).bfloat16()
    seed = draw_seed()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparsevd.functional.lrt_conv2d(x, layer.weight, layer.log_sigma2, layer.bias, padding=1,
                                           seed=seed)
    assert y.dtype == torch.bfloat16
    xi = lrt_noise(seed, y.shape).double()
    p64 = [t.detach().double() for t in (x, layer.weight, layer.log_sigma2, layer.bias)]
    exact = naive_lrt_conv2d(*p64, None, [1, 1], [1, 1], [1, 1], 1, noise=xi)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pt = naive_lrt_conv2d(x, layer.weight.detach(), layer.log_sigma2.detach(), layer.bias.detach(),
                              None, [1, 1], [1, 1], [1, 1], 1, noise=xi.bfloat16())[0]
    assert _err(y, exact) <= 2.0 * _err(pt, exact) + 1e-3 * exact.abs().max().item()


def _curve(amp, method, device="cpu"):
    torch.manual_seed(0)
    model = sparsevd.models.LeNet300(svd=False)
    s = fit(model, _Loader(scale=1.0, n=6), _Loader(scale=1.0, n=2), epochs=3, method=method,
            kl_warmup_epochs=0, amp=amp, mc_samples=0, device=device)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master parameters
    return torch.tensor([h["loss"] for h in s["history"]], dtype=F64), s


def _rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA autocast and GradScaler need a GPU")


@pytest.mark.parametrize("device,amp", [
    ("cpu", "bf16"),
    pytest.param("cuda", "bf16", marks=_NEEDS_GPU),
    pytest.param("cuda", "fp16", marks=_NEEDS_GPU),
])
def test_training_run_follows_the_fp32_run(device, amp):
    """A sparse-VD run under autocast (bf16 on the CPU with the native backend; bf16, and fp16 with
    fit's GradScaler, on CUDA with the Triton kernels) stays as close to its fp32 run as a dense
    PyTorch run in that precision stays to its fp32 run (2× plus a floor), per epoch; the KL and
    the variance path stay fp32, so σ² ≈ e⁻¹⁰ does not underflow and the KL stays finite."""
    svd32, s32 = _curve(None, "sparse_vd", device)
    svd16, s16 = _curve(amp, "sparse_vd", device)
    d32, _ = _curve(None, "dense", device)
    d16, _ = _curve(amp, "dense", device)
    assert s16["amp"] == amp and s32["amp"] is None
    assert s16["device"].startswith(device)
    if device == "cuda":
        assert s16["backend"] == "triton"
    assert torch.isfinite(svd16).all()
    assert _rel(svd16, svd32) <= 2.0 * _rel(d16, d32) + 0.02, (svd16, svd32, d16, d32)
    assert all(math.isfinite(h["kl_per_image"]) for h in s16["history"])


@pytest.mark.parametrize("n", [1, 48, 1000, 60000, 2**20 + 1])
def test_fp16_init_scale_keeps_the_first_sgvlb_gradients_finite(n):
    """fp16's GradScaler starts at 2¹⁶ for a mean loss and at 2¹⁶ / 2^⌈log₂ N⌉ for the SGVLB: the
    scaled ∂(N · CE)/∂logit, at most N/B in size, then fits fp16 (≤ 65 504) for any batch
    B ≥ 2, and the scale is a power of two."""
    from sparsevd.train import fp16_init_scale

    s = fp16_init_scale(n)
    assert math.log2(s) == round(math.log2(s))
    assert n * s <= 2.0**16 <= 2 * n * s  # as large as fits
    assert torch.isfinite(torch.tensor(float(n) * s / 2).half())  # B = 2
    assert fp16_init_scale(1.0) == 2.0**16  # GradScaler's default for the dense phase


def test_amp_arguments(data_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="amp: fp16 needs a CUDA device"):
        fit(sparsevd.models.LeNet300(svd=False), _Loader(scale=1.0), _Loader(scale=1.0), epochs=1,
            amp="fp16")
    with pytest.raises(ValueError, match="amp: expected None or one of"):
        fit(sparsevd.models.LeNet300(svd=False), _Loader(scale=1.0), _Loader(scale=1.0), epochs=1,
            amp="int8")
    from test_cli import _train_args

    from sparsevd import cli

    rc = cli.main(_train_args(data_dir, tmp_path / "run", "--amp", "bf16", "--threads", "1"))
    assert rc == 0 and "bf16 autocast" in capsys.readouterr().out
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["amp"] == "bf16" and s["dtype"] == "bfloat16 autocast"


from test_cli import data_dir  # noqa: E402,F401  (the data fixture)
