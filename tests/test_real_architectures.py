"""Real architectures: a transformer-shaped encoder (attention projections and MLP as nn.Linear,
3-D activations, residuals, LayerNorm, an embedding, not an nn.Sequential) converts with the
original's eval output, trains with SGVLB, deploys with the eval model's outputs, and the deployed
model goes through torch.export and torch.compile; convert's include/exclude patterns and its
report of what it left dense and why."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

import sparsevd
from sparsevd.convert import plan_conversion
from sparsevd.models import TransformerEncoderLike
from sparsevd.nn import LinearSVDO, SparseLinear


def Encoder():
    """Token ids (B, T) -> logits (B, 4): the transformer-shaped model of sparsevd.models, small."""
    return TransformerEncoderLike(vocab_size=50, hidden=32, layers=2, heads=4, mlp=2, num_classes=4,
                                  max_len=16, svd=False)


def _data(n=64, t=9):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 50, (n, t), generator=g)
    return tok, (tok[:, 0] % 4)


def pretrained():
    """The encoder after a few dense Adam steps (weights off their init, some tiny ones)."""
    torch.manual_seed(0)
    model = Encoder()
    tok, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(tok), y).backward()
        opt.step()
    with torch.no_grad():  # tiny weights that log σ² = −10 alone would drop
        model.blocks[0].q.weight[0, :3] = torch.tensor([1e-4, -3e-4, 0.0])
    return model.eval()


def test_converts_with_the_original_eval_output():
    model = pretrained()
    tok, _ = _data(8)
    with torch.no_grad():
        expected = model(tok)
    converted, report = sparsevd.convert(model, return_report=True)
    assert sorted(report.converted()) == sorted(
        f"blocks.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "o", "fc1", "fc2")) + ["head"]
    with torch.no_grad():
        got = converted.eval()(tok)
    assert_close(got, expected, rtol=1e-6, atol=1e-6, name="eval output after convert")


def test_include_exclude_patterns_and_the_report_of_what_stays_dense():
    model = pretrained()
    report = plan_conversion(model, include="blocks.*", exclude=["*.fc2", "blocks.1.q"])
    by_name = {e.name: e for e in report}
    assert by_name["blocks.0.q"].action == "convert" and by_name["blocks.1.k"].action == "convert"
    assert by_name["blocks.0.fc2"].reason == "matched by exclude"
    assert by_name["blocks.1.q"].reason == "matched by exclude"
    assert by_name["head"].reason == "not matched by include"
    assert "lookup table" in by_name["emb"].reason and "normalization" in by_name["norm"].reason
    assert by_name[""].action == "dense"  # the model's own parameter (pos)
    text = str(report)
    assert "blocks.0.fc2" in text and "matched by exclude" in text
    converted = sparsevd.convert(model, include="blocks.*", exclude=["*.fc2", "blocks.1.q"])
    assert isinstance(converted.blocks[0].q, LinearSVDO)
    assert type(converted.blocks[1].q) is nn.Linear and type(converted.head) is nn.Linear
    # a predicate works too
    m2 = sparsevd.convert(pretrained(), include=lambda n: n.endswith("fc1"))
    assert isinstance(m2.blocks[1].fc1, LinearSVDO) and type(m2.blocks[1].fc2) is nn.Linear


def test_multihead_attention_is_split_and_subclasses_are_reported_dense():
    model = nn.Sequential(nn.Embedding(10, 8), nn.MultiheadAttention(8, 2, batch_first=True))

    class MyLinear(nn.Linear):
        pass

    model.append(MyLinear(8, 8))
    model.append(nn.Linear(8, 3))
    by_name = {e.name: e for e in plan_conversion(model)}
    assert "SplitMultiheadAttention" in by_name["1"].reason and by_name["1"].action == "convert"
    assert all(by_name[f"1.{p}"].action == "convert" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert "subclass" in by_name["2"].reason and by_name["3"].action == "convert"
    # all four projections excluded: the attention stays as it is
    kept = {e.name: e for e in plan_conversion(model, exclude="1.*")}
    assert kept["1"].action == "dense" and "projections" in kept["1"].reason
    sparsevd.convert(model, exclude="1.out_proj")
    assert isinstance(model[1], sparsevd.nn.SplitMultiheadAttention)
    assert isinstance(model[1].q_proj, LinearSVDO) and type(model[1].out_proj) is nn.Linear
    assert type(model[2]) is MyLinear and isinstance(model[3], LinearSVDO)


def test_trains_with_sgvlb_then_deploys_with_the_eval_outputs():
    model = sparsevd.convert(pretrained(), exclude="head")
    tok, y = _data()
    loss_fn = sparsevd.SGVLB(model, train_size=len(tok), kl_warmup_epochs=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(30):
        loss = loss_fn(model(tok), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with torch.no_grad():
        for blk in model.blocks:  # a realistic share of pruned weights
            for m in (blk.q, blk.fc1):
                m.log_sigma2[torch.rand_like(m.log_sigma2) < 0.7] = 20.0
    model.eval()
    deployed = sparsevd.deploy(model, tok[:1])
    assert sum(isinstance(m, SparseLinear) for m in deployed.modules()) == 12
    with torch.no_grad():
        for b in (1, 32):
            assert_close(deployed(tok[:b]), model(tok[:b]), rtol=1e-5, atol=1e-5, name=f"batch {b}")


@pytest.mark.parametrize("mode", ["csr", "dense", "masked"])
def test_deployed_model_exports_and_compiles(mode):
    model = sparsevd.convert(pretrained())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearSVDO):
                m.log_sigma2[torch.rand_like(m.log_sigma2) < 0.8] = 20.0
    deployed = sparsevd.deploy(model.eval(), cost_model=mode)
    assert not any(p.requires_grad for p in deployed.parameters())
    tok, _ = _data(5)
    with torch.no_grad():
        expected = deployed(tok)
    exported = torch.export.export(deployed, (tok,))
    with torch.no_grad():
        assert_close(exported.module()(tok), expected, rtol=1e-6, atol=1e-6, name="torch.export")
    torch._dynamo.reset()
    compiled = torch.compile(deployed, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(tok), expected, rtol=1e-6, atol=1e-6, name="torch.compile")
