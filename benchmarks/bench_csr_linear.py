"""Sparse deployment benchmarks: csr_linear and deployed layers vs dense and torch.sparse.

1. ``sparse_linear``: a 4096x4096 weight with random masks at 90/95/98/99 % sparsity, batches
   1/16/64/256, mode "infer". Providers:
   - ``dense``: F.linear with the masked weight (MKL on CPU, cuBLAS on GPU);
   - ``torch_csr``: the weight as a torch CSR tensor (MKL sparse / cuSPARSE), in the fastest form
     measured: on the CPU ``torch.addmm(b[:, None], W, x.t()).t()`` (7-11 % faster than
     ``torch.sparse.mm(W, x.t()).t() + b`` at batch 16-256 on an Intel Xeon; both give the
     transposed, column-major y that sparsevd writes row-major; NOTES), on CUDA the latter;
   - ``sparsevd_csr``: the kernel alone, torch.ops.sparsevd.csr_linear (int16 columns);
   - ``sparsevd``: the deployed SparseLinear, running what its measured plan picks at that batch.
2. ``lenet300_infer``: LeNet-300-100 end to end, dense (nn.Linear, masked weights) vs deployed
   (sparsevd.deploy), batches 1/16/64/256. The sparse model is a trained checkpoint when
   ``--checkpoint DIR`` is given, else a synthetic one with the layer densities of sparse VD on
   MNIST (Molchanov et al. 2017, LeNet-300-100: 68x compression): fc1 1.1 %, fc2 3 %, fc3 20 %
   of the weights kept, 48 % of fc1's and 35 % of fc2's neurons dead, 30 % of the pixels unused.

Timing (../shared/BENCHMARKS.md): providers are timed interleaved, in several rounds, on the same
inputs; CPU: torch.utils.benchmark blocked runs, median / p20 / p80 over all blocks of all rounds,
with torch's thread count; GPU: triton.testing.do_bench (L2 flushed). Rows are appended to
benchmarks/results/<device-slug>-<date>.json; each row records the 1-minute load average.

3. ``--against REV [REV ...]``: the cost of a change to the CPU kernel, in one process. The kernel
   source of other git revisions (csrc/cpu/csr_linear_cpu.cpp and the headers it includes) is
   built as a separate op library, its namespace renamed to ``csr_<hash>``, loaded beside the
   installed sparsevd._C and timed against it on the inputs of (1) (fp32, int16 columns, bias).
   One thread, the calling thread's CPU time, the builds interleaved in each round in an order
   that alternates between rounds (default 40 rounds of 20 ms each). Printed per shape: median
   (and 10th percentile) ms per build and the ratio current / other: the median of the per-round
   ratios of the round medians (quartiles in brackets), and the ratio of the 10th percentiles (on
   a shared machine other processes only add time). A REV is a git revision, ``worktree`` (the
   files as they are) or ``file:PATH`` (that kernel source with the work tree's headers), with
   optional ``+FLAG`` compiler flags (``worktree+-DVARIANT``). ``--nonfinite`` adds inputs with
   one NaN per batch row (the rare fix-up path). Nothing is saved.

Usage: python -m benchmarks.bench_csr_linear [--device cpu|cuda] [--dtype float32 float16]
       [--sparsity 0.9 0.95 0.98 0.99] [--batch 1 16 64 256] [--rounds 3] [--checkpoint DIR]
       [--threads N] [--timer wall|cpu] [--skip-linear] [--skip-lenet] [--quick] [--out FILE]
       [--no-save] [--dry-run] [--against REV ... [--nonfinite]]

On a machine shared with other jobs, wall-clock times of multi-threaded runs are quantized by the
scheduler (a parallel region waits for its descheduled threads); ``--threads 1 --timer cpu``
measures the calling thread's CPU time instead, which other processes do not inflate.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from . import common

import sparsevd
import sparsevd.models
from sparsevd.planner import plan_layer
from sparsevd.nn import SparseLinear
from sparsevd.ops.csr_linear.format import to_csr
from sparsevd.ops.library import kernel_available

K = N = 4096


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def torch_csr_linear(x, w_csr, b):
    """y = x W^T + b in torch.sparse's fastest form measured (the module docstring): y comes
    back column-major, as torch computes it (W x^T)."""
    if x.device.type == "cpu":
        return torch.addmm(b[:, None], w_csr, x.t()).t()
    return torch.sparse.mm(w_csr, x.t()).t() + b


def bench_linear(args, env) -> List[dict]:
    rows = []
    device = args.device
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for sparsity in args.sparsity:
            g = torch.Generator(device="cpu").manual_seed(0)
            mask = torch.rand(N, K, generator=g) >= sparsity
            w = (torch.randn(N, K, generator=g) * mask).to(device=device, dtype=dtype)
            b = torch.randn(N, generator=g).to(device=device, dtype=dtype)
            nnz = int(mask.sum())
            crow, col, val = to_csr(w)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w_torch_csr = w.to_sparse_csr()
            layer = SparseLinear.from_dense(w, b)
            plan_layer(layer, cost_model="measure", buckets=tuple(args.batch))
            for batch in args.batch:
                x = torch.randn(batch, K, device=device, dtype=dtype)
                fns = {
                    "dense": lambda: F.linear(x, w, b),
                    "torch_csr": lambda: torch_csr_linear(x, w_torch_csr, b),
                }
                if kernel_available(torch.device(device)):
                    fns["sparsevd_csr"] = lambda: torch.ops.sparsevd.csr_linear(x, crow, col, val, b)
                fns["sparsevd"] = lambda: layer(x)
                with torch.no_grad():
                    times = common.time_interleaved(fns, device, args.rounds, args.min_run_time, args.timer)
                es = torch.finfo(dtype).bits // 8
                io = batch * K * es + batch * N * es + N * es
                floors = {  # bytes each provider must move at least, and its FLOPs
                    "dense": (N * K * es + io, 2.0 * N * K * batch),
                    "torch_csr": (nnz * (es + 8) + (N + 1) * 8 + io, 2.0 * nnz * batch),
                    "sparsevd_csr": (nnz * (es + col.element_size()) + (N + 1) * 4 + io, 2.0 * nnz * batch),
                }
                floors["sparsevd"] = floors["sparsevd_csr"]
                shape = f"M={batch},K={K},N={N}"
                for prov, t in times.items():
                    nbytes, flops = floors[prov]
                    extra = {"plan": layer.mode_for(batch)} if prov == "sparsevd" else {}
                    rows.append(common.make_row(
                        "sparse_linear", shape, dtype_name, "infer", prov, t, env, nbytes=nbytes,
                        flops=flops, sparsity=sparsity, batch=batch, nnz=nnz, load1=_load(),
                        timer=args.timer, **extra))
                common.print_rows(rows[-len(times):])
    return rows


@torch.no_grad()
def synthetic_lenet300(seed: int = 0) -> torch.nn.Module:
    """LeNet-300-100 with sparse-VD-like sparsity (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    model = sparsevd.models.LeNet300().eval()
    fc1, fc2, fc3 = model[1], model[3], model[5]

    def set_density(layer, density, dead_rows=0.0, dead_cols=0.0):
        keep = torch.rand(layer.weight.shape, generator=g) < density
        if dead_rows:
            keep[torch.rand(layer.weight.shape[0], generator=g) < dead_rows] = False
        if dead_cols:
            keep[:, torch.rand(layer.weight.shape[1], generator=g) < dead_cols] = False
        layer.log_sigma2.fill_(-10.0)
        layer.weight.abs_().clamp_(min=1e-2)  # kept weights stay kept (log α ≈ −10 − log θ²)
        layer.weight.mul_(torch.randint(0, 2, layer.weight.shape, generator=g) * 2 - 1)
        layer.log_sigma2[~keep] = 20.0

    set_density(fc1, 0.011 / (1 - 0.48) / (1 - 0.30), dead_rows=0.48, dead_cols=0.30)
    set_density(fc2, 0.03 / (1 - 0.35), dead_rows=0.35)
    set_density(fc3, 0.20)
    return model


def bench_lenet(args, env) -> List[dict]:
    from sparsevd.compare import dense_twin

    if args.checkpoint:
        from sparsevd.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        model = synthetic_lenet300()
        source = "synthetic"
    device = args.device
    model = model.to(device).eval()
    dense = dense_twin(model)
    deployed = sparsevd.deploy(model, torch.randn(1, 1, 28, 28, device=device), cost_model="measure",
                               buckets=tuple(args.batch))
    rep = sparsevd.report(model)
    print(f"LeNet-300-100 ({source}): {rep.nonzero} of {rep.params} weights kept "
          f"({rep.sparsity:.2f} % sparsity)")
    print(deployed)
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 1, 28, 28, device=device)
        with torch.no_grad():
            diff = (dense(x) - deployed(x)).abs().max().item()
            times = common.time_interleaved({"dense": lambda: dense(x), "sparsevd": lambda: deployed(x)},
                                      device, args.rounds, args.min_run_time, args.timer)
        for prov, t in times.items():
            rows.append(common.make_row(
                "lenet300_infer", f"M={batch},784-300-100-10" + (",checkpoint" if args.checkpoint else ""),
                "float32", "infer", prov, t, env,
                sparsity=round(rep.sparsity / 100, 4), batch=batch, model=source, max_abs_diff=diff,
                load1=_load(), timer=args.timer))
        common.print_rows(rows[-2:])
    return rows


