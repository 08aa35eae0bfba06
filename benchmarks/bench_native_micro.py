"""Micro-benchmarks of the ``native`` CPU backend (csrc/cpu) against the reference backend and dense.

Every section times its cases in interleaved rounds in this one process (each round runs every
case ``--reps`` times after one warm-up call, case after case; the figure of a round is the median
of its reps, the result the median over ``--rounds`` rounds), for each thread count of
``--threads``. Ratios between cases of one section are the numbers to read: on a shared machine
absolute times drift by 2x between minutes, ratios from interleaved rounds much less.

Sections (``--sections``):
  noise   ns/element of ``sparsevd::philox_randn_`` (1M elements) with the portable scalar kernel
          (the previous implementation: scalar Philox + libm log/cos), AVX2 and AVX-512, and the
          torch-ops specification ``randn_torch``;
  linear  LRT linear forward + backward (x requires grad) at LeNet-300-100's shapes, B = 100
          (784→300, 300→100, 100→10), and 1024→1024 at B = 256: dense F.linear, reference, native;
  kl      the KL of LeNet-300-100's three layers, value + both gradients (the op) and op +
          backward: reference vs native;
  kept    the native KL op (value + both gradients; value only) without and with the per-layer
          count of the weights kept at evaluation, and the op followed by functional.kept_count per
          layer (the count as a pass of its own), at LeNet-300-100's and MiniLM-L6's linear shapes,
          log α dense around −3 and 90 % clamped;
  products the two forward / four backward GEMMs of an LRT linear layer (LeNet fc1 100x784->300
          and 256x1024->1024): one after the other (mm, each multi-threaded), concurrently (one
          single-threaded mm per thread: the native op with native_set_products), and as one bmm
          of stacked operands (stacking not timed); and the native op's fwd+bwd in both modes;
  xi      what keeping ξ instead of regenerating it would save: regenerating ξ of each LeNet layer's
          output (philox_randn_) vs streaming a stored copy once (sum), and σ² = exp(log σ²) per
          layer (the work the backward's σ² reuse saves);
  step    one LeNet-300-100 training step at B = 100 (forward, SGVLB with β = 1, backward, Adam):
          dense nn.Linear + cross-entropy vs sparsevd.convert + SGVLB under
          SPARSEVD_BACKEND=reference and =native, each with and without the per-forward NaN check
          of sparsevd.functional (CHECK_NAN; the native KL's non-finite flags make it redundant),
          and dense vs native with torch's fused Adam (fused=True) instead of the default one.

``--profile`` prints a torch.profiler table of native training steps (after the timings) and the
share of the step per category (GEMM, Adam, KL, LRT kernels, ...).

Usage: python -m benchmarks.bench_native_micro [--rounds 5] [--reps 20] [--threads 1 2] [--timer wall|cpu]
       [--sections noise linear kl kept products xi step] [--profile] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsevd
import sparsevd.functional as SF
from sparsevd._files import atomic_write_bytes
from sparsevd.allocator import keep_freed_memory
from sparsevd.metadata import cpu_name
from sparsevd.loss import SGVLB
from sparsevd.ops import noise

LENET = [(100, 784, 300), (100, 300, 100), (100, 100, 10)]
BIG = [(256, 1024, 1024)]


@contextlib.contextmanager
def backend(name: str):
    old = os.environ.get("SPARSEVD_BACKEND")
    os.environ["SPARSEVD_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPARSEVD_BACKEND", None)
        else:
            os.environ["SPARSEVD_BACKEND"] = old


CLOCK = time.perf_counter  # --timer cpu: time.thread_time (one thread only; robust to a busy machine)


def interleaved(cases: Dict[str, Callable[[], object]], rounds: int, reps: int) -> Dict[str, float]:
    """Median over rounds of the per-round median time (seconds) of each case."""
    per_round: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            fn()
            ts = []
            for _ in range(reps):
                t0 = CLOCK()
                fn()
                ts.append(CLOCK() - t0)
            per_round[name].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in per_round.items()}


def report(title: str, times: Dict[str, float], base: str, unit: float = 1e3, unit_name: str = "ms",
           rows: List[dict] = None, **meta) -> None:
    print(f"\n{title}")
    for name, t in times.items():
        ratio = t / times[base] if base in times else float("nan")
        print(f"  {name:<34} {t * unit:10.4f} {unit_name}   {ratio:6.2f}x {base}")
        if rows is not None:
            rows.append({"section": title, "case": name, "seconds": t, f"ratio_vs_{base}": ratio, **meta})


# ---------------------------------------------------------------------------------------- noise
def bench_noise(args, rows):
    n = 1 << 20
    out = torch.empty(n, dtype=torch.float32)
    seed = 123456789
    cases = {}
    for isa in ("scalar", "avx2", "avx512"):
        try:
            torch.ops.sparsevd.native_set_isa(isa)
        except RuntimeError:
            continue

        def run(isa=isa):
            torch.ops.sparsevd.native_set_isa(isa)
            torch.ops.sparsevd.philox_randn_(out, seed, 0)

        cases[f"philox_randn_ {isa}" + (" (previous)" if isa == "scalar" else "")] = run
    cases["randn_torch (torch-ops spec)"] = lambda: noise.randn_torch(seed, n // 16)
    times = interleaved(cases, args.rounds, max(3, args.reps // 4))
    torch.ops.sparsevd.native_set_isa("auto")
    times["randn_torch (torch-ops spec)"] *= 16  # timed on n / 16 elements
    report(f"noise, ns/element, {torch.get_num_threads()} thread(s)", {k: v / n for k, v in times.items()},
           base="philox_randn_ scalar (previous)", unit=1e9, unit_name="ns", rows=rows,
           threads=torch.get_num_threads())


# --------------------------------------------------------------------------------------- linear
def bench_linear(args, rows):
    for m, k, n in LENET + BIG:
        x = torch.randn(m, k, requires_grad=True)
        w = (torch.randn(n, k) / k ** 0.5).requires_grad_()
        ls2 = torch.full((n, k), -6.0).add_(torch.randn(n, k)).requires_grad_()
        b = torch.zeros(n, requires_grad=True)
        g = torch.randn(m, n)
        leaves = [x, w, ls2, b]

        def lrt(name):
            def run():
                for t in leaves:
                    t.grad = None
                with backend(name):
                    SF.lrt_linear(x, w, ls2, b).backward(g)
            return run

        def dense():
            for t in leaves:
                t.grad = None
            F.linear(x, w, b).backward(g)

        cases = {"dense F.linear": dense, "reference": lrt("reference"), "native": lrt("native")}
        times = interleaved(cases, args.rounds, args.reps)
        report(f"LRT linear fwd+bwd {m}x{k}->{n}, {torch.get_num_threads()} thread(s)", times,
               base="reference", rows=rows, threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------- kl
def bench_kl(args, rows):
    ws = [(torch.randn(n, k) / k ** 0.5).requires_grad_() for _, k, n in LENET]
    ls = [torch.full_like(w, -8.0).add_(torch.randn_like(w)).requires_grad_() for w in ws]

    def op(name):
        def run():
            with backend(name):
                torch.ops.sparsevd.kl_sparse_vd(ws, ls, True)
        return run

    def full(name):
        def run():
            for t in ws + ls:
                t.grad = None
            with backend(name):
                SF.kl_sparse_vd_many(ws, ls).backward()
        return run

    cases = {"op reference": op("reference"), "op native": op("native"),
             "op+backward reference": full("reference"), "op+backward native": full("native")}
    times = interleaved(cases, args.rounds, args.reps)
    report(f"KL of LeNet-300-100 (266,200 weights), {torch.get_num_threads()} thread(s)", times,
           base="op reference", rows=rows, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------- kept
#: The kept section's models: LeNet-300-100's weights and the linear layers of a MiniLM-L6 BERT
#: (6 blocks of 384x384 x4, 1536x384, 384x1536: 10.6M weights).
KEPT_MODELS = {"LeNet-300-100": [(n, k) for _, k, n in LENET],
               "MiniLM-L6 linear": [(384, 384)] * 24 + [(1536, 384), (384, 1536)] * 6}


def _kept_params(shapes, sparse: bool):
    """θ ~ N(0, 1/k) and log σ²: log α ~ N(−3, 2²) everywhere ("dense", every lane computed), or
    90 % of the weights far past the clamp (log α ≈ 12: "sparse", a late training step whose
    blocks the fp32 kernel classifies without the log)."""
    ws, ls = [], []
    for n, k in shapes:
        w = torch.randn(n, k) / k ** 0.5
        la = torch.randn(n, k) * 2 - 3
        if sparse:
            la = torch.where(torch.rand(n, k) < 0.9, 12 + torch.rand(n, k), la)
        ws.append(w.requires_grad_())
        ls.append((la + torch.log(w.detach() ** 2 + 1e-8)).requires_grad_())
    return ws, ls


def bench_kept(args, rows):
    """The KL op (value and both gradients, native backend) without and with the kept count of
    every layer (issue 23 item 7), and the op followed by the count as a pass of its own
    (functional.kept_count per layer, what fit ran before). The heap keeps freed memory, as in
    fit (sparsevd.allocator.keep_freed_memory: the gradient buffers fault no pages in)."""
    keep_freed_memory()
    for model, shapes in KEPT_MODELS.items():
        for sparse in (False, True):
            ws, ls = _kept_params(shapes, sparse)
            thrs = [3.0] * len(ws)
            K = torch.ops.sparsevd.native_kl_sparse_vd
            cases = {
                "op": lambda: K(ws, ls, True),
                "op + count": lambda: K(ws, ls, True, thrs),
                "op, then kept_count pass": lambda: (K(ws, ls, True),
                                                     [SF.kept_count(w.detach(), s.detach(), 3.0) for w, s in zip(ws, ls)]),
                "value only": lambda: K(ws, ls, False),
                "value only + count": lambda: K(ws, ls, False, thrs),
            }
            times = interleaved(cases, args.rounds, args.reps)
            n = sum(w.numel() for w in ws)
            report(f"KL with the kept count, {model} ({n:,} weights, {'90 % clamped' if sparse else 'dense'}), "
                   f"{torch.get_num_threads()} thread(s)", times, base="op", rows=rows,
                   threads=torch.get_num_threads(), model=model, sparse=sparse)


# ------------------------------------------------------------------------------------- products
def bench_products(args, rows):
    for m, k, n in [LENET[0]] + BIG:
        x, w, s2, g = torch.randn(m, k), torch.randn(n, k), torch.rand(n, k), torch.randn(m, n)
        xs, ws, gs = torch.stack([x, x * x]), torch.stack([w, s2]), torch.stack([g, g])
        ls2 = s2.log()
        seed = torch.tensor([7])
        _, std = torch.ops.sparsevd.native_lrt_linear(x, w, ls2, None, seed)

        def native(mode, backward):
            def run():
                torch.ops.sparsevd.native_set_products(mode)
                if backward:
                    torch.ops.sparsevd.native_lrt_linear_backward(g, x, w, ls2, std, seed, True)
                else:
                    torch.ops.sparsevd.native_lrt_linear(x, w, ls2, None, seed)
            return run

        cases = {
            "fwd 2x mm": lambda: (torch.mm(x, w.t()), torch.mm(x, s2.t())),
            "fwd bmm (stacked)": lambda: torch.bmm(xs, ws.transpose(1, 2)),
            "bwd 4x mm": lambda: (torch.mm(g, w), torch.mm(g, s2), torch.mm(g.t(), x), torch.mm(g.t(), x)),
            "bwd 2x bmm (stacked)": lambda: (torch.bmm(gs, ws), torch.bmm(gs.transpose(1, 2), xs)),
            "native op fwd, serial": native("serial", False),
            "native op fwd, concurrent": native("concurrent", False),
            "native op bwd, serial": native("serial", True),
            "native op bwd, concurrent": native("concurrent", True),
        }
        times = interleaved(cases, args.rounds, args.reps)
        torch.ops.sparsevd.native_set_products("auto")
        report(f"products {m}x{k}->{n}, {torch.get_num_threads()} thread(s)", times, base="fwd 2x mm",
               rows=rows, threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------- xi
def bench_xi(args, rows):
    cases = {}
    for m, k, n in LENET:
        buf = torch.empty(m * n)
        stored = torch.randn(m * n)
        ls2 = torch.randn(n, k)
        cases[f"regenerate xi {m}x{n}"] = lambda buf=buf: torch.ops.sparsevd.philox_randn_(buf, 5, 0)
        cases[f"read stored xi {m}x{n}"] = lambda stored=stored: stored.sum()
        cases[f"sigma2 = exp(log sigma2) {n}x{k}"] = lambda ls2=ls2: torch.exp(ls2)
    times = interleaved(cases, args.rounds, args.reps)
    report(f"xi and sigma2 per LeNet-300-100 layer, {torch.get_num_threads()} thread(s)", times,
           base=f"regenerate xi {LENET[0][0]}x{LENET[0][2]}", unit=1e6, unit_name="us", rows=rows,
           threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------- step
def lenet300(svd: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                      nn.Linear(100, 10))
    return sparsevd.convert(m) if svd else m


def make_step(kind: str, check_nan: bool = False, adam: str = "default"):
    """A closure running one training step; kind: dense | reference | native; adam: default
    (torch's choice: the per-tensor loop on CPU) or fused (torch._fused_adam_)."""
    x = torch.randn(100, 1, 28, 28)
    y = torch.randint(0, 10, (100,))
    model = lenet300(kind != "dense")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if adam == "fused" else {}))
    loss_fn = SGVLB(model, 60000, kl_warmup_epochs=0) if kind != "dense" else nn.CrossEntropyLoss()

    def step():
        SF.CHECK_NAN = check_nan
        with backend(kind if kind != "dense" else "reference"):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        SF.CHECK_NAN = True

    return step


