"""Predictive uncertainty (sparsevd.uncertainty): the Monte-Carlo predictive mean of the softmax
under LRT sampling, its entropy, and the expected calibration error."""
import math

import pytest
import torch
from conftest import assert_close
from torch import nn

import sparsevd
from sparsevd.uncertainty import evaluate_predictive, expected_calibration_error, predict, sampling


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), sparsevd.nn.LinearSVDO(12, 16), nn.ReLU(), nn.Dropout(0.5),
                      sparsevd.nn.LinearSVDO(16, 5))
    with torch.no_grad():
        for layer in (m[1], m[4]):
            layer.log_sigma2.uniform_(-4.0, 0.0)  # noticeable noise
    return m


def test_deterministic_mode_is_the_eval_softmax():
    model = _model().train()
    x = torch.randn(7, 12)
    pred = predict(model, x, samples=0)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), -1)
    assert_close(pred.probs, expected, rtol=1e-6, atol=1e-7)
    p = pred.probs.double()
    assert_close(pred.entropy, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6, name="entropy")
    assert pred.samples == 0


def test_monte_carlo_mean_of_lrt_samples_with_dropout_off():
    """The MC mean is the average softmax of LRT samples drawn with the same seeds, other modules
    (dropout) in eval mode; the seed makes it reproducible; the caller's modes and generator are
    left as they were."""
    model = _model().train()
    x = torch.randn(6, 12)
    state = torch.get_rng_state()
    pred = predict(model, x, samples=8, seed=123)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert all(m.training for m in model.modules())  # modes restored
    torch.manual_seed(123)
    with torch.no_grad(), sampling(model):
        assert not model[3].training and model[1].training and model[4].training
        manual = torch.stack([torch.softmax(model(x), -1) for _ in range(8)]).mean(0)
    assert_close(pred.probs, manual, rtol=1e-6, atol=1e-7)
    assert torch.equal(predict(model, x, samples=8, seed=123).probs, pred.probs)
    assert not torch.equal(predict(model, x, samples=8, seed=124).probs, pred.probs)
    assert_close(pred.probs.sum(-1), torch.ones(6), rtol=1e-6, atol=1e-6, name="row sums")
    assert (pred.entropy >= 0).all() and (pred.entropy <= math.log(5) + 1e-6).all()


def test_mc_error_shrinks_with_samples():
    """The MC estimate's spread across seeds falls like 1/sqrt(S) (S = 4 vs 64: 4x)."""
    model = _model()
    x = torch.randn(4, 12)

    def spread(s):
        ps = torch.stack([predict(model, x, samples=s, seed=k).probs for k in range(12)])
        return ps.std(0).mean().item()

    ratio = spread(4) / spread(64)
    assert 2.0 < ratio < 8.0, ratio


def test_ece_by_hand():
    probs = torch.tensor([[0.92, 0.08], [0.83, 0.17], [0.26, 0.74], [0.44, 0.56]])
    labels = torch.tensor([0, 1, 1, 1])
    # 2 bins: (0, .5] empty; (.5, 1]: all four, accuracy 3/4, mean confidence 0.7625
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(abs(0.75 - 0.7625))
    # 10 bins, one confidence each: 0.56 (correct), 0.74 (correct), 0.83 (wrong), 0.92 (correct)
    by_hand = (abs(1 - 0.56) + abs(1 - 0.74) + abs(0 - 0.83) + abs(1 - 0.92)) / 4
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(by_hand, rel=1e-6)
    # calibrated by construction: labels drawn from the predicted probabilities
    n = 200_000
    conf = torch.rand(n) * 0.5 + 0.5
    p = torch.stack([conf, 1 - conf], 1)
    y = (torch.rand(n) > conf).long()
    assert expected_calibration_error(p, y, bins=15) < 0.01
    with pytest.raises(ValueError, match="probs, labels"):
        expected_calibration_error(probs, labels[:2])
    with pytest.raises(ValueError, match="samples"):
        predict(_model(), torch.randn(2, 12), samples=-1)


def test_evaluate_predictive_over_a_loader():
    model = _model()
    data = [(torch.randn(5, 12), torch.randint(0, 5, (5,))) for _ in range(3)]
    for s in (0, 4):
        r = evaluate_predictive(model, data, "cpu", samples=s)
        probs = torch.cat([predict(model, x, s, seed=i).probs for i, (x, _) in enumerate(data)])
        labels = torch.cat([y for _, y in data])
        assert r["samples"] == s
        assert r["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).double().mean()))
        assert r["ece"] == pytest.approx(expected_calibration_error(probs, labels))
        assert r["nll"] == pytest.approx(float(-probs.double().gather(1, labels[:, None]).log().mean()),
                                         rel=1e-6)


def test_models_returning_a_model_output_a_dict_or_a_tuple():
    """A Hugging Face classifier (ModelOutput, keyword inputs from a dict) and models returning
    dicts or tuples: predict finds the logits (or takes the name / index given)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=4)
    model = sparsevd.convert(transformers.BertForSequenceClassification(cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.nn.LinearSVDO):
                m.log_sigma2.uniform_(-6.0, -2.0)
    x = {"input_ids": torch.randint(0, 40, (5, 7)), "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    x["attention_mask"][0, 4:] = 0
    det = predict(model, x, samples=0)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(**x).logits, -1)
    assert_close(det.probs, expected, rtol=1e-6, atol=1e-7, name="deterministic")
    pred = predict(model, x, samples=4, seed=5)
    torch.manual_seed(5)
    with torch.no_grad(), sampling(model):
        manual = torch.stack([torch.softmax(model(**x).logits, -1) for _ in range(4)]).mean(0)
    assert_close(pred.probs, manual, rtol=1e-6, atol=1e-7, name="Monte Carlo")
    assert not torch.equal(pred.probs, det.probs)

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return {"features": x, "scores": self.net(x)}

    wrapped, xs = DictOut(), torch.randn(3, 12)
    with torch.no_grad():
        scores = torch.softmax(wrapped.eval()(xs)["scores"], -1)
    assert_close(predict(wrapped, xs, samples=0, logits="scores").probs, scores, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"no 'logits' entry.*\['features', 'scores'\]"):
        predict(wrapped, xs, samples=0)
    tupled = nn.Sequential(_model(), Tuple())
    with torch.no_grad():
        first = torch.softmax(tupled.eval()(xs)[0], -1)
    assert_close(predict(tupled, xs, samples=0).probs, first, rtol=1e-6, atol=1e-7, name="tuple")
    with pytest.raises(ValueError, match="index of the model's 2-tuple"):
        predict(tupled, xs, samples=0, logits=2)


class Tuple(nn.Module):
    def forward(self, x):
        return x, x.sum(-1)
