"""The cost model of :func:`sparsevd.deploy`: per deployed layer, one weight format and kernel for
every batch size (:func:`plan_layer`, :func:`plan_model`), from a rule (:func:`rule_mode`) or from
timings (``_measure``, the timer, which the tests replace); the byte counts it compares
(:func:`csr_bytes`, :func:`dense_weight_bytes`). docs/design.md, "Deployment"; the measured
crossovers: benchmarks/NOTES.md, "Cost model".
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .nn.sparse import CONV_MODES, LINEAR_MODES, SPARSE_LAYERS, SparseConv1d, SparseConv2d, SparseLinear
from .ops.csr_linear.format import UINT16_MAX_FEATURES
from .ops.library import kernel_available

__all__ = ["BATCH_BUCKETS", "CSR_MAX_DENSITY", "CSR_MIN_MACS", "MAX_TIMED_ROWS", "SPARSE_MARGIN",
           "check_threads", "csr_bytes", "dense_weight_bytes", "plan_layer", "plan_model", "rule_mode"]

#: Batch sizes at which the cost model times CSR against the dense product (CSR must win at every
#: one; a linear layer sees batch × rows per sample input rows, see :func:`plan_layer`).
BATCH_BUCKETS: Tuple[int, ...] = (1, 4, 16, 64, 256)

#: CSR is chosen only when it measures at most this fraction of the dense product's time at every
#: batch bucket, on the thread count the model will run on: a margin for the timing noise of a
#: shared machine and for layers that share a measurement within a density bin of ±5 % (see
#: ``_cost_key``), so that a deployed layer is never slower than the dense one.
SPARSE_MARGIN = 0.9
#: CSR is not timed above this density (nnz / (rows · used columns)): the measured crossovers
#: are at 0.15-0.5 (benchmarks/NOTES.md, "Cost model").
CSR_MAX_DENSITY = 0.5
#: Layers whose dense product has at most this many multiply-adds (at a bucket's batch) never use
#: CSR (call overheads).
CSR_MIN_MACS = 16384
#: A SparseLinear is timed at most at this many input rows (a larger bucket is timed here): the
#: cost per row of the dense GEMM and of the CSR SpMM is flat from a few hundred rows on.
MAX_TIMED_ROWS = 1024


def _used_columns(layer: nn.Module) -> int:
    return int(layer.used_input_columns().sum())


def _density(layer: nn.Module, used: int) -> float:
    return layer.num_nonzero / max(layer.matrix_shape[0] * max(used, 1), 1)


def _plain_mode(layer: nn.Module) -> str:
    """The mode that is the dense model's own product: one F.linear on the zero-filled weight
    (SparseLinear "masked"), one F.conv2d (SparseConv2d "dense")."""
    return layer.PLAIN


def csr_bytes(layer: nn.Module) -> int:
    """Bytes the layer's weight takes as CSR (row pointers, column indices, values; the bias not
    counted): its CSR buffers, or what :func:`sparsevd.ops.csr_linear.format.to_csr` would write."""
    if layer.storage == "csr":
        return sum(t.numel() * t.element_size() for t in layer.csr())
    nnz, (rows, cols) = layer.num_nonzero, layer.matrix_shape
    index = 2 if cols <= UINT16_MAX_FEATURES else 4
    return (rows + 1) * 4 + nnz * (index + layer.weight.element_size())


def dense_weight_bytes(layer: nn.Module) -> int:
    """Bytes of the layer's zero-filled dense weight (the bias not counted)."""
    return math.prod(layer.matrix_shape) * layer.stored_weight.element_size()


