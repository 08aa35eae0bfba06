"""Hugging Face models (sparsevd/hf.py, sparsevd/hf_integration.py), built from tiny configs
(nothing downloaded): a converted or deployed model round-trips exactly through transformers'
own save_pretrained / from_pretrained (and sparsevd.hf's compact pair, and sparsevd.save /
load(model=...)); without sparsevd's quantizer, transformers loads the dense model with the same
outputs, never another one."""
import contextlib
import json

import pytest
import torch
from conftest import prune, same_state
from torch import nn

import sparsevd
from sparsevd.nn import LinearSVDO, SparseLinear

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("sparsevd.hf")


def _bert_config(intermediate=48):
    return transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=intermediate,
                                   max_position_embeddings=24, num_labels=3)


def _bert():
    model = prune(sparsevd.convert(transformers.BertForSequenceClassification(_bert_config())).eval())
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.log_sigma2[:10] = 20.0  # dead neurons: compacted at deploy
    return model


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=24,
                                  bos_token_id=0, eos_token_id=0)
    return prune(sparsevd.convert(transformers.GPT2LMHeadModel(cfg)).eval())


@contextlib.contextmanager
def without_sparsevd_quantizer():
    """transformers as a process that never imported sparsevd sees it."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    saved = AUTO_QUANTIZER_MAPPING.pop("sparsevd"), AUTO_QUANTIZATION_CONFIG_MAPPING.pop("sparsevd")
    try:
        yield
    finally:
        AUTO_QUANTIZER_MAPPING["sparsevd"], AUTO_QUANTIZATION_CONFIG_MAPPING["sparsevd"] = saved


def tokens(n=3, t=11):
    tok = torch.randint(0, 60, (n, t))
    mask = torch.ones_like(tok)
    mask[0, 7:] = 0
    return tok, mask


def test_converted_bert_round_trips_through_save_pretrained(tmp_path):
    model = _bert()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "sparsevd"
    assert config["modules"]["bert.encoder.layer.0.intermediate.dense"]["kind"] == "sparse_vd"
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.bert.encoder.layer[1].output.dense, LinearSVDO)
    same_state(loaded, model)  # θ (dropped weights included), log σ², biases: bit for bit
    tok, mask = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(tok, attention_mask=mask).logits, model(tok, attention_mask=mask).logits)
    with without_sparsevd_quantizer():  # transformers alone: the pruned dense model
        dense = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(dense.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    with torch.no_grad():
        assert torch.equal(dense(tok, attention_mask=mask).logits, model(tok, attention_mask=mask).logits)


def test_deployed_bert_round_trips_through_save_pretrained(tmp_path):
    deployed = sparsevd.deploy(_bert(), cost_model="csr")
    assert deployed.bert.encoder.layer[0].intermediate.dense.out_features < 48
    deployed.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not loaded.training
    layer = loaded.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, SparseLinear)
    assert layer.intermediate.dense.plan == deployed.bert.encoder.layer[0].intermediate.dense.plan
    same_state(loaded, deployed)
    tok, mask = tokens()
    with torch.no_grad():
        expected = deployed(tok, attention_mask=mask).logits
        assert torch.equal(loaded(tok, attention_mask=mask).logits, expected)
    with without_sparsevd_quantizer():
        dense = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(dense.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    assert dense.bert.encoder.layer[0].intermediate.dense.out_features == 48
    with torch.no_grad():
        torch.testing.assert_close(dense(tok, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-6)


def test_compact_save_pretrained_and_sparsevd_load_into_the_config_architecture(tmp_path):
    deployed = sparsevd.deploy(prune(_bert(), 0.9), cost_model="csr")
    hf.save_pretrained(deployed, tmp_path / "compact")
    deployed.save_pretrained(tmp_path / "dense")
    compact = (tmp_path / "compact" / hf.WEIGHTS_NAME).stat().st_size
    assert compact < (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert "quantization_config" not in json.loads((tmp_path / "compact" / "config.json").read_text())
    tok, mask = tokens()
    with torch.no_grad():
        expected = deployed(tok, attention_mask=mask).logits
    for directory in ("compact", "dense"):  # sparsevd.hf.from_pretrained reads both layouts
        loaded = hf.from_pretrained(tmp_path / directory)
        same_state(loaded, deployed)
        with torch.no_grad():
            assert torch.equal(loaded(tok, attention_mask=mask).logits, expected), directory
    with pytest.raises(OSError):  # transformers' own loader finds no weights it knows: refused
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "compact")
    path = sparsevd.save(deployed, tmp_path / "bert.safetensors")
    into = sparsevd.load(path, model=transformers.BertForSequenceClassification(_bert_config()))
    with torch.no_grad():
        assert torch.equal(into(tok, attention_mask=mask).logits, expected)
    with pytest.raises(ValueError, match=r"bert\.safetensors: module 'bert\.encoder\.layer\.0\.intermediate\.dense'"):
        sparsevd.load(path, model=transformers.BertForSequenceClassification(_bert_config(32)))


def test_gpt2_conv1d_and_tied_head_round_trip(tmp_path):
    deployed = sparsevd.deploy(_gpt2(), cost_model="csr")
    tok = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        expected = deployed(tok).logits
    deployed.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(deployed, tmp_path / "compact")
    with without_sparsevd_quantizer():
        dense = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert type(dense.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # (in, out) weights again
    for loaded in (transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf"),
                   hf.from_pretrained(tmp_path / "compact"), dense):
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        with torch.no_grad():
            torch.testing.assert_close(loaded(tok).logits, expected, rtol=1e-5, atol=1e-6)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, SparseLinear)
    same_state(loaded, deployed)


def test_whisper_conv1d_attributes_and_round_trip(tmp_path):
    """Whisper's encoder reads conv1.stride[0] * conv2.stride[0] to check the mel length: the
    deployed SparseConv1d layers have nn.Conv1d's 1-tuple attributes, run, and round-trip."""
    from sparsevd.nn import SparseConv1d

    cfg = transformers.WhisperConfig(
        vocab_size=60, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
        max_source_positions=12, max_target_positions=12, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None)
    model = prune(sparsevd.convert(transformers.WhisperForConditionalGeneration(cfg)).eval())
    feats, dec = torch.randn(2, 8, 24), torch.randint(3, 60, (2, 5))
    with torch.no_grad():
        expected = model(input_features=feats, decoder_input_ids=dec).logits
    deployed = sparsevd.deploy(model, cost_model="csr")
    conv2 = deployed.model.encoder.conv2
    assert isinstance(conv2, SparseConv1d) and conv2.storage == "csr"
    assert (conv2.kernel_size, conv2.stride, conv2.padding, conv2.dilation) == ((3,), (2,), (1,), (1,))
    deployed.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(deployed, tmp_path / "compact")
    for m in (deployed, transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf"),
              hf.from_pretrained(tmp_path / "compact")):
        assert m.model.encoder.conv2.stride == (2,)
        with torch.no_grad():
            torch.testing.assert_close(m(input_features=feats, decoder_input_ids=dec).logits, expected,
                                       rtol=1e-5, atol=1e-5)