def bench_step(args, rows):
    cases = {
        "dense": make_step("dense"),
        "reference": make_step("reference"),
        "reference + NaN check": make_step("reference", check_nan=True),
        "native": make_step("native"),
        "native + NaN check": make_step("native", check_nan=True),
        "dense, fused Adam": make_step("dense", adam="fused"),
        "native, fused Adam": make_step("native", adam="fused"),
    }
    times = interleaved(cases, args.rounds, args.reps)
    report(f"LeNet-300-100 training step, B=100, {torch.get_num_threads()} thread(s)", times, base="dense",
           rows=rows, threads=torch.get_num_threads())


CATEGORIES = [  # (category, predicate on a profiler event name), first match wins
    ("GEMM (aten::mm)", lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm")),
    ("sigma2 = exp(log sigma2)", lambda n: n == "aten::exp"),
    ("KL kernel", lambda n: n == "sparsevd::native_kl_sparse_vd"),
    ("LRT fused passes (native ops' own time)", lambda n: n.startswith("sparsevd::native_lrt")),
]


def profile_step(args):
    step = make_step("native")
    for _ in range(10):
        step()
    from torch.profiler import ProfilerActivity, profile

    n = 30
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    print(f"\ntorch.profiler, native LeNet-300-100 step, {torch.get_num_threads()} thread(s), {n} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    # Categories by self time; Adam, the KL backward and autograd bookkeeping from the parent scopes.
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    shares: Dict[str, float] = {}
    events = prof.events()
    for e in events:
        name = e.name
        cat = next((c for c, pred in CATEGORIES if pred(name)), None)
        if cat is None:
            p, chain = e.cpu_parent, []
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            if any("Optimizer.step" in c for c in chain) or "Optimizer.step" in name:
                cat = "Adam (optimizer.step)"
            elif any("kl_sparse_vd" in c for c in chain) or "kl_sparse_vd" in name:
                cat = "KL glue + backward (foreach_mul)"
            elif any("lrt_linear" in c for c in chain) or "lrt_linear" in name:
                cat = "LRT glue (custom op, autograd)"
            else:
                cat = "other (loss, relu, autograd engine, grad accumulation, Python)"
        shares[cat] = shares.get(cat, 0.0) + e.self_cpu_time_total
    print("share of the step's self CPU time:")
    for cat, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<62} {100.0 * t / total:5.1f} %   {t / n / 1e3:7.3f} ms/step")


SECTIONS = {"noise": bench_noise, "linear": bench_linear, "kl": bench_kl, "kept": bench_kept, "products": bench_products,
            "xi": bench_xi, "step": bench_step}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over rounds)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per case per round (median)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--profile", action="store_true", help="torch.profiler of the native training step")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock, or the calling thread's CPU time (valid with --threads 1 only: "
                        "it ignores time the thread waits, e.g. preempted on a busy machine)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    global CLOCK
    if args.timer == "cpu":
        if any(t != 1 for t in args.threads):
            p.error("--timer cpu needs --threads 1 (other threads' work is not counted)")
        CLOCK = time.thread_time
    print(f"torch {torch.__version__}, native kernels: {torch.ops.sparsevd.native_isa()}, timer {args.timer}, "
          f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows: List[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.sections:
            SECTIONS[name](args, rows)
        if args.profile:
            profile_step(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