def rule_mode(layer: nn.Module, batch: int, device: Union[str, torch.device] = "cpu") -> str:
    """The documented rule used when nothing is measured (``cost_model="rule"``), per batch size.

    SparseLinear, with the compiled kernel for ``device``: CSR when the density
    nnz / (out_features · used input columns) is at most 0.10 for batches ≤ 2 and at most 0.20 for
    larger batches on the CPU (measured, one thread: dense F.linear (MKL) time / csr_linear time
    falls to 1 at densities 0.15–0.3 for batch 1 and 0.3–0.5 for batches 4–256, on 300×784, 1024²
    and 4096² weights, benchmarks/NOTES.md; the limits sit below those crossovers because dense
    GEMM scales better with threads); on CUDA, until measured there, 0.10 / 0.02.
    Layers whose dense product has at most 16384 multiply-adds at that batch never use CSR (the
    call overheads dominate). Otherwise the dense model's own product ("masked": one F.linear).

    SparseConv2d: always "dense" (dense conv2d on the compacted channels). The CSR path of a
    convolution materializes the im2col patches (F.unfold), a kH·kW-fold copy of the input, and
    measured slower than the dense convolution at every density for batches ≥ 16 (≈1.2x faster
    only at batch 1 on LeNet-5's layers); ``cost_model="measure"`` still picks it where it wins.

    :func:`plan_layer` stores CSR only where this rule gives "csr" at every batch bucket.
    """
    device = torch.device(device)
    if isinstance(layer, SparseConv2d):
        return "dense"
    used = _used_columns(layer)
    big = layer.matrix_shape[0] * used * batch > CSR_MIN_MACS
    if kernel_available(device) and big:
        limit = (0.10 if batch <= 2 else 0.20) if device.type == "cpu" else (0.10 if batch <= 2 else 0.02)
        if _density(layer, used) <= limit:
            return "csr"
    return "masked"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fns: Dict[str, Callable[[], object]], device: torch.device, threads: int = 1,
             budget_s: float = 0.015, min_reps: int = 3, max_reps: int = 15) -> Dict[str, float]:
    """Seconds per call of each fn: the least over interleaved (round-robin) samples, after a
    warm-up call.

    CUDA: wall time with synchronization. CPU: torch on ``threads`` intra-op threads. One thread:
    samples are loops of calls of at least 2 ms timed by the calling thread's CPU time
    (time.thread_time), which does not count the time other processes hold the core, so the
    ranking stays right on a shared machine; a candidate slower than 4x the best so far stops
    being timed. More threads: wall time of single calls, at least 10 samples each within a
    budget of 0.1 s (up to 60): a parallel region on shared cores waits for its descheduled
    threads, often for milliseconds, and the least of many single calls is the one where no
    thread was descheduled (on a loaded 2-core machine, CSR / dense time of MiniLM-shaped layers
    at 90 %: 0.57–1.00 as least 2 ms loops, 0.08–0.77 as least single calls, 0.16–0.52 on one
    thread: benchmarks/NOTES.md, "Two threads on this machine").
    """
    cpu = device.type == "cpu"
    parallel = cpu and threads > 1
    if parallel:
        budget_s, min_reps, max_reps = max(budget_s, 0.1), max(min_reps, 10), max(max_reps, 60)
    old_threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(threads)
    clock = time.thread_time if cpu and not parallel else time.perf_counter
    block_s = 2e-3 if cpu and not parallel else 0.0
    try:
        for fn in fns.values():
            fn()
        _sync(device)
        best: Dict[str, float] = {k: float("inf") for k in fns}
        start = time.perf_counter()
        reps = 0
        while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
            lead = min(best.values())
            for k, fn in fns.items():
                if reps > 0 and not parallel and best[k] > 4 * lead:
                    continue
                calls, t0 = 0, clock()
                while True:
                    fn()
                    calls += 1
                    _sync(device)
                    elapsed = clock() - t0
                    if elapsed >= block_s:
                        break
                best[k] = min(best[k], elapsed / calls)
            reps += 1
    finally:
        if cpu:
            torch.set_num_threads(old_threads)
    return best


def _cost_key(layer: nn.Module, used: int, input_shape, batch: int, threads: int) -> tuple:
    """What the cost of a layer's modes depends on: type, sizes, used columns, density (in bins of
    ±5 %), dtype, device, the convolution's geometry and input, the batch size, the threads.
    Layers with the same key share one measurement (a transformer's q/k/v/o projections, its MLPs)."""
    density = _density(layer, used)
    bin_ = None if density == 0 else round(math.log(density) / math.log(1.1))
    conv = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
            tuple(input_shape)) if isinstance(layer, SparseConv2d) else None
    stored = layer.stored_weight
    return (type(layer).__name__, *layer.matrix_shape, used, bin_, stored.dtype, stored.device,
            conv, batch, threads)


def check_threads(threads: Optional[int]) -> int:
    """``threads`` checked (a positive int), ``torch.get_num_threads()`` for None (raises
    ValueError naming the argument)."""
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    return threads