def test_vit_patch_convolution_converts_deploys_and_round_trips(tmp_path):
    """ViT's patch convolution sits in a module with parameters of its own (the position
    embeddings): it converts; deployed as CSR it still answers ViTModel's read of
    projection.weight.dtype; the model round-trips."""
    from sparsevd.nn import SparseConv2d

    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16,
                                 intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                 num_labels=3)
    report = {e.name: e for e in sparsevd.plan_conversion(transformers.ViTForImageClassification(cfg))}
    assert report["vit.embeddings.patch_embeddings.projection"].action == "convert"
    assert "cls_token, position_embeddings" in report["vit.embeddings"].reason
    model = prune(sparsevd.convert(transformers.ViTForImageClassification(cfg)).eval())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).logits
    deployed = sparsevd.deploy(model, x, cost_model="csr")
    proj = deployed.vit.embeddings.patch_embeddings.projection
    assert isinstance(proj, SparseConv2d) and proj.storage == "csr" and proj.weight.dtype == x.dtype
    deployed.save_pretrained(tmp_path / "hf")
    for m in (deployed, transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")):
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_from_pretrained_refuses_a_module_that_is_not_the_saved_one(tmp_path):
    """Wav2Vec2 with its positional convolution's weight norm removed before converting: the
    config builds the weight-normed convolution again, whose weights the checkpoint does not
    hold; from_pretrained refuses, naming the module, instead of building a sparse layer from
    uninitialized weights."""
    from torch.nn.utils import parametrize

    cfg = transformers.Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, mask_time_prob=0.0, pad_token_id=0)
    model = transformers.Wav2Vec2ForCTC(cfg).eval()
    parametrize.remove_parametrizations(model.wav2vec2.encoder.pos_conv_embed.conv, "weight")
    deployed = sparsevd.deploy(prune(sparsevd.convert(model).eval()), cost_model="csr")
    deployed.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"module 'wav2vec2\.encoder\.pos_conv_embed\.conv' of the model "
                                         r"is a ParametrizedConv1d .* the file's stands for Conv1d"):
        transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path)


