"""Shared benchmark helpers: timing (GPU: CUDA events via triton.testing.do_bench, L2 flushed;
CPU: torch.utils.benchmark, or thread CPU time), interleaved timing of several providers
(``time_interleaved``), the result rows of ../shared/BENCHMARKS.md and their JSON files; for the
benchmarks of the Triton kernels their options and device (``add_triton_args``, ``triton_device``),
and for the LRT ops their inputs and fwd / bwd / fwd+bwd rows (``lrt_inputs``, ``time_lrt_modes``).

Every row: benchmark, shape, dtype, mode, provider, median_ms, p20_ms, p80_ms, device, torch,
triton, commit, plus optional sparsity, batch, gbps, tflops, threads.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from sparsevd._files import atomic_write_bytes
from sparsevd.metadata import cpu_name, git_commit

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """torch's name of the GPU, or the CPU model from /proc/cpuinfo."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def device_slug(device: str) -> str:
    """A file-name-safe tag of the device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-2c'."""
    if device.startswith("cuda"):
        name = device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


#: Set by ``--quick``: shorter timing runs (scripts/gpu_check.sh).
QUICK = False


def add_common_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--out``, ``--no-save``, ``--dry-run``."""
    ap.add_argument("--quick", action="store_true",
                    help="short timing runs (a few ms per sample) for a quick check of a machine "
                         "(scripts/gpu_check.sh); the rows are still saved")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="results JSON (default: benchmarks/results/<device-slug>-<date>.json)")
    ap.add_argument("--no-save", action="store_true", help="print the rows, write no file")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the arguments (and that the benchmark imports) and exit 0")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``ap.parse_args(argv)``; with ``--dry-run`` prints what would run and exits 0, with
    ``--quick`` shortens every timing of this process."""
    global QUICK
    args = ap.parse_args(argv)
    if args.dry_run:
        print(f"{ap.prog}: arguments ok: {vars(args)}")
        sys.exit(0)
    QUICK = bool(args.quick)
    return args


def environment(device: str) -> Dict[str, object]:
    """The fields every row carries: device, torch, triton, commit, threads and, on a CPU, the
    vector ISA torch dispatches to (``cpu_capability``: "AVX2", "AVX512", ...; the CPU model
    alone, e.g. "AMD EPYC", does not say it), the kernel set sparsevd's CPU kernels run
    (``sparsevd_isa``) and, when set, ``MKL_ENABLE_INSTRUCTIONS`` (the ISA MKL, and so
    torch.sparse, may use)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit() or "unknown",
        "threads": torch.get_num_threads(),
        **({} if device.startswith("cuda") else cpu_isas()),
    }


def cpu_isas() -> Dict[str, object]:
    """The vector ISAs that torch, sparsevd's kernels and (when restricted) MKL run on this CPU."""
    from sparsevd.ops.library import cpu_isa, has_op

    isas: Dict[str, object] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if has_op("native_isa"):
        isas["sparsevd_isa"] = cpu_isa()
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS"):
        isas["mkl_instructions"] = os.environ["MKL_ENABLE_INSTRUCTIONS"]
    return isas


def time_gpu(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> List[float]:
    """[median, p20, p80] in ms with CUDA events; do_bench flushes L2 between runs."""
    import triton.testing

    if QUICK:
        warmup_ms, rep_ms = 5, 20

    return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.5) -> List[float]:
    """[median, p20, p80] in ms with torch.utils.benchmark, using all of torch's threads."""
    from torch.utils.benchmark import Timer

    if QUICK:
        min_run_time = min(min_run_time, 0.05)

    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    times = sorted(m.times)
    q = lambda p: times[min(int(p * len(times)), len(times) - 1)]  # noqa: E731
    return [1e3 * m.median, 1e3 * q(0.2), 1e3 * q(0.8)]


def time_fn(fn: Callable[[], object], device: str) -> List[float]:
    """[median, p20, p80] in ms on ``device`` ('cuda...' or 'cpu')."""
    return time_gpu(fn) if device.startswith("cuda") else time_cpu(fn)


def grad_timer(device: str) -> Callable[[Callable[[], object], List[torch.Tensor]], List[float]]:
    """A timer ``run(fn, leaves) -> [median, p20, p80] ms`` that resets ``leaves``' .grad before
    each call (so backward passes do not accumulate into old gradients)."""
    if device.startswith("cuda"):
        import triton.testing

        def run(fn, leaves):
            warmup, rep = (5, 20) if QUICK else (25, 100)
            return list(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=leaves,
                                                quantiles=[0.5, 0.2, 0.8]))
        return run

    def run_cpu(fn, leaves):
        def wrapped():
            for t in leaves:
                t.grad = None
            fn()
        return time_cpu(wrapped, min_run_time=0.2)
    return run_cpu


