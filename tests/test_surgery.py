"""Deploy-time surgery beyond nn.Sequential (sparsevd/surgery.py): dead neurons removed inside
traced modules (a user's MLP, BERT's intermediate/output pair, GPT-2's MLP), batch norms folded
into convolutions, transformers Conv1D and tied weights in convert, nn.MultiheadAttention split
into projections that convert and deploy. Every deployed model is compared with the eval-mode
model it came from on fresh inputs."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, prune, same_state
from torch import nn

import sparsevd
from sparsevd.nn import LinearSVDO, SparseConv2d, SparseLinear, SplitMultiheadAttention
from sparsevd.surgery import origin

transformers = pytest.importorskip("transformers")


def keep_entries(layer, rows, cols):
    """Keep the weights at (rows[i], cols[i]) (θ = 0.5, log σ² = −10: log α ≈ −8.6)."""
    with torch.no_grad():
        layer.weight[rows, cols] = 0.5
        layer.log_sigma2[rows, cols] = -10.0


def kill_rows(layer, rows):
    """Make output neurons ``rows`` of a sparse-VD layer dead (every weight dropped)."""
    with torch.no_grad():
        layer.log_sigma2[rows] = 20.0


class MLPBlock(nn.Module):
    """x + fc2(act(fc1(x))), not a Sequential."""

    def __init__(self, d=12, h=40, act=F.gelu):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, h), nn.Linear(h, d), act

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, act=F.gelu):
        super().__init__()
        self.block = MLPBlock(act=act)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("act", [F.gelu, torch.sigmoid], ids=["gelu", "sigmoid"])
def test_traced_mlp_compaction_of_a_user_module(act):
    model = prune(sparsevd.convert(Net(act)).eval())
    kill_rows(model.block.fc1, slice(0, 9))  # 9 dead neurons: constant act(b) folded into fc2's bias
    with torch.no_grad():
        model.block.fc2.log_sigma2[:, 30:] = 20.0  # 10 neurons nobody reads
    live = torch.arange(9, 30)
    keep_entries(model.block.fc1, live, live % 12)  # the others stay alive and read
    keep_entries(model.block.fc2, live % 12, live)
    deployed = sparsevd.deploy(model, cost_model="csr")
    fc1, fc2 = deployed.block.fc1, deployed.block.fc2
    assert fc1.out_features == fc2.in_features == 40 - 19
    assert origin(fc1)["rows"] == [[9, 30]] and origin(fc2)["cols"] == [[9, 30]]
    for shape in [(5, 12), (2, 7, 12), (1, 12)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-6, name=f"{shape}")
    # trace=False: only nn.Sequential chains, so nothing is compacted here
    plain = sparsevd.deploy(model, cost_model="csr", trace=False)
    assert plain.block.fc1.out_features == 40


def test_a_layer_output_used_twice_is_not_compacted():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(F.relu(h)) + h  # fc1's neurons are read by the residual too

    model = prune(sparsevd.convert(Twice()).eval())
    kill_rows(model.fc1, slice(0, 3))
    deployed = sparsevd.deploy(model, cost_model="masked")
    assert deployed.fc1.out_features == 8 and deployed.fc2.in_features == 8
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-6)


def _bert(num_layers=2):
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=num_layers,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=24, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_bert_intermediate_neurons_are_removed_from_both_matrices():
    model = prune(sparsevd.convert(_bert()).eval(), 0.6)
    for i, layer in enumerate(model.bert.encoder.layer):
        kill_rows(layer.intermediate.dense, slice(0, 10 + 5 * i))
        live = torch.arange(10 + 5 * i, 48)
        keep_entries(layer.intermediate.dense, live, live % 16)
        keep_entries(layer.output.dense, live % 16, live)
    deployed = sparsevd.deploy(model, cost_model="csr")
    for i, layer in enumerate(deployed.bert.encoder.layer):
        assert layer.intermediate.dense.out_features == 48 - 10 - 5 * i
        assert layer.output.dense.in_features == 48 - 10 - 5 * i
        assert layer.output.dense.out_features == 16  # the block's interface is unchanged
    tok = torch.randint(0, 60, (3, 11))
    mask = torch.ones_like(tok)
    mask[0, 7:] = 0
    with torch.no_grad():
        assert_close(deployed(tok, attention_mask=mask).logits, model(tok, attention_mask=mask).logits,
                     rtol=1e-5, atol=1e-5, name="BERT logits")


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=24,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_converts_deploys_and_the_tied_head_stays_dense():
    model = _gpt2()
    tok = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        dense = model(tok).logits
    converted, report = sparsevd.convert(model, return_report=True)
    by_name = {e.name: e for e in report}
    assert by_name["transformer.h.0.attn.c_attn"].action == "convert"
    assert "transposed" in by_name["transformer.h.1.mlp.c_proj"].reason
    assert by_name["lm_head"].action == "dense" and "transformer.wte.weight" in by_name["lm_head"].reason
    c_fc = converted.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, LinearSVDO) and origin(c_fc) == {"type": "Conv1D"}
    assert converted.lm_head.weight is converted.transformer.wte.weight
    with torch.no_grad():
        assert_close(converted(tok).logits, dense, rtol=1e-5, atol=1e-5, name="converted")
    prune(converted, 0.7)
    for block in converted.transformer.h:
        kill_rows(block.mlp.c_fc, slice(0, 12))
        live = torch.arange(12, 64)
        keep_entries(block.mlp.c_fc, live, live % 16)
        keep_entries(block.mlp.c_proj, live % 16, live)
    deployed = sparsevd.deploy(converted, cost_model="csr")
    assert deployed.lm_head.weight is deployed.transformer.wte.weight  # still tied
    for block in deployed.transformer.h:
        assert isinstance(block.attn.c_attn, SparseLinear)
        assert block.mlp.c_fc.out_features == block.mlp.c_proj.in_features == 64 - 12
    with torch.no_grad():
        assert_close(deployed(tok).logits, converted(tok).logits, rtol=1e-5, atol=1e-5, name="deployed")


def _fresh_bn(bn):
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    return bn


class ResBlock(nn.Module):
    def __init__(self, c=4, mid=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def test_batch_norms_fold_into_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), ResBlock(),
                          nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.Flatten(),
                          nn.Linear(6 * 6 * 6, 5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _fresh_bn(m)
    model = prune(sparsevd.convert(model).eval(), 0.5)
    kill_rows(model[3].c1, slice(0, 3))
    with torch.no_grad():  # the other channels of c1 stay alive and read
        model[3].c1.weight[3:, :, 1, 1] = 0.5
        model[3].c1.log_sigma2[3:, :, 1, 1] = -10.0
        model[3].c2.weight[:, 3:] = 0.5
        model[3].c2.log_sigma2[:, 3:] = -10.0
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
    for cost_model in ("dense", "csr"):
        deployed = sparsevd.deploy(model, x, cost_model=cost_model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
        assert origin(deployed[1])["folded_into"] == "0" and origin(deployed[0])["folded_bn"] == "1"
        assert deployed[3].c1.out_channels == 5 and deployed[3].c2.in_channels == 5  # through b1
        assert isinstance(deployed[4], SparseConv2d) and deployed[4].groups == 2
        with torch.no_grad():
            assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5, name=cost_model)


def test_conv1d_batch_norm_folds():
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), _fresh_bn(nn.BatchNorm1d(5)), nn.GELU())
    model = prune(sparsevd.convert(model).eval(), 0.4)
    deployed = sparsevd.deploy(model, cost_model="dense")
    assert isinstance(deployed[1], nn.Identity)
    x = torch.randn(4, 3, 9)
    with torch.no_grad():
        assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True, "add_zero_attn": True},
                                     {"kdim": 5, "vdim": 7}, {"bias": False}],
                         ids=["plain", "bias_kv_zero_attn", "kdim_vdim", "no_bias"])
def test_split_attention_equals_multihead_attention(batch_first, options):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options).eval()
    split = SplitMultiheadAttention.from_module(mha).eval()
    n, t, s = 3, 4, 6

    def seq(length, dim):
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)

    q, k, v = seq(t, 8), seq(s, mha.kdim), seq(s, mha.vdim)
    kpm = torch.rand(n, s) < 0.3
    kpm[:, 0] = False
    for kwargs in ({}, {"key_padding_mask": kpm}, {"attn_mask": torch.randn(t, s)},
                   {"attn_mask": torch.rand(t, s) < 0.3, "need_weights": False},
                   {"key_padding_mask": kpm, "average_attn_weights": False}):
        with torch.no_grad():
            a, b = mha(q, k, v, **kwargs), split(q, k, v, **kwargs)
        assert_close(b[0], a[0], rtol=1e-5, atol=1e-6, name=f"output {kwargs.keys()}")
        assert (a[1] is None) == (b[1] is None)
        if a[1] is not None:
            assert_close(b[1], a[1], rtol=1e-5, atol=1e-6, name=f"weights {kwargs.keys()}")


def test_multihead_attention_converts_and_deploys_in_a_transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Linear(16, 3)).eval()
    x = torch.randn(3, 7, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        dense = model[0](x, mask=causal, is_causal=True)
    converted = sparsevd.convert(model)
    attn = converted[0].layers[0].self_attn
    assert isinstance(attn, SplitMultiheadAttention) and isinstance(attn.q_proj, LinearSVDO)
    assert origin(attn) == {"type": "MultiheadAttention"}
    with torch.no_grad():
        assert_close(converted[0](x, mask=causal, is_causal=True), dense, rtol=1e-5, atol=1e-5,
                     name="converted")
    prune(converted)
    deployed = sparsevd.deploy(converted, cost_model="csr")
    assert isinstance(deployed[0].layers[1].self_attn.v_proj, SparseLinear)
    with torch.no_grad():
        assert_close(deployed(x), converted(x), rtol=1e-5, atol=1e-5, name="deployed")
        assert_close(deployed[0](x, mask=causal, is_causal=True),
                     converted[0](x, mask=causal, is_causal=True), rtol=1e-5, atol=1e-5,
                     name="deployed, causal")


# ------------------------------------------------------------------ gated MLPs, repeated modules
def _llama_config():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=32)


def _prune_gated(gate, up, down, d):
    """Units 0-9: gate rows dropped (act(0) = 0, no bias: product 0); 10-15: up rows dropped
    (product 0); 16-23: down never reads them; 24-47 alive and read. 24 removable units."""
    kill_rows(gate, slice(0, 10))
    kill_rows(up, slice(10, 16))
    with torch.no_grad():
        down.log_sigma2[:, 16:24] = 20.0
    live = torch.arange(24, 48)
    for layer in (gate, up):
        keep_entries(layer, live, live % d)
    keep_entries(down, live % d, live)


def test_llama_gated_mlp_units_are_removed_from_gate_up_and_down(tmp_path):
    import sparsevd.hf as hf

    torch.manual_seed(0)
    model = prune(sparsevd.convert(transformers.LlamaForCausalLM(_llama_config())).eval(), 0.5)
    for layer in model.model.layers:
        _prune_gated(layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, 32)
    deployed = sparsevd.deploy(model, cost_model="csr")
    plain = sparsevd.deploy(model, cost_model="csr", trace=False)  # the uncompacted deployment
    for layer in deployed.model.layers:
        mlp = layer.mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 24
        assert origin(mlp.gate_proj)["rows"] == origin(mlp.up_proj)["rows"] == [[24, 48]]
        assert origin(mlp.down_proj)["cols"] == [[24, 48]] and mlp.down_proj.bias is None
    assert plain.model.layers[0].mlp.down_proj.in_features == 48
    tok = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        expected = deployed(tok, use_cache=False).logits
        assert_close(expected, model(tok, use_cache=False).logits, rtol=1e-5, atol=1e-5, name="converted")
        assert_close(expected, plain(tok, use_cache=False).logits, rtol=1e-5, atol=1e-5, name="uncompacted")
    deployed.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(deployed, tmp_path / "compact")
    path = sparsevd.save(deployed, tmp_path / "llama.safetensors")
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                   hf.from_pretrained(tmp_path / "compact"),
                   sparsevd.load(path, model=transformers.LlamaForCausalLM(_llama_config()))):
        same_state(loaded, deployed)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(tok, use_cache=False).logits, expected)


def test_t5_gated_gelu_units_are_removed(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8,
                                feed_forward_proj="gated-gelu")
    model = prune(sparsevd.convert(transformers.T5ForConditionalGeneration(cfg)).eval(), 0.5)
    blocks = list(model.encoder.block) + list(model.decoder.block)
    for block in blocks:
        ff = block.layer[-1].DenseReluDense  # wo(dropout(gelu_new(wi_0(x)) * wi_1(x)))
        _prune_gated(ff.wi_0, ff.wi_1, ff.wo, 32)
    deployed = sparsevd.deploy(model, cost_model="csr")
    for block in list(deployed.encoder.block) + list(deployed.decoder.block):
        ff = block.layer[-1].DenseReluDense
        assert ff.wi_0.out_features == ff.wi_1.out_features == ff.wo.in_features == 24
    ids, dec = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = deployed(input_ids=ids, decoder_input_ids=dec).logits
        assert_close(expected, model(input_ids=ids, decoder_input_ids=dec).logits, rtol=1e-5, atol=1e-5)
    path = sparsevd.save(deployed, tmp_path / "t5.safetensors")
    loaded = sparsevd.load(path, model=transformers.T5ForConditionalGeneration(cfg))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids, decoder_input_ids=dec).logits, expected)


class GatedMLP(nn.Module):
    """down(dropout(sigmoid(gate(x)) * relu(up(x)))), gate and up with biases, down without."""

    def __init__(self, d=12, h=32):
        super().__init__()
        self.gate, self.up = nn.Linear(d, h), nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        h = torch.mul(torch.sigmoid(self.gate(x)), F.relu(self.up(x)))
        return x + self.down(F.dropout(h, 0.1, training=self.training))


def test_constant_products_of_a_user_gated_mlp_fold_into_the_consumer(tmp_path):
    torch.manual_seed(0)
    model = prune(sparsevd.convert(nn.Sequential(GatedMLP(), nn.Linear(12, 3))).eval(), 0.4)
    mlp = model[0]
    kill_rows(mlp.gate, slice(0, 6))  # sigmoid(b) != 0: a constant, not 0
    kill_rows(mlp.up, slice(0, 4))  # 0-3: both constant, sigmoid(b)·relu(b') into down's bias
    kill_rows(mlp.up, slice(6, 10))
    with torch.no_grad():
        mlp.up.bias[:4] = torch.tensor([0.5, 0.7, 0.9, 1.1])
        mlp.up.bias[6:8] = -0.5  # relu(b) = 0: product 0 (6, 7 removed)
        mlp.up.bias[8:10] = 0.5  # a constant times a live gate: kept (8, 9)
        mlp.down.log_sigma2[:, 10:14] = 20.0  # unread
    live = torch.arange(4, 32)
    keep_entries(mlp.gate, live[2:], live[2:] % 12)  # 4, 5: gate dead, up alive: kept
    keep_entries(mlp.up, torch.cat([live[:2], live[6:]]), torch.cat([live[:2], live[6:]]) % 12)
    keep_entries(mlp.down, live[10:] % 12, live[10:])
    keep_entries(mlp.down, live[:6] % 12, live[:6])
    deployed = sparsevd.deploy(model, cost_model="masked")
    d = deployed[0]
    assert d.gate.out_features == d.up.out_features == d.down.in_features == 32 - 10
    assert origin(d.down)["cols"] == [[4, 6], [8, 10], [14, 32]]
    assert d.down.bias is not None and bool((d.down.bias != 0).any())  # the folded constants
    with pytest.raises(ValueError, match="sparsevd.save"):  # no dense nn.Linear(bias=False) computes it
        sparsevd.surgery.dense_state(d.down, "0.down")
    for shape in [(5, 12), (2, 7, 12)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5, name=f"{shape}")
    x = torch.randn(4, 12)
    path = sparsevd.save(deployed, tmp_path / "gated.safetensors")
    loaded = sparsevd.load(path, model=nn.Sequential(GatedMLP(), nn.Linear(12, 3)))
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


@pytest.mark.parametrize("use", ["product", "gate"])
def test_a_gated_product_or_factor_used_elsewhere_is_not_compacted(use):
    class Leaky(GatedMLP):
        def forward(self, x):
            g = self.gate(x)
            h = torch.sigmoid(g) * F.relu(self.up(x))
            extra = h if use == "product" else g
            return self.down(h) + extra.sum(-1, keepdim=True)

    model = prune(sparsevd.convert(Leaky()).eval(), 0.4)
    kill_rows(model.gate, slice(0, 6))
    kill_rows(model.up, slice(0, 6))
    with torch.no_grad():
        model.down.log_sigma2[:, 10:14] = 20.0
    deployed = sparsevd.deploy(model, cost_model="masked")
    assert deployed.gate.out_features == deployed.up.out_features == deployed.down.in_features == 32
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_roberta_head_calling_its_dropout_twice_is_compacted(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=40, num_labels=3,
                                     pad_token_id=1)
    model = prune(sparsevd.convert(transformers.RobertaForSequenceClassification(cfg)).eval(), 0.5)
    kill_rows(model.classifier.dense, slice(0, 10))  # tanh(b) folded into out_proj's bias
    keep_entries(model.classifier.dense, torch.arange(10, 32), torch.arange(10, 32))
    keep_entries(model.classifier.out_proj, torch.arange(10, 32) % 3, torch.arange(10, 32))
    deployed = sparsevd.deploy(model, cost_model="csr")
    head = deployed.classifier  # dropout -> dense -> tanh -> (the same) dropout -> out_proj
    assert head.dense.out_features == head.out_proj.in_features == 22
    tok = torch.randint(2, 64, (3, 9))
    with torch.no_grad():
        expected = deployed(tok).logits
        assert_close(expected, model(tok).logits, rtol=1e-5, atol=1e-5)
    deployed.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    same_state(loaded, deployed)
    with torch.no_grad():
        assert torch.equal(loaded(tok).logits, expected)


def test_bart_layers_trace_and_lose_their_dead_fc1_units():
    """BartEncoderLayer / BartDecoderLayer: forward wrapped (gradient checkpointing,
    deprecate_kwarg) with **kwargs, a tuple from self_attn unpacked, a dtype test on the output."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_position_embeddings=32)
    model = prune(sparsevd.convert(transformers.BartForConditionalGeneration(cfg)).eval(), 0.5)
    for layer in (model.model.encoder.layers[0], model.model.decoder.layers[0]):
        kill_rows(layer.fc1, slice(0, 16))  # gelu(b) folded into fc2's bias
        keep_entries(layer.fc1, torch.arange(16, 48), torch.arange(16, 48) % 32)
        keep_entries(layer.fc2, torch.arange(16, 48) % 32, torch.arange(16, 48))
    deployed = sparsevd.deploy(model, cost_model="csr")
    for layer in (deployed.model.encoder.layers[0], deployed.model.decoder.layers[0]):
        assert layer.fc1.out_features == layer.fc2.in_features == 32
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        assert_close(deployed(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


class _SizeReadingBlock(nn.Module):
    """conv -> batch norm whose forward reads a size as an int: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        pad = int(x.shape[-1]) % 2  # like MobileNetV2's TF padding
        return self.bn(self.conv(F.pad(x, (0, pad, 0, pad))))


def test_unfoldable_batch_norm_inside_an_untraceable_module_warns():
    torch.manual_seed(0)
    model = nn.Sequential(_SizeReadingBlock(), nn.ReLU())
    with torch.no_grad():
        model[0].bn.running_mean.normal_()
        model[0].bn.running_var.uniform_(0.5, 2)
    model = prune(sparsevd.convert(model).eval(), 0.5)
    x = torch.randn(2, 3, 7, 7)
    with pytest.warns(RuntimeWarning, match=r"batch norms inside 1 module\(s\) stay unfolded: .* "
                                            r"\(e\.g\. _SizeReadingBlock '0'"):
        deployed = sparsevd.deploy(model, x, cost_model="dense")
    assert isinstance(deployed[0].bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


class _ReadsItsLayers(nn.Module):
    """fc2(relu(fc1(x))) whose code also reads a layer's parameter or attribute."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1, self.fc2 = nn.Linear(10, 40), nn.Linear(40, 6)

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x)))
        if self.how == "fc1.bias":
            return y + self.fc1.bias[:6]
        if self.how == "fc1.out_features":
            return y * self.fc1.out_features
        if self.how == "fc2.weight.dtype":  # metadata only: compaction stays
            return y.to(self.fc2.weight.dtype)
        return torch.nn.functional.linear(y, self.fc2.weight.t())  # a tied decoder