def test_falcon_linear_converts_as_linear_and_round_trips(tmp_path):
    """transformers' FalconLinear (an nn.Linear subclass computing x Wᵀ + b) converts, deploys
    with its MLP compacted, and loads back into a fresh Falcon exactly."""
    cfg = transformers.FalconConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    parallel_attn=True, new_decoder_architecture=False, multi_query=True, bias=False)
    report = {e.name: e for e in sparsevd.plan_conversion(transformers.FalconForCausalLM(cfg))}
    assert report["transformer.h.0.mlp.dense_h_to_4h"].action == "convert"
    model = prune(sparsevd.convert(transformers.FalconForCausalLM(cfg)).eval())
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.dense_h_to_4h.log_sigma2[:8] = 20.0  # dead units: removed from both matrices
    tok = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        expected = model(tok, use_cache=False).logits
    deployed = sparsevd.deploy(model, cost_model="csr")
    assert deployed.transformer.h[0].mlp.dense_4h_to_h.in_features <= 64 - 8  # (and any the prune killed)
    deployed.save_pretrained(tmp_path / "hf")
    path = sparsevd.save(deployed, tmp_path / "falcon.safetensors")
    for m in (deployed, transformers.FalconForCausalLM.from_pretrained(tmp_path / "hf"),
              sparsevd.load(path, model=transformers.FalconForCausalLM(cfg))):
        assert isinstance(m.transformer.h[0].mlp.dense_h_to_4h, SparseLinear)
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(tok, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)


def test_deployed_and_reloaded_models_pickle(tmp_path):
    """torch.save of a whole model (a pickle) works with the sparsevd quantizer attached, and of
    a model from_pretrained rebuilt (its config holds the sparsevd quantization config)."""
    deployed = sparsevd.deploy(_bert(), cost_model="csr")
    deployed.save_pretrained(tmp_path / "hf")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    tok, mask = tokens()
    for i, model in enumerate((deployed, reloaded)):
        torch.save(model, tmp_path / f"{i}.pt")
        back = torch.load(tmp_path / f"{i}.pt", weights_only=False)
        assert type(back.hf_quantizer) is type(model.hf_quantizer)
        with torch.no_grad():
            assert torch.equal(back(tok, attention_mask=mask).logits, model(tok, attention_mask=mask).logits)
    assert back.config.quantization_config.to_dict() == reloaded.config.quantization_config.to_dict()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_converted_checkpoint_resumes_by_load_state_dict(arch, tmp_path):
    """The HF Trainer saves with save_pretrained(dir, state_dict=model.state_dict()) and resumes
    with load_state_dict(file, strict=False): every tensor of a converted model comes back,
    θ of the dropped weights included (stored beside the masked weight), GPT-2's Conv1D layers
    transposed back; from_pretrained gives the same."""
    from safetensors.torch import load_file

    model = _bert() if arch == "bert" else _gpt2()
    with torch.no_grad():  # dropped weights with nonzero θ, which the KL and training still see
        for m in model.modules():
            if isinstance(m, LinearSVDO):
                m.weight.add_(0.01)
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    fresh = _bert() if arch == "bert" else _gpt2()
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == ([] if arch == "bert" else ["lm_head.weight"])  # GPT-2's tied head
    same_state(fresh, model)
    cls = type(model)
    same_state(cls.from_pretrained(tmp_path), model)
    assert sparsevd.kl_divergence(fresh).item() == sparsevd.kl_divergence(model).item()