# ------------------------------------------------------------------ builds of other revisions
ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = ("csrc/cpu/csr_linear_cpu.cpp", "csrc/cpu/csr_linear_cpu.h", "csrc/cpu/simd/transpose8.h",
                  "csrc/csr_linear_checks.h", "csrc/cpu/denormals.h", "csrc/cpu/csr_spmm_tile.h",
                  "csrc/cpu/simd/compress8.h", "csrc/cpu/simd/isa_avx2.h", "csrc/cpu/simd/isa_avx512.h")
#: Headers that older kernels did not include (absent at their revisions: not copied).
ADDED_LATER = ("csrc/cpu/denormals.h", "csrc/cpu/csr_spmm_tile.h", "csrc/cpu/simd/compress8.h")
#: Earlier paths of KERNEL_SOURCES, for revisions before the rename (issue 22).
FORMER_PATHS = {"csrc/csr_linear_checks.h": "csrc/csr_checks.h"}
SCHEMA = "csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias) -> Tensor"


def _read_source(rev: str, path: str) -> str:
    if rev.startswith("file:"):  # that kernel, the headers of the work tree
        return Path(rev[5:]).read_text() if path == KERNEL_SOURCES[0] else (ROOT / path).read_text()
    if rev == "worktree":
        return (ROOT / path).read_text()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def _source_of(rev: str, path: str):
    """(the path the file has at ``rev``, its text): a git revision from before a rename reads
    the file under its former path (FORMER_PATHS), which its kernel includes; a header the kernel
    did not include yet (ADDED_LATER) has the text None."""
    if rev.startswith("file:") or rev == "worktree" or (path not in FORMER_PATHS and path not in ADDED_LATER):
        return path, _read_source(rev, path)
    try:
        return path, _read_source(rev, path)
    except subprocess.CalledProcessError:
        if path in ADDED_LATER:
            return path, None
        return FORMER_PATHS[path], _read_source(rev, FORMER_PATHS[path])