@torch.no_grad()
def plan_layer(layer: nn.Module, input_shape: Optional[Sequence[int]] = None,
               cost_model: str = "measure", buckets: Sequence[int] = BATCH_BUCKETS,
               cache: Optional[Dict[tuple, float]] = None, threads: Optional[int] = None) -> None:
    """Choose the weight format and kernel of one deployed layer and set its plan: CSR (mode
    ``"csr"``) or the dense layer's own product (SparseLinear ``"masked"``: F.linear on the
    zero-filled weight; SparseConv2d ``"dense"``: F.conv2d), one for every batch size.

    CSR is chosen only when it is smaller than the dense weight (:func:`csr_bytes` <
    :func:`dense_weight_bytes`) and faster than the dense product at every bucket of ``buckets``
    (``cost_model="measure"``: at most ``SPARSE_MARGIN`` (0.9) of its time on ``threads`` threads;
    ``"rule"``: :func:`rule_mode` gives "csr" at every bucket); otherwise the layer stores the dense
    weight. So a planned layer is never bigger than the dense one, never holds a dense copy beside
    its CSR, and never measured slower than it at the buckets. Candidates that cannot win are not
    timed: density above ``CSR_MAX_DENSITY`` (0.5), CSR not smaller, or ≤ ``CSR_MIN_MACS``
    (16384) dense multiply-adds at some bucket; then nothing is timed.

    Args:
        layer: a SparseLinear or SparseConv2d.
        input_shape: one sample's input shape: (C, H, W) for a SparseConv2d (needed to measure;
            without it the rule decides); (..., in_features) for a SparseLinear, whose leading
            dims are the rows per sample (e.g. (T, in_features): T tokens; default one row).
        cost_model: ``"measure"``: time CSR and the dense product at each bucket's batch size
            (a SparseLinear at batch · rows-per-sample input rows, at most ``MAX_TIMED_ROWS``
            (1024): past that both kernels' cost per row is flat) on random inputs on the layer's
            device, interleaved, smallest batch first (stopping where CSR loses; see
            ``_measure``); ``"rule"``: :func:`rule_mode`; or a mode name to force it (stored in
            that mode's format).
        buckets: the batch sizes (samples) to decide for.        cache: a dict shared by the layers of one model (:func:`plan_model`): layers with the same
            sizes, density bin, dtype, device and threads (``_cost_key``) reuse one measurement.
        threads: intra-op threads the model will run on (default: ``torch.get_num_threads()``);
            recorded as ``layer.plan_threads`` when measured.

    Raises:
        ValueError: unknown ``cost_model``, bad ``threads``.
    """
    modes = LINEAR_MODES if isinstance(layer, SparseLinear) else CONV_MODES
    if cost_model in modes:
        layer.set_plan(cost_model)
        return
    if cost_model not in ("measure", "rule"):
        raise ValueError(f"cost_model: expected 'measure', 'rule' or a mode, got {cost_model!r}")
    threads = check_threads(threads)
    device = layer.stored_weight.device
    conv = isinstance(layer, SparseConv2d)
    plain = _plain_mode(layer)
    used = _used_columns(layer)
    macs = layer.matrix_shape[0] * max(used, 1) * (math.prod(input_shape[1:]) if conv and input_shape else 1)
    # the batch sizes as the layer sees them: SparseLinear input rows (batch · rows per sample)
    rows = 1 if conv or not input_shape else math.prod(input_shape[:-1])
    sizes = sorted({n if conv else min(n * rows, max(MAX_TIMED_ROWS, rows)) for n in buckets})
    possible = (kernel_available(device) and not (conv and layer.groups != 1)
                and csr_bytes(layer) < dense_weight_bytes(layer))
    if cost_model == "rule" or (conv and input_shape is None):
        csr = possible and all(rule_mode(layer, n, device) == "csr" for n in sizes)
        layer.set_plan("csr" if csr else plain)
        return
    if not (possible and _density(layer, used) <= CSR_MAX_DENSITY
            and all(macs * n > CSR_MIN_MACS for n in sizes)):
        layer.set_plan(plain)  # CSR cannot win everywhere: no timing
        return
    layer.set_plan([(0, "csr"), (None, plain)])  # both storages while timing
    cache = {} if cache is None else cache
    csr = True
    for n in sizes:
        key = _cost_key(layer, used, input_shape if conv else None, n, threads)
        if key not in cache:
            shape = (n, layer.in_features) if not conv else (n, *input_shape)
            x = torch.randn(shape, device=device, dtype=layer.stored_weight.dtype)
            fns = {}
            for m in (plain, "csr"):
                def run(m=m):
                    layer.use_mode(m)
                    return layer(x)
                fns[m] = run
            t = _measure(fns, device, threads=threads)
            cache[key] = t["csr"] / t[plain]  # CSR time / dense time
        if cache[key] > SPARSE_MARGIN:
            csr = False
            break
    layer.set_plan("csr" if csr else plain)
    layer.plan_threads = threads