def _resnet(exclude=None):
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_channels=3, num_labels=4)
    model = transformers.ResNetForImageClassification(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # fresh random running statistics
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return prune(sparsevd.convert(model, exclude=exclude), 0.5)


def test_resnet_batch_norms_fold_and_round_trip(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = _resnet(exclude="resnet.embedder.*")
    with torch.no_grad():
        expected = model(x).logits
    deployed = sparsevd.deploy(model, x, cost_model="dense")
    layer = deployed.resnet.encoder.stages[0].layers[0].layer[0]
    assert isinstance(layer.normalization, nn.Identity)  # folded into the bias-free convolution
    with torch.no_grad():
        out = deployed(x).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    deployed.save_pretrained(tmp_path)
    loaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded.resnet.encoder.stages[0].layers[0].layer[0].normalization, nn.Identity)
    with without_sparsevd_quantizer():
        dense = transformers.ResNetForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)
        torch.testing.assert_close(dense(x).logits, out, rtol=1e-5, atol=1e-5)
    # every layer deployed, every batch norm folded: no parameter left for transformers' dtype
    everything = sparsevd.deploy(_resnet(), x, cost_model="dense")
    with pytest.raises(ValueError, match="sparsevd.hf.save_pretrained"):
        everything.save_pretrained(tmp_path / "all")
    hf.save_pretrained(everything, tmp_path / "compact")
    with torch.no_grad():
        assert torch.equal(hf.from_pretrained(tmp_path / "compact")(x).logits, everything(x).logits)


def test_weights_edited_after_saving_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    deployed = sparsevd.deploy(_bert(), cost_model="csr")
    deployed.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    state[key][0, 0] = 1.0  # a neuron the deployed model had removed
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"intermediate\.dense'.*removed.*weights changed"):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path)


def test_sentence_transformer_round_trips(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(30)]))
    transformers.BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32)).save_pretrained(base)

    def build():
        return st.SentenceTransformer(modules=[modules.Transformer(str(base)), modules.Pooling(16)],
                                      device="cpu")

    deployed = sparsevd.deploy(prune(sparsevd.convert(build().eval())), cost_model="csr")
    text = ["the cat sat on the mat", "w1 w2 w3", "cat"]
    expected = deployed.encode(text, convert_to_tensor=True)
    deployed.save(str(tmp_path / "st"))  # the inner model's save_pretrained: sparsevd's quantizer
    reloaded = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert isinstance(reloaded[0].auto_model.encoder.layer[0].intermediate.dense, SparseLinear)
    assert torch.equal(reloaded.encode(text, convert_to_tensor=True), expected)
    into = sparsevd.load(sparsevd.save(deployed, tmp_path / "st.safetensors"), model=build())
    assert torch.equal(into.encode(text, convert_to_tensor=True), expected)


def test_dense_equivalent_of_a_user_model_computes_the_same_and_rebuilds_exactly():
    """The machinery under save_pretrained on a model with an attention, a batch norm folded into
    a convolution without bias and a compacted MLP: the dense-equivalent state loads into the
    plain architecture and gives the same outputs; rebuilt, the modules are the deployed ones."""
    import torch.nn.functional as F

    from sparsevd.hf_integration import dense_state_dict, rebuild, records

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(24, 8)
            with torch.no_grad():
                self.bn.running_mean.normal_(0, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.weight.normal_(1, 0.3)
                self.bn.bias.normal_(0, 0.3)

        def forward(self, img):
            t = F.relu(self.bn(self.conv(img))).flatten(2).transpose(1, 2)
            t = t + self.attn(t, t, t, need_weights=False)[0]
            return t + self.fc2(F.gelu(self.fc1(t)))

    model = prune(sparsevd.convert(Net()).eval(), 0.6)
    with torch.no_grad():
        model.fc1.log_sigma2[:6] = 20.0
    deployed = sparsevd.deploy(model, cost_model="csr")
    assert isinstance(deployed.bn, nn.Identity) and deployed.fc1.out_features <= 18
    recs = json.loads(json.dumps(records(deployed)))  # what config.json holds
    dense = Net()
    dense.load_state_dict(dense_state_dict(deployed), strict=True)
    img = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = deployed(img)
        torch.testing.assert_close(dense.eval()(img), expected, rtol=1e-5, atol=1e-5)
    rebuild(dense, recs)
    assert isinstance(dense.attn.k_proj, SparseLinear) and isinstance(dense.bn, nn.Identity)
    same_state(dense, deployed)
    with torch.no_grad():
        assert torch.equal(dense(img), expected)