def add_triton_args(ap: argparse.ArgumentParser, modes: Sequence[str], providers: Sequence[str],
                    smoke: str) -> argparse.ArgumentParser:
    """The options of a benchmark of the Triton kernels: --modes, --providers, --device
    (cuda, or cpu: the smoke run), the common ones and --smoke (``smoke``: what it runs)."""
    ap.add_argument("--modes", nargs="+", default=list(modes), choices=list(modes))
    ap.add_argument("--providers", nargs="+", default=list(providers), choices=list(providers))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default); cpu implies --smoke")
    add_common_args(ap)
    ap.add_argument("--smoke", action="store_true",
                    help=f"{smoke} on CPU (kernels in Triton's interpreter), nothing saved")
    return ap


def triton_device(args: argparse.Namespace, name: str,
                  providers: Sequence[str]) -> Optional[tuple]:
    """Where a benchmark of the Triton kernels runs: ``(device, save, providers)``. With
    ``--smoke`` or ``--device cpu``: the CPU, the kernels in Triton's interpreter
    (TRITON_INTERPRET=1, SPARSEVD_BACKEND=triton), nothing saved, no ``reference_compiled`` (its
    C++ build); else a CUDA GPU, the rows saved unless ``--no-save``. None, after a message on
    stderr, when the GPU is asked for and there is none (the caller exits with 2)."""
    if args.smoke or args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["SPARSEVD_BACKEND"] = "triton"
        return "cpu", False, [p for p in providers if p != "reference_compiled"]
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU (the fused kernels are GPU kernels; on CPU they only run in "
              "Triton's interpreter). Run with --smoke for a tiny CPU check of the harness.",
              file=sys.stderr)
        return None
    os.environ.setdefault("SPARSEVD_BACKEND", "triton")
    return "cuda", not args.no_save, list(providers)


def lrt_inputs(x_shape: Sequence[int], w_shape: Sequence[int], y_shape: Sequence[int],
               dtype: torch.dtype, autocast: bool, device: str) -> List[torch.Tensor]:
    """[x, θ, log σ², b, g] of an LRT op benchmark, from a generator seeded 0: x (leaf, requires
    grad) and the upstream gradient g in ``dtype``, θ ~ N(0, 1/fan_in), log σ² ~ U(−12, −4), b ~
    N(0, 1) (out,), leaves requiring grad, in ``dtype`` too unless ``autocast`` (then fp32, as
    autocast keeps parameters)."""
    gen = torch.Generator(device=device).manual_seed(0)
    fan_in = math.prod(w_shape[1:])
    x0 = torch.randn(*x_shape, device=device, generator=gen).to(dtype)
    w = (torch.randn(*w_shape, device=device, generator=gen) / fan_in**0.5).requires_grad_()
    ls2 = torch.empty(*w_shape, device=device).uniform_(-12.0, -4.0, generator=gen).requires_grad_()
    b = torch.randn(w_shape[0], device=device, generator=gen).requires_grad_()
    g = torch.randn(*y_shape, device=device, generator=gen).to(dtype)
    if not autocast:  # fp32 end to end; under autocast the parameters stay fp32
        w.data, ls2.data, b.data = w.data.to(dtype), ls2.data.to(dtype), b.data.to(dtype)
    return [x0.clone().requires_grad_(), w, ls2, b, g]


def time_lrt_modes(benchmark: str, shape: str, dtype_name: str, env: Dict[str, object],
                   providers: Sequence[str], modes: Sequence[str],
                   make_forward: Callable[[str], Callable], tensors: List[torch.Tensor],
                   autocast_dtype: Optional[torch.dtype], batch: int,
                   nbytes: Callable[[str, str], float], flops: Callable[[str, str], float]
                   ) -> List[Dict[str, object]]:
    """Rows of an LRT op (``make_forward(provider)(x, θ, log σ², b)``) per provider and mode:
    "fwd", "bwd" (the backward of one retained forward) and "fwd+bwd", timed by
    :func:`grad_timer` (the leaves' gradients reset per call), under autocast to
    ``autocast_dtype`` when given; ``tensors`` = :func:`lrt_inputs`; ``nbytes`` / ``flops`` of
    (provider, mode) give each row's floor. The "dense" provider gets no log σ² leaf."""
    x, w, ls2, b, g = tensors
    device_type = x.device.type
    timer = grad_timer(device_type)
    rows: List[Dict[str, object]] = []
    for provider in providers:
        fwd_fn = make_forward(provider)
        leaves = [x, w, b] if provider == "dense" else [x, w, ls2, b]

        def forward():
            if autocast_dtype is None:
                return fwd_fn(x, w, ls2, b)
            with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                return fwd_fn(x, w, ls2, b)

        for mode in modes:
            if mode == "fwd":
                fn = forward
            elif mode == "bwd":
                y = forward()
                fn = lambda y=y: y.backward(g, retain_graph=True)  # noqa: E731
            else:
                fn = lambda: forward().backward(g)  # noqa: E731
            rows.append(make_row(
                benchmark, shape, dtype_name, mode, provider, timer(fn, leaves), env, batch=batch,
                nbytes=nbytes(provider, mode), flops=flops(provider, mode),
                **({"compile_mode": "default"} if provider == "reference_compiled" else {}),
            ))
            print_rows(rows[-1:])
    return rows