@pytest.mark.parametrize("how", ["fc1.bias", "fc1.out_features", "fc2.weight.t", "fc2.weight.dtype"])
def test_layers_whose_parameters_or_attributes_the_code_reads_are_not_compacted(how):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = prune(sparsevd.convert(_ReadsItsLayers(how)).eval(), 0.5)
    kill_rows(model.fc1, slice(0, 20))  # 20 dead hidden units: their constant would go to fc2's bias
    with torch.no_grad():  # (a converted layer's weight reads as θ: the dropped ones made 0 here)
        model.fc2.weight.mul_(model.fc2.mask())
    x = torch.randn(4, 10)
    deployed = sparsevd.deploy(model, x, cost_model="csr")
    if how == "fc2.weight.dtype":
        assert deployed.fc1.out_features <= 20  # (and any the random prune left unread)
    else:
        assert deployed.fc1.out_features == 40
    with torch.no_grad():
        assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_feed_forward_is_compacted(norm_first):
    """nn.TransformerEncoderLayer's forward does not trace; its _ff_block (linear1 -> activation
    -> dropout -> linear2) does: the dead hidden units leave both layers, outputs unchanged."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    layer = nn.TransformerEncoderLayer(16, 2, 64, batch_first=True, norm_first=norm_first)
    model = prune(sparsevd.convert(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval(), 0.5)
    for block in model.layers:
        kill_rows(block.linear1, slice(0, 32))  # relu(b) into linear2's bias, or 0
    x = torch.randn(3, 5, 16)
    deployed = sparsevd.deploy(model, x, cost_model="csr")
    for block in deployed.layers:
        assert block.linear1.out_features == block.linear2.in_features <= 32
    with torch.no_grad():
        assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)
