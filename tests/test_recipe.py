"""The recipe for pretrained models (sparsevd.recipe, convert(init=...)) on a tiny BERT built here
(transformers' BertConfig, random weights, no download)."""
import math

import pytest
import torch
import torch.nn.functional as F

import sparsevd
from sparsevd.loss import kl_divergence
from sparsevd.nn import LinearSVDO
from sparsevd.recipe import PretrainedRecipe, init_log_sigma2, param_groups

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.1)
    return transformers.BertModel(cfg).eval()


def batch(seed: int, b: int = 8, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 120, (b, t), generator=g), torch.ones(b, t, dtype=torch.long)


def embed(model, ids, mask):
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def log_alpha_of(model):
    return torch.cat([m.log_alpha.detach().flatten() for m in model.modules() if isinstance(m, LinearSVDO)])


@pytest.mark.parametrize("init", ["paper", "pretrained", -6.0])
def test_converted_eval_output_equals_original(init):
    dense = tiny_bert()
    ids, mask = batch(1)
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        model = sparsevd.convert(tiny_bert(), init=init).eval()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert sum(isinstance(m, LinearSVDO) for m in model.modules()) == 13  # 6 per layer + pooler
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_log_alpha_after_float_init():
    model = sparsevd.convert(tiny_bert(), init=-2.5)
    la = log_alpha_of(model)
    torch.testing.assert_close(la, torch.full_like(la, -2.5), rtol=0, atol=1e-4)


def test_pretrained_init_is_one_log_sigma2_with_the_median_weight_at_log_alpha0():
    """init="pretrained": one log σ² for every weight of every layer (capped at log α = 2 for the
    tiny weights), the median weight at the recipe's log α₀; nothing starts dropped."""
    dense = tiny_bert()
    with torch.no_grad():  # some tiny weights, which the shared log σ² alone would drop
        dense.encoder.layer[0].intermediate.dense.weight[:, :3] = 1e-6
    model = sparsevd.convert(dense, init="pretrained")
    layers = [m for m in model.modules() if isinstance(m, LinearSVDO)]
    log_s2 = torch.cat([m.log_sigma2.detach().flatten() for m in layers])
    la = log_alpha_of(model)
    shared = log_s2.max()
    capped = log_s2 < shared
    w = torch.cat([m.weight.detach().flatten() for m in layers])
    assert capped[w.abs() < 1e-5].all() and capped.sum() < 0.02 * log_s2.numel()  # the tiny ones only
    torch.testing.assert_close(la[capped], torch.full_like(la[capped], 2.0), rtol=0, atol=1e-4)
    assert la.max() < 3.0 and la.median().item() == pytest.approx(PretrainedRecipe().log_alpha_init, abs=1e-3)


def test_shared_init_formula_on_fresh_weights():
    a, b = LinearSVDO(9, 5), LinearSVDO(4, 6)
    torch.nn.init.normal_(a.weight, std=0.3)
    torch.nn.init.normal_(b.weight, std=0.01)
    with torch.no_grad():
        b.weight[0, 0] = 0.0
    model = torch.nn.Sequential(a, b)
    init_log_sigma2(model, -4.0, shared=True)
    log_t2 = [torch.log(m.weight.detach().double() ** 2 + 1e-8) for m in (a, b)]
    c = -4.0 + torch.cat([t.flatten() for t in log_t2]).median()
    for m, lt in zip((a, b), log_t2):
        torch.testing.assert_close(m.log_sigma2.detach().double(), torch.clamp(lt + 2.0, max=c), rtol=0, atol=1e-5)
    assert b.log_alpha[0, 0].item() == pytest.approx(2.0, abs=1e-4)  # θ = 0 starts kept


def test_paper_init_is_log_sigma2_minus_10():
    model = sparsevd.convert(tiny_bert(), init="paper")
    for m in model.modules():
        if isinstance(m, LinearSVDO):
            w2 = m.weight.detach() ** 2 + 1e-8
            expected = torch.where(-10.0 - torch.log(w2) >= 3.0, torch.log(w2) + 2.0,
                                   torch.full_like(w2, -10.0))
            torch.testing.assert_close(m.log_sigma2.detach(), expected)