def cpu_time_samples(fn: Callable[[], object], min_run_time: float) -> List[float]:
    """Per-call thread CPU times (ms) of blocks of calls of >= 2 ms, for min_run_time seconds."""
    out: List[float] = []
    start = time.thread_time()
    while time.thread_time() - start < min_run_time:
        calls, t0 = 0, time.thread_time()
        while True:
            fn()
            calls += 1
            if time.thread_time() - t0 >= 2e-3:
                break
        out.append(1e3 * (time.thread_time() - t0) / calls)
    return out


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, rounds: int,
                     min_run_time: float, timer: str = "wall") -> Dict[str, List[float]]:
    """[median, p20, p80] ms per provider; providers alternate within each round.

    timer "wall": torch.utils.benchmark blocked runs (CPU) or do_bench (GPU); "cpu": the calling
    thread's CPU time (valid with one thread only; it ignores the time other processes hold the
    core, so it is stable on a loaded machine)."""
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (MKL/oneDNN primitives, caching allocator)
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            if timer == "cpu":
                samples[k].extend(cpu_time_samples(fn, min_run_time))
            elif device.startswith("cuda"):
                samples[k].append(time_gpu(fn)[0])
            else:
                from torch.utils.benchmark import Timer

                m = Timer(stmt="fn()", globals={"fn": fn},
                          num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
                samples[k].extend(1e3 * t for t in m.times)
    out = {}
    for k, v in samples.items():
        v = sorted(v)
        q = lambda p: v[min(int(p * len(v)), len(v) - 1)]  # noqa: E731
        out[k] = [q(0.5), q(0.2), q(0.8)]
    return out


def make_row(
    benchmark: str, shape: str, dtype: str, mode: str, provider: str, times_ms: List[float],
    env: Dict[str, object], *, nbytes: Optional[float] = None, flops: Optional[float] = None,
    **extra,
) -> Dict[str, object]:
    """One result row; ``nbytes`` / ``flops`` (the kernel's floor) give gbps / tflops."""
    median, p20, p80 = times_ms
    row = {
        "benchmark": benchmark, "shape": shape, "dtype": dtype, "mode": mode, "provider": provider,
        "median_ms": median, "p20_ms": p20, "p80_ms": p80, **env, **extra,
    }
    if nbytes is not None:
        row["gbps"] = nbytes / (median * 1e-3) / 1e9
    if flops is not None:
        row["tflops"] = flops / (median * 1e-3) / 1e12
    return row


def results_path(device: str, day: Optional[str] = None) -> Path:
    """benchmarks/results/<device-slug>-<YYYYMMDD>.json."""
    day = day or datetime.date.today().strftime("%Y%m%d")
    return RESULTS_DIR / f"{device_slug(device)}-{day}.json"


def save_rows(rows: List[Dict[str, object]], device: str, path: Optional[Path] = None) -> Path:
    """Append ``rows`` to the device's results file for today, replacing rows with the same
    (benchmark, shape, dtype, mode, provider, sparsity, batch, threads) key; returns the path."""
    path = Path(path) if path else results_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    keys = ("benchmark", "shape", "dtype", "mode", "provider", "sparsity", "batch", "threads")
    key = lambda r: tuple(r.get(k) for k in keys)  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + list(rows)
    atomic_write_bytes(path, (json.dumps(merged, indent=1) + "\n").encode())  # never half a file
    return path


def append_rows(path: Path, rows: List[Dict[str, object]]) -> Path:
    """Append ``rows`` to the JSON list in ``path`` (created with its folder when missing),
    written atomically: an interrupted run leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    atomic_write_bytes(path, (json.dumps(old + list(rows), indent=1) + "\n").encode())
    return path


def print_rows(rows: List[Dict[str, object]], baseline: str = "dense") -> None:
    """A compact table with each row's ratio to ``baseline`` in the same group."""
    groups: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        g = (r["benchmark"], r["shape"], r["dtype"], r["mode"], r.get("sparsity"), r.get("batch"),
             r.get("threads"))
        groups.setdefault(g, {})[r["provider"]] = r["median_ms"]
    for r in rows:
        g = (r["benchmark"], r["shape"], r["dtype"], r["mode"], r.get("sparsity"), r.get("batch"),
             r.get("threads"))
        base = groups[g].get(baseline)
        ratio = f"{base / r['median_ms']:.2f}x vs {baseline}" if base else ""
        extra = " ".join(f"{k}={r[k]:.1f}" for k in ("gbps", "tflops") if k in r)
        print(f"{r['benchmark']:<14} {r['shape']:<26} {r['dtype']:<9} {r['mode']:<5} "
              f"{r['provider']:<20} {r['median_ms']:9.4f} ms  {ratio} {extra}")


def write_readme_section(readme: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->`` in
    ``readme`` with ``text`` (the README tables of the benchmarks), written atomically.

    Raises:
        ValueError: ``readme`` lacks the markers (the message names the file and the markers).
    """
    readme = Path(readme)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"readme: {readme} has no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_bytes(readme, f"{head}{begin}\n{text}\n{end}{tail}".encode())
