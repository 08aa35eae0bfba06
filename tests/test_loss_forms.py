"""SGVLB's data term in every form (sparsevd.loss.data_term, SGVLB(data_loss=...)) against the
reference math written out with torch.nn.functional / plain tensor ops, on fresh random inputs;
model outputs as tensors, dicts, Hugging Face ModelOutputs and tuples (sparsevd.outputs.find_logits);
fit(loss_fn=...) on dict batches."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsevd
from sparsevd.loss import DATA_LOSSES, SGVLB, data_term, kl_divergence
from sparsevd.outputs import find_logits

#: fp32 sums of at most a few hundred terms: a few ulps of the loss' magnitude.
ATOL, RTOL = 1e-5, 1e-5
N = 1234


def _model(seed):
    torch.manual_seed(seed)
    model = sparsevd.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    with torch.no_grad():
        for _, m in sparsevd.loss.svdo_layers(model):
            m.log_sigma2.uniform_(-12.0, 4.0)  # a KL that is not the same for every weight
    return model


def _reference_token_ce(logits, targets, ignore_index):
    """−log softmax(logits)[target], averaged over the targets that are not ignore_index."""
    logp = logits.double().log_softmax(-1)
    keep = targets != ignore_index
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


@pytest.mark.parametrize("shape", [(7, 4), (3, 5, 4), (1, 1, 4), (2, 3, 2, 4)])
def test_cross_entropy_flat_and_token_level(shape):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    logits = torch.randn(shape, generator=g, requires_grad=True)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    targets[(torch.rand(shape[:-1], generator=g) < 0.3) & (targets.numel() > 1)] = -100  # padding
    if (targets != -100).sum() == 0:
        targets.view(-1)[0] = 1
    model = _model(0)
    crit = SGVLB(model, N, kl_warmup_epochs=0)
    loss = crit(logits, targets)
    want = N * _reference_token_ce(logits, targets, -100) + kl_divergence(model).double()
    torch.testing.assert_close(loss.double(), want, atol=ATOL * N, rtol=RTOL)
    (g_got,) = torch.autograd.grad(loss, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, atol=1e-3, rtol=1e-4)


def test_cross_entropy_ignore_index_is_the_argument():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 3, generator=g)
    targets = torch.randint(0, 3, (4, 6), generator=g)
    targets[:, -2:] = 0  # padding marked with 0 here
    got = data_term(logits, targets, "cross_entropy", ignore_index=0)
    torch.testing.assert_close(got.double(), _reference_token_ce(logits, targets, 0), atol=ATOL, rtol=RTOL)


def test_soft_cross_entropy_mse_cosine_against_the_math():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(5, 3, 8, generator=g)
    probs = torch.rand(5, 3, 8, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    teacher = torch.randn(5, 3, 8, generator=g)
    soft = -(probs.double() * out.double().log_softmax(-1)).sum(-1).mean()
    mse = ((out.double() - teacher.double()) ** 2).mean()
    cos = (out.double() * teacher.double()).sum(-1) / (out.double().norm(dim=-1) * teacher.double().norm(dim=-1))
    for form, target, want in (("soft_cross_entropy", probs, soft), ("mse", teacher, mse),
                               ("cosine", teacher, (1 - cos).mean())):
        got = data_term(out, target, form)
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL, msg=form)
        model = _model(3)
        crit = SGVLB(model, N, kl_warmup_epochs=0, data_loss=form)
        torch.testing.assert_close(crit(out, target).double(), N * want + kl_divergence(model).double(),
                                   atol=ATOL * N, rtol=RTOL, msg=form)


def test_a_callable_data_loss_and_the_warmup_beta():
    g = torch.Generator().manual_seed(4)
    out, tgt = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    model = _model(5)
    crit = SGVLB(model, N, kl_warmup_epochs=4, data_loss=lambda o, t: F.l1_loss(o, t))
    crit.epoch = 1.0  # β = 0.25
    want = N * (out - tgt).abs().mean() + 0.25 * kl_divergence(model)
    torch.testing.assert_close(crit(out, tgt), want, atol=ATOL * N, rtol=RTOL)
    bad = SGVLB(model, N, data_loss=lambda o, t: (o - t).abs())
    with pytest.raises(ValueError, match="data_loss: the callable must return a 0-dim tensor"):
        bad(out, tgt)


def test_model_outputs_dicts_model_outputs_and_tuples():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, generator=g)
    targets = torch.randint(0, 5, (3,), generator=g)
    crit = SGVLB(_model(7), N, kl_warmup_epochs=0)
    want = crit(logits, targets)
    hf = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    for out in ({"logits": logits, "hidden": torch.zeros(1)}, hf, (logits, torch.zeros(1)), [logits]):
        assert find_logits(out) is logits
        torch.testing.assert_close(crit(out, targets), want, atol=0, rtol=0)
    keyed = SGVLB(_model(7), N, kl_warmup_epochs=0, output_key="scores")
    torch.testing.assert_close(keyed({"scores": logits}, targets), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"no 'logits' entry; its entries are \['hidden'\]"):
        crit({"hidden": logits}, targets)


def test_errors_name_the_argument():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 3, 5, generator=g)
    model = _model(9)
    with pytest.raises(ValueError, match="targets: cross_entropy needs int64 class indices.*soft_cross_entropy"):
        SGVLB(model, N)(logits, torch.rand(4, 3, 5, generator=g))
    with pytest.raises(ValueError, match=r"targets: expected shape \(4, 3\).*got \(4, 5\)"):
        SGVLB(model, N)(logits, torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets: mse needs targets of the output's shape"):
        data_term(logits, torch.rand(4, 3), "mse")
    with pytest.raises(ValueError, match="targets: cosine needs float targets"):
        data_term(logits, torch.zeros(4, 3, 5, dtype=torch.long), "cosine")
    with pytest.raises(ValueError, match="data_loss: expected one of"):
        SGVLB(model, N, data_loss="hinge")
    with pytest.raises(TypeError, match="data_loss: expected one of"):
        SGVLB(model, N, data_loss=3)
    with pytest.raises(TypeError, match="target: expected a sparsevd.target.CompressionTarget"):
        SGVLB(model, N, target=object())
    assert DATA_LOSSES == ("cross_entropy", "soft_cross_entropy", "mse", "cosine")


class _DictModel(nn.Module):
    """A tiny model called with keyword tensors (as a Hugging Face model), returning a dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features, mask=None):
        return {"logits": self.body(features * (1 if mask is None else mask))}