def check_example_input(example_input) -> None:
    """Raises TypeError unless ``example_input`` is None, a Tensor, a tuple / list (the model's
    positional arguments) or a dict with string keys (its keyword arguments)."""
    ok = (example_input is None or isinstance(example_input, (Tensor, tuple, list))
          or (isinstance(example_input, dict) and all(isinstance(k, str) for k in example_input)))
    if not ok:
        raise TypeError("example_input: expected a Tensor, a tuple of the model's positional "
                        "arguments or a dict of its keyword arguments, got "
                        f"{type(example_input).__name__}")


def _example_batch(example_input) -> int:
    """The batch size of an example: the first dimension of its first tensor (1 when none)."""
    values = (example_input.values() if isinstance(example_input, dict)
              else example_input if isinstance(example_input, (tuple, list)) else (example_input,))
    first = next((v for v in values if isinstance(v, Tensor)), None)
    return first.shape[0] if first is not None and first.dim() else 1


def _run_example(model: nn.Module, example_input) -> None:
    """model(x), model(*args) or model(**kwargs); an error of the model is a ValueError about
    ``example_input`` (the model's own message and type kept in it and as its cause)."""
    try:
        if isinstance(example_input, dict):
            model(**example_input)
        elif isinstance(example_input, (tuple, list)):
            model(*example_input)
        else:
            model(example_input)
    except Exception as e:
        raise ValueError(
            f"example_input: the model raised {type(e).__name__} on it ({e}); pass what the "
            "model takes: a Tensor, a tuple of its positional arguments or a dict of its keyword "
            "arguments (an encoder-decoder needs its decoder inputs too, e.g. {'input_ids': ..., "
            "'decoder_input_ids': ...})") from e


@torch.no_grad()
def plan_model(model: nn.Module, example_input: Optional[Tensor] = None, cost_model: str = "measure",
               buckets: Sequence[int] = BATCH_BUCKETS, threads: Optional[int] = None) -> nn.Module:
    """Set the plan of every deployed layer of ``model`` (see :func:`plan_layer`), in place.

    ``example_input`` (any batch size, batch first; a Tensor, a tuple of positional arguments or
    a dict of keyword arguments) is run once through the model: it gives the
    input shapes of the convolutions and the input rows per sample of the linear layers (T for a
    transformer's (B, T) token ids), so the buckets are timed at the sizes the layers see.
    ``threads``: the intra-op threads the model will run on (default ``torch.get_num_threads()``).
    Returns ``model``.
    """
    threads = check_threads(threads)
    shapes: Dict[nn.Module, Tuple[int, ...]] = {}
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    check_example_input(example_input)
    if example_input is not None and layers:
        batch = _example_batch(example_input)

        def record(mod, args):
            x = args[0]
            if isinstance(mod, SparseConv2d):  # one sample: (C, L) / (C, H, W)
                shapes[mod] = tuple(x.shape[-(2 if isinstance(mod, SparseConv1d) else 3):])
            else:  # rows per sample, as (rows, in_features)
                shapes[mod] = (max(1, x.numel() // max(mod.in_features, 1) // max(batch, 1)),
                               mod.in_features)

        hooks = []
        for m in layers:
            if isinstance(m, SparseConv2d):
                m.set_plan("dense")
            hooks.append(m.register_forward_pre_hook(record))
        try:
            was_training = model.training
            model.eval()
            _run_example(model, example_input)
            model.train(was_training)
        finally:
            for h in hooks:
                h.remove()
    cache: Dict[tuple, float] = {}  # layers of the same sizes and density share measurements
    for m in layers:
        plan_layer(m, shapes.get(m), cost_model, buckets, cache, threads)
    return model
