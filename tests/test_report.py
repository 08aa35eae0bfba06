"""sparsevd.report and sparsevd.functional.kept_count (issue 23, item 7): the one-pass count of
the weights kept (log α < threshold) against the reference rule ``eval_mask`` on fresh random
parameters, the native CPU pass against the torch fallback (non-finite parameters included), and
the whole-model figures that count embeddings, biases and norms as kept."""
import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import functional as SF
from sparsevd.ops import library
from sparsevd.ops.weights import eval_mask

SHAPES = [(300, 784), (17, 5), (8, 3, 5), (7, 3, 5, 5), (1, 1)]


def _params(shape, dtype):
    w = torch.randn(shape, dtype=dtype) / shape[-1] ** 0.5
    ls2 = torch.rand(shape, dtype=dtype) * 14 - 12  # log α across the threshold
    return w, ls2


@pytest.fixture(params=["native", "torch"])
def counting(request, monkeypatch):
    """kept_count through the compiled CPU pass or through its torch fallback."""
    if request.param == "native":
        if not library.has_op("native_clip_occupancy"):
            pytest.skip(f"compiled library not loaded: {library.unavailable_reason()}")
    else:
        monkeypatch.setattr(SF._library, "has_op", lambda name: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kept_count_equals_eval_mask(counting, shape, dtype):
    w, ls2 = _params(shape, dtype)
    for thr in (-2.0, 0.5, 3.0):
        la = ls2.double() - torch.log(w.double() ** 2 + 1e-8)
        ls2[(la - thr).abs() < 1e-4] += 0.01  # clear of the ulp ties of two log implementations
        expected = int(eval_mask(w, ls2, thr).sum())
        assert 0 < expected < w.numel() or w.numel() == 1
        assert SF.kept_count(w, ls2, thr) == expected


def test_kept_count_of_a_noncontiguous_weight(counting):
    w, ls2 = _params((40, 30), torch.float32)
    assert SF.kept_count(w.t(), ls2.t(), 3.0) == int(eval_mask(w, ls2, 3.0).sum())


def test_kept_count_nonfinite_rule_is_the_kernels(counting):
    """NaN / inf θ or σ² count as kept (not known to be dropped) in both paths;
    check_finite=True raises naming the tensor instead."""
    w = torch.randn(5, 40)
    ls2 = torch.full((5, 40), 8.0)  # every finite weight dropped at threshold 0
    ls2[1, 2], ls2[3, 4], ls2[4, 20] = float("nan"), float("inf"), 100.0
    w[0, 7] = float("nan")
    assert SF.kept_count(w, ls2, 0.0) == 4
    with pytest.raises(ValueError, match="log_sigma2"):
        SF.kept_count(w, ls2, 0.0, check_finite=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kept_count_rejects_a_nonfinite_threshold(bad):
    w, ls2 = _params((4, 4), torch.float32)
    with pytest.raises((TypeError, ValueError), match="threshold"):
        SF.kept_count(w, ls2, bad)


def test_report_counts_the_whole_model():
    """Rows for the linear layers, and an embedding, biases and a norm counted once as kept
   ; model_compression from those counts."""
    emb = nn.Embedding(50, 16)
    model = nn.Sequential(emb, nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16))
    model = sparsevd.convert(model)
    for layer in (model[1], model[3]):
        layer.log_sigma2.data.uniform_(-12, 2)
    rep = sparsevd.report(model)
    kept = sum(int(l.mask().sum()) for l in (model[1], model[3]))
    other = emb.weight.numel() + 32 + 16 + 2 * 32  # embedding, two biases, the norm
    assert rep.nonzero == kept and rep.params == 16 * 32 * 2
    assert rep.other_params == other
    assert rep.model_params == rep.params + other
    assert rep.model_compression == pytest.approx((rep.params + other) / (kept + other))
    assert rep.as_dict()["model_compression"] == rep.model_compression
    assert f"compression {rep.model_compression:.2f}x" in rep.model_line()