def build_kernel(spec: str) -> Callable:
    """The CPU op of ``spec`` (REV[+FLAG...]) built as op library csr_<hash> (see the docstring)."""
    from torch.utils.cpp_extension import load

    rev, *flags = spec.split("+")
    texts = {path: text for path, text in (_source_of(rev, p) for p in KERNEL_SOURCES) if text is not None}
    ns = "csr_" + hashlib.sha1(("\0".join([*texts.values(), *flags])).encode()).hexdigest()[:10]
    src_dir = Path(tempfile.gettempdir()) / "sparsevd_csr_builds" / ns
    for path, text in texts.items():
        text = text.replace("namespace sparsevd {", f"namespace {ns} {{").replace("sparsevd::", f"{ns}::")
        text = re.sub(r"TORCH_LIBRARY_IMPL\(sparsevd, CPU, m\)",
                      f'TORCH_LIBRARY({ns}, m) {{ m.def("{SCHEMA}"); }}\nTORCH_LIBRARY_IMPL({ns}, CPU, m)', text)
        dst = src_dir / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
    load(name=ns, sources=[str(src_dir / KERNEL_SOURCES[0])], is_python_module=False,
         extra_cflags=["-O3", "-std=c++20", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])
    return getattr(torch.ops, ns).csr_linear


def _quantile(v: List[float], q: float) -> float:
    v = sorted(v)
    return v[min(int(q * len(v)), len(v) - 1)]