def test_init_log_sigma2_formula_on_fresh_weights():
    layer = LinearSVDO(7, 5)
    torch.nn.init.normal_(layer.weight, std=0.3)
    init_log_sigma2(layer, -3.0)
    ref = -3.0 + torch.log(layer.weight.detach().double() ** 2 + 1e-8)
    torch.testing.assert_close(layer.log_sigma2.detach().double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad,err", [(3.0, ValueError), (float("nan"), ValueError), ("x", ValueError),
                                     (True, TypeError), (None, TypeError)])
def test_convert_init_errors_name_the_argument(bad, err):
    with pytest.raises(err, match="init"):
        sparsevd.convert(tiny_bert(), init=bad)


def test_init_log_sigma2_errors():
    with pytest.raises(ValueError, match="log_alpha_init"):
        init_log_sigma2(LinearSVDO(3, 2), 3.5)
    with pytest.raises(ValueError, match="model"):
        init_log_sigma2(torch.nn.Linear(3, 2), -4.0)
    with pytest.raises(TypeError, match="log_alpha_init"):
        init_log_sigma2(LinearSVDO(3, 2), "a")
    with pytest.raises(TypeError, match="shared"):
        init_log_sigma2(LinearSVDO(3, 2), -4.0, shared=1)


def test_param_groups():
    model = sparsevd.convert(tiny_bert())
    groups = param_groups(model, 1e-5, 0.2, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["weights", "log_sigma2"]
    w, s = groups
    sig = [m.log_sigma2 for m in model.modules() if isinstance(m, LinearSVDO)]
    assert len(s["params"]) == len(sig) == 13
    assert {id(p) for p in s["params"]} == {id(p) for p in sig}
    assert (s["lr"], s["weight_decay"]) == (0.2, 0.0)
    assert (w["lr"], w["weight_decay"]) == (1e-5, 0.01)
    every = {id(p) for p in model.parameters()}
    assert {id(p) for p in w["params"]} | {id(p) for p in s["params"]} == every
    assert not {id(p) for p in w["params"]} & {id(p) for p in s["params"]}
    torch.optim.Adam(groups)  # a valid optimizer


@pytest.mark.parametrize("kw,err", [(dict(lr=0), ValueError), (dict(log_sigma2_lr=-1), ValueError),
                                    (dict(weight_decay=-0.1), ValueError), (dict(lr="a"), TypeError)])
def test_param_groups_errors(kw, err):
    args = dict(lr=1e-5, log_sigma2_lr=0.1, weight_decay=0.0)
    args.update(kw)
    with pytest.raises(err, match=next(iter(kw))):
        param_groups(sparsevd.convert(tiny_bert()), **args)


def test_recipe_kl_weight_and_checks():
    r = PretrainedRecipe(kl_scale=0.5, warmup_steps=4)
    assert [r.kl_weight(s) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert PretrainedRecipe(kl_scale=0.5, warmup_steps=0).kl_weight(0) == 0.5
    for kw in (dict(lr=0), dict(log_alpha_init=3.0), dict(kl_scale=-1), dict(warmup_steps=-1)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            PretrainedRecipe(**kw)


@pytest.mark.parametrize("kl_in", ["optimizer", "loss"])
def test_recipe_distillation_keeps_fidelity_while_sparsity_grows(kl_in):
    """SGVLB distillation steps (data term: cosine distance of mean-pooled embeddings to the dense
    teacher; KL per example weighted by the recipe) keep the student close to the teacher on
    held-out inputs while weights are dropped, with the KL applied by the recipe's optimizer
    (``step(kl_weight=)``, θ's pull preconditioned) or put in the loss (plain Adam steps). The
    tiny model's weights are N(0, 0.1²), large enough that its linear layers matter: with all of
    them dropped the cosine is ≈ 0.85."""
    teacher = tiny_bert()
    recipe = PretrainedRecipe(lr=2e-5, log_sigma2_lr=0.1, kl_scale=1e-2, warmup_steps=100)
    student = sparsevd.convert(tiny_bert(), init="pretrained")
    opt = recipe.optimizer(student)
    n_train = 64
    train = [batch(100 + i) for i in range(n_train // 8)]
    with torch.no_grad():
        targets = [embed(teacher, *b) for b in train]
    student.train()
    steps = 150
    for step in range(steps):
        (ids, mask), tgt = train[step % len(train)], targets[step % len(train)]
        data = (1 - F.cosine_similarity(embed(student, ids, mask), tgt, dim=-1)).mean()
        opt.zero_grad()
        if kl_in == "loss":
            (data + recipe.kl_weight(step) * kl_divergence(student) / n_train).backward()
            opt.step()
        else:
            data.backward()
            opt.step(kl_weight=recipe.kl_weight(step) / n_train)
    student.eval()
    held = [batch(900 + i) for i in range(4)]
    with torch.no_grad():
        cos = torch.cat([F.cosine_similarity(embed(student, *b), embed(teacher, *b), dim=-1) for b in held])
    rep = sparsevd.report(student)
    print(f"sparsity {rep.sparsity:.1f} %, cosine min {cos.min():.4f} mean {cos.mean():.4f}")
    assert rep.sparsity > 30.0
    assert cos.mean() > 0.97 and cos.min() > 0.93
    dropped = sparsevd.convert(tiny_bert(), init=-4.0)
    for m in dropped.modules():
        if isinstance(m, LinearSVDO):
            torch.nn.init.constant_(m.log_sigma2, 50.0)
    with torch.no_grad():
        base = torch.cat([F.cosine_similarity(embed(dropped.eval(), *b), embed(teacher, *b), dim=-1)
                          for b in held])
    assert base.mean() < cos.mean() - 0.08  # the check can tell a ruined model


def _trained_and_sparsified():
    """A trained model (LayerNorm between two linears) and its converted copy after some training:
    every parameter moved, log σ² such that about half of the first layer's weights are dropped."""
    import copy

    source = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.LayerNorm(10), torch.nn.Linear(10, 5))
    model = sparsevd.convert(copy.deepcopy(source))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[0].log_sigma2.copy_(torch.where(torch.rand(10, 12) < 0.5, 5.0, -12.0))
    return source, model


def test_rewind_takes_the_sources_kept_weights_and_keeps_the_mask():
    """Kept θ and the other parameters take the source's values (a kept θ below its floor raised
    to it); the dropped θ and log σ² stay, so the mask is the frozen one."""
    from sparsevd.recipe import rewind
    from sparsevd.train import freeze_mask

    source, model = _trained_and_sparsified()
    with torch.no_grad():
        source[0].weight[0, 0] = 1e-7  # below any floor: must be raised, or the weight drops
        model[0].log_sigma2[0, 0] = -12.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = freeze_mask(model)
    masks = [mask.clone() for _, mask, _ in frozen]
    assert 0 < int(masks[0].sum()) < masks[0].numel() and bool(masks[0][0, 0])
    assert rewind(model, source, frozen) is model
    got, want = dict(model.named_parameters()), dict(source.named_parameters())
    for i, (layer, mask, floor) in zip((0, 2), frozen):
        w = got[f"{i}.weight"]
        expect = torch.where(mask, want[f"{i}.weight"], before[f"{i}.weight"])
        expect = torch.where(mask & (expect.abs() < floor), floor.copysign(expect), expect)
        assert torch.equal(w, expect)
        assert torch.equal(layer.mask(), mask) and torch.equal(got[f"{i}.log_sigma2"], before[f"{i}.log_sigma2"])
    assert got["0.weight"][0, 0].item() > 1e-7  # raised to the floor
    for name in ("0.bias", "1.weight", "1.bias", "2.bias"):
        assert torch.equal(got[name], want[name]), name


def test_rewind_errors_name_the_argument():
    from sparsevd.recipe import rewind
    from sparsevd.train import freeze_mask

    source, model = _trained_and_sparsified()
    _, other = _trained_and_sparsified()
    with pytest.raises(ValueError, match="frozen"):
        rewind(model, source, freeze_mask(other))
    with pytest.raises(ValueError, match="source"):
        rewind(model, torch.nn.Sequential(torch.nn.Linear(3, 3)), freeze_mask(model))
