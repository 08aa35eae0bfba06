"""Masked models vs sparsity (issue 11): the LRT training step with train-time clipping, and the
eval-mode and deployed latency of a transformer-shaped model, each against its dense twin
(../shared/BENCHMARKS.md; notes in benchmarks/NOTES.md, "Deployed overhead").

1. ``masked_train_step`` (``--parts train``): forward + backward of sparse-VD layers with
   ``train_clip=True`` (the dropped weights are clipped in the training forward too), at sparsity
   0, 50, 90, 95, 98, 99 %:
   - ``layer``: one LinearSVDO ``--layer`` × ``--layer`` (default 1024×1024) at batch 256, loss =
     sum of the outputs;
   - ``lenet300``: LeNet-300-100 (``sparsevd.models``) at batch 100, SGVLB loss.
   No optimizer step (the masks stay what they were set to). The masks are set through log σ²
   (20 on a dropped weight: log α = 10 ≥ threshold; the kept ones keep log σ² = −10 and |θ| ≥
   0.01), with the structure sparse VD produces: dead input columns and dead output rows at the
   fractions of ``STRUCTURE`` (a trained LeNet-300-100, see there), then random unstructured drops
   up to the target sparsity (below the structured share, the structured fractions are scaled
   down together). LeNet-300-100: every layer at the target sparsity with its own layer's
   fractions; the 1024² layer: fc2's (a hidden → hidden layer). Providers: ``sparsevd`` (default
   backend, one row per sparsity, with ``ratio_to_0``: its time / the 0 % step's) and ``dense``
   (nn.Linear, the same step; sparsity None).
2. ``transformer_infer`` (``--parts infer``): ``sparsevd.models.TransformerEncoderLike`` (hidden
   384, 6 layers, 6 heads, MLP 4×, 37 linear layers; input float (B, T, hidden), T = ``--seq``
   16), random unstructured masks at 0, 25, 50, 90, 98 %, batches 1 and 32. Providers ``dense``
   (``sparsevd.deploy.dense_twin``: nn.Linear with the masked weights), ``eval`` (the LinearSVDO
   model in eval mode) and ``sparsevd`` (``sparsevd.deploy(model)``, its measured plan; the row
   has ``deploy_s`` and the plan's modes at that batch).
3. ``sparse_linear_call`` (``--parts call``): the per-call overhead at batch 1: one 384×384 layer
   at 23 % sparsity, input (1, 384): nn.Linear vs the deployed SparseLinear (plan "masked",
   ``sparsevd``) and the general path of the module (a two-mode plan, ``sparsevd_general``).
4. ``adam_subnormal`` (``--parts adam``, issue 23 item 8): one optimiser step on the parameters of a
   LeNet-300-100 in sparse-VD form (θ and log σ², 2 × 266,200 floats) with ``--clipped`` (default
   90 %) of the weights clipped: zero gradient there and Adam moments either ``normal`` (1e-3, 1e-6)
   or ``subnormal`` (1e-39, 1e-39: where train-time clipping drives them), reset before every step
   (the same copy for every provider). Providers ``torch`` (torch.optim.Adam, fused) and
   ``sparsevd`` (sparsevd.optim.Adam, fused: the step flushes subnormals to zero on every thread);
   rows have ``moments`` and ``ratio_to_normal``. With one thread the times are the thread's CPU
   time (``common.time_interleaved(timer="cpu")``: stable while other processes share the cores).

Timing: providers interleaved in rounds in one process (``common.time_interleaved``: CPU
torch.utils.benchmark blocked runs with torch's threads, GPU triton.testing.do_bench), median /
p20 / p80 over all blocks of all rounds; ratios in the printed table are to ``dense``.

Usage: python -m benchmarks.bench_masked [--parts train infer call] [--workloads layer lenet300]
       [--layer 1024] [--sparsity 0 0.5 0.9 0.95 0.98 0.99] [--infer-sparsity 0 0.25 0.5 0.9 0.98]
       [--batch 1 32] [--seq 16] [--hidden 384] [--layers 6] [--heads 6] [--rounds 5]
       [--clipped 0.9] [--threads N] [--device cpu|cuda] [--quick] [--out FILE] [--no-save]
       [--dry-run]
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import common

import sparsevd
import sparsevd.models
from sparsevd.allocator import keep_freed_memory
from sparsevd.deploy import dense_twin
from sparsevd.nn import LinearSVDO, SparseLinear
from sparsevd.optim import Adam as FlushingAdam

#: Structured sparsity of a trained LeNet-300-100: per layer (fraction of input columns with no
#: kept weight, fraction of output rows with no kept weight, the layer's sparsity), read from the
#: eval masks (threshold 3) of the checkpoint /work/runs/lenet300-svd-60 (``sparsevd train
#: --model lenet300``, Fashion-MNIST, 60 epochs: 20 dense + 40 sparse VD, KL warm-up 20, seed 0;
#: test accuracy 89.28 %, compression 14.7x, 18069 of 266200 weights kept; 2026-12-02).
#: fc2's dead columns are fc1's dead rows (128 of the 131 neurons fc1 killed).
STRUCTURE = {
    "fc1": (0.0370, 0.4367, 0.9370),
    "fc2": (0.4267, 0.2200, 0.9088),
    "fc3": (0.2100, 0.0000, 0.4830),
}
TRAIN_SPARSITY = (0.0, 0.5, 0.9, 0.95, 0.98, 0.99)
INFER_SPARSITY = (0.0, 0.25, 0.5, 0.9, 0.98)
DROP, KEEP = 20.0, -10.0  # log σ² of a dropped weight (log α = 10) and of a kept one


def _structured_fractions(cols: float, rows: float, sparsity: float):
    """(dead columns, dead rows, random drop of the rest) that give ``sparsity`` overall:
    1 − (1 − c)(1 − r)(1 − p) = sparsity; c and r scaled down together when their share alone
    exceeds ``sparsity``."""
    def share(k):
        return 1 - (1 - k * cols) * (1 - k * rows)

    k = 1.0
    if share(1.0) > sparsity:  # bisection on the scale of the structured part
        lo, hi = 0.0, 1.0
        for _ in range(50):
            k = (lo + hi) / 2
            lo, hi = (k, hi) if share(k) < sparsity else (lo, k)
        k = lo
    c, r = k * cols, k * rows
    kept = (1 - c) * (1 - r)
    p = 0.0 if kept <= 0 else max(0.0, 1 - (1 - sparsity) / kept)
    return c, r, p


@torch.no_grad()
def set_mask(layer: LinearSVDO, sparsity: float, cols: float = 0.0, rows: float = 0.0,
             gen: Optional[torch.Generator] = None) -> float:
    """Drop ``sparsity`` of ``layer``'s weights (dead columns, dead rows, then random ones)
    through log σ²; returns the sparsity of the eval mask."""
    n, k = layer.weight.shape
    c, r, p = _structured_fractions(cols, rows, sparsity)
    drop = torch.rand(n, k, generator=gen) < p
    drop[:, torch.randperm(k, generator=gen)[: round(c * k)]] = True
    drop[torch.randperm(n, generator=gen)[: round(r * n)]] = True
    w = layer.weight
    w.copy_(w.sign().where(w != 0, torch.ones_like(w)) * w.abs().clamp(min=1e-2))  # kept stay kept
    layer.log_sigma2.fill_(KEEP)
    layer.log_sigma2[drop.to(w.device)] = DROP
    return 1.0 - float(layer.mask().float().mean())


# ------------------------------------------------------------------------------ training
def _train_model(workload: str, size: int, sparsity: Optional[float], device, gen):
    """(model, x, y) of a workload; ``sparsity`` None: the dense nn.Linear twin."""
    if workload == "lenet300":
        model = sparsevd.models.LeNet300(svd=sparsity is not None)
        x, y = torch.randn(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen)
    else:
        model = (nn.Sequential(LinearSVDO(size, size, train_clip=True)) if sparsity is not None
                 else nn.Sequential(nn.Linear(size, size)))
        x, y = torch.randn(256, size, generator=gen), None
    if sparsity is not None:
        layers = [m for m in model.modules() if isinstance(m, LinearSVDO)]
        names = ("fc1", "fc2", "fc3") if workload == "lenet300" else ("fc2",)
        for m, name in zip(layers, names):
            m.train_clip = True
            cols, rows, _ = STRUCTURE[name]
            set_mask(m, sparsity, cols, rows, gen)
    return model.to(device).train(), x.to(device), None if y is None else y.to(device)


def _step(model, x, y, sgvlb):
    params = [p for p in model.parameters()]

    def step():
        for p in params:
            p.grad = None
        out = model(x)
        if y is None:
            loss = out.sum()
        elif sgvlb is not None:
            loss = sgvlb(out, y)
        else:
            loss = F.cross_entropy(out, y) * 60000
        loss.backward()
    return step


def bench_train(args, env) -> List[dict]:
    rows: List[dict] = []
    device = torch.device(args.device)
    for workload in args.workloads:
        gen = torch.Generator().manual_seed(0)
        fns, actual = {}, {}
        for s in [None] + list(args.sparsity):
            model, x, y = _train_model(workload, args.layer, s, device, gen)
            sgvlb = None
            if s is not None:
                actual[s] = 1 - sum(float(m.mask().sum()) for m in model.modules()
                                    if isinstance(m, LinearSVDO)) / sum(
                    m.weight.numel() for m in model.modules() if isinstance(m, LinearSVDO))
                if y is not None:
                    sgvlb = sparsevd.SGVLB(model, 60000, kl_warmup_epochs=0)
            fns["dense" if s is None else f"sparsevd@{s}"] = _step(model, x, y, sgvlb)
        times = common.time_interleaved(fns, args.device, args.rounds, args.min_run_time)
        base = times[f"sparsevd@{args.sparsity[0]}"][0] if args.sparsity else None
        batch = 100 if workload == "lenet300" else 256
        shape = "batch=100" if workload == "lenet300" else f"M=256,K={args.layer},N={args.layer}"
        for k, t in times.items():
            s = None if k == "dense" else float(k.split("@")[1])
            extra = {} if s is None else {"sparsity": s, "actual_sparsity": round(actual[s], 5),
                                          "ratio_to_0": t[0] / base}
            rows.append(common.make_row(
                f"masked_train_step_{workload}", shape, "float32", "fwd+bwd",
                "dense" if s is None else "sparsevd", t, env, batch=batch, train_clip=True,
                structure=None if s is None else "trained-lenet300", load1=round(os.getloadavg()[0], 2),
                **extra))
        for r in rows[-len(times):]:
            ratio = f"  {r['ratio_to_0']:.2f}x the 0 % step" if "ratio_to_0" in r else ""
            print(f"{r['benchmark']:<28} {r['provider']:<9} sparsity {str(r.get('sparsity')):<5} "
                  f"{r['median_ms']:9.3f} ms{ratio}")
    return rows


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def _transformer(args, sparsity: float, gen) -> nn.Module:
    torch.manual_seed(0)
    model = sparsevd.models.TransformerEncoderLike(hidden=args.hidden, layers=args.layers,
                                                   heads=args.heads, svd=True)
    for m in model.modules():
        if isinstance(m, LinearSVDO):
            set_mask(m, sparsity, gen=gen)
    return model.to(args.device).eval()


def bench_infer(args, env) -> List[dict]:
    rows: List[dict] = []
    gen = torch.Generator().manual_seed(1)
    for s in args.infer_sparsity:
        model = _transformer(args, s, gen)
        dense = dense_twin(model)
        t0 = time.perf_counter()
        deployed = sparsevd.deploy(model)
        deploy_s = time.perf_counter() - t0
        layers = [m for m in deployed.modules() if isinstance(m, SparseLinear)]
        for b in args.batch:
            x = torch.randn(b, args.seq, args.hidden, generator=gen).to(args.device)
            fns = {"dense": lambda: dense(x), "eval": lambda: model(x), "sparsevd": lambda: deployed(x)}
            with torch.no_grad():
                times = common.time_interleaved(fns, args.device, args.rounds, args.min_run_time)
            plan = dict(Counter(m.mode_for(b * args.seq) for m in layers))
            shape = f"B={b},T={args.seq},hidden={args.hidden},layers={args.layers}"
            for k, t in times.items():
                extra = {"deploy_s": round(deploy_s, 3), "plan": plan} if k == "sparsevd" else {}
                rows.append(common.make_row("transformer_infer", shape, "float32", "infer", k, t, env,
                                            sparsity=s, batch=b, seq=args.seq,
                                            load1=round(os.getloadavg()[0], 2), **extra))
            common.print_rows(rows[-len(times):])
        print(f"  sparsity {s}: deploy {deploy_s:.2f} s, plan at B=1: "
              f"{dict(Counter(m.mode_for(args.seq) for m in layers))}")
    return rows


@torch.no_grad()
def bench_call(args, env) -> List[dict]:
    gen = torch.Generator().manual_seed(2)
    n = args.hidden
    lin = nn.Linear(n, n).to(args.device).eval()
    w = lin.weight * (torch.rand(n, n, generator=gen) >= 0.23).to(lin.weight.device)
    lin.weight.copy_(w)
    fast = SparseLinear.from_dense(w, lin.bias, plan="masked")
    general = SparseLinear.from_dense(w, lin.bias, plan=[(0, "csr"), (None, "masked")])
    x = torch.randn(1, n, generator=gen).to(args.device)
    fns = {"dense": lambda: lin(x), "sparsevd": lambda: fast(x),
           "sparsevd_general": lambda: general(x)}
    times = common.time_interleaved(fns, args.device, args.rounds, args.min_run_time)
    rows = [common.make_row("sparse_linear_call", f"M=1,K={n},N={n}", "float32", "infer", k, t, env,
                            sparsity=0.23, batch=1, plan="masked") for k, t in times.items()]
    common.print_rows(rows)
    d = times["dense"][0]
    print(f"  per call over nn.Linear: masked plan {1e3 * (times['sparsevd'][0] - d):+.2f} µs, "
          f"general path {1e3 * (times['sparsevd_general'][0] - d):+.2f} µs")
    return rows


def _adam_step(opt_cls, params, grads, moments):
    """A closure: reset the moments to ``moments`` (m, v per parameter), then one step."""
    opt = opt_cls(params, lr=1e-3, fused=True)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # creates the state

    def step():
        for p, (m, v) in zip(params, moments):
            opt.state[p]["exp_avg"].copy_(m)
            opt.state[p]["exp_avg_sq"].copy_(v)
        opt.step()
    return step


def bench_adam(args, env) -> List[dict]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(300, 784), (100, 300), (10, 100)]  # LeNet-300-100's weights: θ and log σ² each
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes for _ in range(2)]
    grads, moments = [], {"normal": [], "subnormal": []}
    for p in params:
        kept = (torch.rand(p.shape, generator=gen) >= args.clipped).float()
        grads.append(torch.randn(p.shape, generator=gen) * kept)
        for name, (m0, v0) in (("normal", (1e-3, 1e-6)), ("subnormal", (1e-39, 1e-39))):
            moments[name].append((torch.where(kept > 0, 1e-3, m0), torch.where(kept > 0, 1e-6, v0)))
    fns = {}
    for name, cls in (("torch", torch.optim.Adam), ("sparsevd", FlushingAdam)):
        for kind in ("normal", "subnormal"):
            fns[f"{name}/{kind}"] = _adam_step(cls, [p.detach().clone().requires_grad_() for p in params],
                                               grads, moments[kind])
    # one thread: the thread's CPU time (stable on a loaded machine); else wall time
    timer = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = common.time_interleaved(fns, "cpu", args.rounds, args.min_run_time, timer=timer)
    n = sum(p.numel() for p in params)
    rows = []
    for key, t in times.items():
        provider, kind = key.split("/")
        rows.append(common.make_row("adam_subnormal", f"params={n},clipped={args.clipped}", "float32", "train",
                                    provider, t, env, moments=kind,
                                    ratio_to_normal=t[0] / times[f"{provider}/normal"][0]))
    common.print_rows(rows)
    for provider in ("torch", "sparsevd"):
        print(f"  {provider} Adam: subnormal / normal moments = "
              f"{times[provider + '/subnormal'][0] / times[provider + '/normal'][0]:.2f}x")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["train", "infer", "call", "adam"],
                    choices=("train", "infer", "call", "adam"))
    ap.add_argument("--workloads", nargs="+", default=["layer", "lenet300"], choices=("layer", "lenet300"))
    ap.add_argument("--layer", type=int, default=1024, help="size of the square layer workload")
    ap.add_argument("--sparsity", type=float, nargs="+", default=list(TRAIN_SPARSITY),
                    help="training sparsities; the first is the ratios' base (0)")
    ap.add_argument("--infer-sparsity", type=float, nargs="+", default=list(INFER_SPARSITY))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="transformer batches")
    ap.add_argument("--seq", type=int, default=16, help="transformer sequence length")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--clipped", type=float, default=0.9, help="adam part: fraction of clipped weights")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--min-run-time", type=float, default=0.2, help="seconds per provider per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    common.add_common_args(ap)
    args = common.parse_args(ap, argv)
    for name in ("layer", "seq", "hidden", "layers", "heads", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected a positive int")
    if not 0 <= args.clipped <= 1:
        ap.error(f"--clipped: expected a fraction in [0, 1], got {args.clipped}")
    if any(not 0 <= s < 1 for s in args.sparsity + args.infer_sparsity):
        ap.error("--sparsity / --infer-sparsity: expected fractions in [0, 1)")
    if args.hidden % args.heads:
        ap.error(f"--heads: --hidden {args.hidden} must be divisible by it")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.quick:
        args.rounds, args.min_run_time = min(args.rounds, 2), min(args.min_run_time, 0.02)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(args.device)
    # the heap settings fit() uses for CPU training (sparsevd.allocator)
    env["keep_freed_memory"] = args.device == "cpu" and keep_freed_memory()
    rows: List[dict] = []
    if "call" in args.parts:
        rows += bench_call(args, env)
    if "train" in args.parts:
        rows += bench_train(args, env)
    if "infer" in args.parts:
        rows += bench_infer(args, env)
    if "adam" in args.parts:
        rows += bench_adam(args, env)
    if not args.no_save:
        print("saved to", common.save_rows(rows, args.device, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