def _data(seed, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _loaders(as_dicts):
    x, y = _data(10)

    class Batches:
        dataset = range(len(x))

        def __len__(self):
            return 4

        def __iter__(self):
            for i in range(4):
                xb, yb = x[24 * i:24 * (i + 1)], y[24 * i:24 * (i + 1)]
                yield {"features": xb, "mask": torch.ones_like(xb), "labels": yb} if as_dicts else (xb, yb)
    return Batches()


def test_fit_trains_dict_batches_with_a_loss_function_as_it_trains_pairs():
    """fit(loss_fn=...) on dict batches gives the same parameters, bit for bit, as fit on the same
    data as (x, y) pairs with its built-in cross-entropy: the loss function is the data term."""
    def loss_fn(model, batch):
        out = model(features=batch["features"], mask=batch["mask"])
        return F.cross_entropy(find_logits(out), batch["labels"])

    results = []
    for as_dicts in (False, True):
        torch.manual_seed(11)
        model = _DictModel()
        if not as_dicts:  # the same weights, called positionally
            model.forward = lambda features, _m=model: _m.body(features)
        kwargs = dict(loss_fn=loss_fn) if as_dicts else {}
        summary = fit(model, _loaders(as_dicts), None if as_dicts else _loaders(False), epochs=3,
                      pretrain_epochs=1, kl_warmup_epochs=1, lr=1e-2, mc_samples=0, **kwargs)
        results.append((model, summary))
    (m_pairs, s_pairs), (m_dicts, s_dicts) = results
    for (n, a), (_, b) in zip(m_pairs.state_dict().items(), m_dicts.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["loss"] for r in s_pairs["history"]] == [r["loss"] for r in s_dicts["history"]]
    assert s_dicts["history"][-1]["test_loss"] is None and s_dicts["predictive"] == {}
    assert s_dicts["history"][-1]["phase"] == "sparse_vd" and s_dicts["history"][-1]["beta"] == 1.0
    assert s_dicts["history"][-1]["loss"] < s_dicts["history"][0]["loss"] * 100  # finite, trained


def test_fit_evaluates_the_loss_function_and_says_what_batches_it_needs():
    def loss_fn(model, batch):
        return F.cross_entropy(model(features=batch["features"])["logits"], batch["labels"])

    torch.manual_seed(12)
    summary = fit(_DictModel(), _loaders(True), _loaders(True), epochs=2, pretrain_epochs=0,
                  kl_warmup_epochs=0, loss_fn=loss_fn, mc_samples=0)
    losses = [r["test_loss"] for r in summary["history"]]
    assert all(isinstance(v, float) and v > 0 for v in losses) and summary["test_accuracy"] is None
    with pytest.raises(ValueError, match=r"train_loader: expected \(x, y\) batches, got a dict.*loss_fn"):
        fit(_DictModel(), _loaders(True), None, epochs=1, pretrain_epochs=0)
    with pytest.raises(ValueError, match="loss_fn: expected a 0-dim tensor"):
        fit(_DictModel(), _loaders(True), None, epochs=1, pretrain_epochs=0,
            loss_fn=lambda m, b: F.cross_entropy(m(features=b["features"])["logits"], b["labels"],
                                                 reduction="none"))
    with pytest.raises(TypeError, match="loss_fn: expected a function"):
        fit(_DictModel(), _loaders(True), None, epochs=1, loss_fn="mse")


from sparsevd.train import fit  # noqa: E402
