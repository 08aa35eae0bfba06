"""The benchmark suite in a quick mode, and the ratio table of the README (``sparsevd bench``).

:func:`run` runs, on this machine, the benchmarks whose ratios the README reports, each in its
``--quick`` mode (short interleaved rounds), and returns their rows; :func:`ratio_table` renders
rows as the README's markdown table: each row's median time and its time ratios to ``dense`` and to
``reference_compiled`` measured in the same run. ``scripts/results_table.py --bench`` renders the
committed rows with the same function.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, Iterable, List, Optional, Sequence

#: (module, arguments) of the quick suite per device; each writes its rows to the file given.
SUITE = {
    "cpu": [
        ("bench_train_step", ["--workloads", "lenet300", "lenet5", "--threads", "{threads}"]),
        ("bench_csr_linear", ["--device", "cpu", "--sparsity", "0.98", "--batch", "1", "64",
                              "--threads", "{threads}", "--skip-lenet"]),
    ],
    "cuda": [
        ("bench_train_step", ["--device", "cuda", "--workloads", "lenet300", "lenet5", "--threads", "1"]),
        ("bench_lrt_linear", ["--shapes", "lenet", "1024"]),
        ("bench_kl", ["--models", "0.27M", "15M"]),
        ("bench_csr_linear", ["--device", "cuda", "--sparsity", "0.98", "--batch", "1", "64",
                              "--skip-lenet"]),
    ],
}


def run(device: str = "cpu", threads: Optional[int] = None, out: Optional[str] = None,
        verbose: bool = False, modules: Optional[Sequence[str]] = None) -> List[dict]:
    """Run the quick suite on ``device`` ("cpu" or "cuda") and return its rows.

    Args:
        threads: torch threads of the CPU benchmarks (default: torch's).
        out: also write the rows to this JSON file (benchmarks' results format).
        verbose: let the benchmarks print their own lines.
        modules: only these benchmarks of the suite (names such as "bench_train_step").

    Raises:
        ValueError: an unknown ``device``.
        OSError: ``out`` cannot be written (FileWriteError, naming it).
    """
    import importlib
    import json
    import tempfile
    from pathlib import Path

    import torch

    from sparsevd._files import atomic_write_bytes

    if device not in SUITE:
        raise ValueError(f"device: expected one of {sorted(SUITE)}, got {device!r}")
    threads = threads or torch.get_num_threads()
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        for name, args in SUITE[device]:
            if modules and name not in modules:
                continue
            mod = importlib.import_module(f"{__package__}.{name}")
            argv = [a.format(threads=threads) for a in args] + ["--quick", "--out", str(path)]
            sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
            with sink:
                mod.main(argv)
        if path.is_file():
            rows = json.loads(path.read_text())
    if out:  # atomic; a full disk raises one FileWriteError (an OSError) naming the file
        atomic_write_bytes(out, (json.dumps(rows, indent=1) + "\n").encode())
    return rows


def _group(r: dict) -> tuple:
    return (r["benchmark"], r["shape"], r["dtype"], r["mode"], r.get("sparsity"), r.get("batch"),
            r.get("threads"))


def ratio_table(rows: Iterable[dict], providers: Optional[Sequence[str]] = None) -> str:
    """The markdown table of ``rows``: benchmark, shape, mode, threads, provider, median ms and the
    time ratios ``÷ dense`` (this time / dense's: below 1 is faster than dense, the targets' form,
    e.g. a training step ≤ 2.5× dense) and ``÷ reference_compiled``, against the rows of the same
    group (same benchmark, shape, dtype, mode, sparsity, batch, threads) of the same run."""
    rows = list(rows)
    base: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        base.setdefault(_group(r), {})[r["provider"]] = r["median_ms"]
    lines = ["| benchmark | shape | mode | sparsity | threads | provider | median ms | ÷ dense | ÷ reference_compiled |",
             "|---|---|---|--:|--:|---|--:|--:|--:|"]
    for r in rows:
        if providers and r["provider"] not in providers:
            continue
        g = base[_group(r)]

        def ratio(name):
            return f"{r['median_ms'] / g[name]:.2f}" if g.get(name) else ""

        sp = "" if r.get("sparsity") is None else f"{100 * r['sparsity']:.0f}%"
        lines.append(f"| {r['benchmark']} | {r['shape']} | {r['mode']} | {sp} | {r.get('threads', '')} "
                     f"| {r['provider']} | {r['median_ms']:.3f} | {ratio('dense')} | "
                     f"{ratio('reference_compiled')} |")
    return "\n".join(lines)