def _compare(fns: Dict[str, Callable[[], object]], rounds: int, min_run_time: float):
    """Per provider (median ms, p10 ms) over all samples, and per other provider the per-round
    ratios first provider / it of the round medians."""
    names = list(fns)
    for fn in fns.values():
        fn()
    per_round: Dict[str, List[float]] = {k: [] for k in names}
    samples: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            s = common.cpu_time_samples(fns[k], min_run_time)
            samples[k].extend(s)
            per_round[k].append(statistics.median(s))
    stats = {k: (statistics.median(v), _quantile(v, 0.1)) for k, v in samples.items()}
    ratios = {k: [a / b for a, b in zip(per_round[names[0]], per_round[k])] for k in names[1:]}
    return stats, ratios


def bench_against(args) -> int:
    others = {spec: build_kernel(spec) for spec in args.against}
    current = torch.ops.sparsevd.csr_linear
    print(f"threads 1, thread CPU time, {args.rounds} rounds of {args.min_run_time} s, "
          f"load {os.getloadavg()}")
    print("sparsity    M  current ms (p10) " + " ".join(
        f"| {s[:14]:>14} ms (p10)  ratio: rounds (p25-p75), p10" for s in others))
    for sparsity in args.sparsity:
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(N, K, generator=g) >= sparsity
        w = torch.randn(N, K, generator=g) * mask
        b = torch.randn(N, generator=g)
        crow, col, val = to_csr(w)
        for batch in args.batch:
            xs = [("", torch.randn(batch, K, generator=g))]
            if args.nonfinite:
                xn = xs[0][1].clone()
                xn[torch.arange(batch), torch.randint(0, K, (batch,), generator=g)] = float("nan")
                xs.append((" [one NaN per row]", xn))
            for label, x in xs:
                fns = {"current": lambda: current(x, crow, col, val, b)}
                fns.update({spec: (lambda op=op: op(x, crow, col, val, b)) for spec, op in others.items()})
                with torch.no_grad():
                    st, ratios = _compare(fns, args.rounds, args.min_run_time)
                row = f"{sparsity:8.2f} {batch:4d}  {st['current'][0]:9.4f} ({st['current'][1]:.4f})  "
                for spec in others:
                    r = ratios[spec]
                    row += (f"| {st[spec][0]:14.4f} ({st[spec][1]:.4f})  {statistics.median(r):6.3f} "
                            f"({_quantile(r, 0.25):.3f}-{_quantile(r, 0.75):.3f}), "
                            f"{st['current'][1] / st[spec][1]:.3f} ")
                print(row + label, flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=None,
                   help="default: float32 on CPU, float16 and float32 on CUDA")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per configuration (default 3; 40 with --against)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="CPU seconds per provider per round (default 0.2; 0.02 with --against)")
    p.add_argument("--checkpoint", default=None, help="trained LeNet-300-100 (sparsevd train --out DIR)")
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--skip-lenet", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default) or thread CPU time (needs --threads 1; for loaded machines)")
    p.add_argument("--against", nargs="+", metavar="REV", default=None,
                   help="time the CPU kernel of these revisions against the installed one (see above)")
    p.add_argument("--nonfinite", action="store_true", help="with --against: also one NaN per batch row")
    common.add_common_args(p)
    args = common.parse_args(p, argv)
    if args.rounds is None:
        args.rounds = 40 if args.against else 3
    if args.min_run_time is None:
        args.min_run_time = 0.02 if args.against else 0.2
    if args.quick:
        args.rounds, args.min_run_time = 1, min(args.min_run_time, 0.05)
    if args.against:
        if args.device != "cpu":
            p.error("--against times the CPU kernel: needs --device cpu")
        torch.set_num_threads(1)
        return bench_against(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timer == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--timer cpu needs --device cpu and --threads 1")
    if args.dtype is None:
        args.dtype = ["float16", "float32"] if args.device.startswith("cuda") else ["float32"]
    env = common.environment(args.device)
    print(f"device: {env['device']}, threads {env['threads']}, torch {env['torch']}, "
          f"load {os.getloadavg()}")
    rows = []
    if not args.skip_linear:
        rows += bench_linear(args, env)
    if not args.skip_lenet:
        rows += bench_lenet(args, env)
    if not args.no_save and rows:
        path = common.save_rows(rows, args.device, args.out)
        print(f"saved {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
