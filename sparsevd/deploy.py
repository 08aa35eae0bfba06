"""``deploy(model)``: turn a model trained with sparse VD into a sparse inference model.

Steps (docs/design.md, "Deployment"):

1. Every LinearSVDO / Conv2dSVDO keeps the weights with log α < threshold (its eval-mode weight).
2. Batch norms right after a convolution (its only user) are folded into it
   (:mod:`sparsevd.surgery`).
3. Chains. Consecutive SVD layers joined only by channel-wise modules (elementwise activations,
   dropout, batch norm with running statistics (its per-channel tensors are sliced with the kept
   channels), max/avg pooling, one ``Flatten`` between a convolution and a linear layer) form a
   chain: inside an ``nn.Sequential``, and inside any module whose code torch.fx traces (the MLP
   of a BERT layer or of GPT-2, a user's ``fc2(act(fc1(x)))``; :mod:`sparsevd.surgery`). Between
   two layers of a chain, a neuron (a feature, or a channel) is removed when
   - its column in the next layer is all zero (nobody reads it), or
   - its row in this layer is all zero (a *dead* neuron): its output is the constant act(b), which
     is folded into the next layer's bias, b' = b + Σ W_next[:, neuron] · act(b) (summed over the
     spatial positions for conv → flatten → linear, and over the kernel for conv → conv without
     padding). A constant that cannot be folded exactly (conv → conv with zero padding, average
     pooling that counts the padding) keeps its neuron unless act(b) = 0.
   Removal repeats until nothing changes (a removed neuron can leave another one dead or unread).
   The activations between the layers of a chain stay compact; the chain's input and output keep
   their sizes, so the model's interface is unchanged. SVD layers outside chains are converted
   one by one, dead rows kept as empty CSR rows (their output is the bias).
4. What remains is stored as CSR (:class:`~sparsevd.nn.SparseLinear` / :class:`~sparsevd.nn.SparseConv2d`):
   values in the layer's dtype, int32 row pointers, int16 column indices when a layer has at most
   32768 input columns (else int32).
5. A cost model picks, per layer and batch size, the CSR kernel, compacted dense or masked dense
   (see :func:`plan_layer`): masked dense, the dense model's own product, unless a sparse mode
   measures clearly faster, so the deployed model runs no slower than the dense one.

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369): weights with log α > 3 are dropped at test time (sec. 5).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .nn.sparse import CONV_MODES, LINEAR_MODES, SparseConv1d, SparseConv2d, SparseLinear, used_columns
from .nn.svdo import SVDO_LAYERS, Conv1dSVDO, LinearSVDO
from .hf_integration import attach as attach_hf_quantizer
from .surgery import deployed_layer, replace_layers
from .ops import library
from .ops.library import kernel_available

__all__ = [
    "BATCH_BUCKETS",
    "deploy",
    "dense_bytes",
    "dense_twin",
    "deployed_bytes",
    "latency",
    "plan_layer",
    "plan_model",
    "rule_mode",
    "SPARSE_LAYERS",
]

SPARSE_LAYERS = (SparseLinear, SparseConv2d)

#: Batch sizes the cost model measures; a batch b uses the plan of the nearest bucket on a log
#: scale (b ≤ 2 → 1, ≤ 8 → 4, ≤ 32 → 16, ≤ 128 → 64, else 256).
BATCH_BUCKETS: Tuple[int, ...] = (1, 4, 16, 64, 256)

# ---------------------------------------------------------------------------------- planning
def _bucket_bounds(buckets: Sequence[int]) -> List[Optional[int]]:
    bounds: List[Optional[int]] = []
    for a, b in zip(buckets, buckets[1:]):
        bounds.append(int((a * b) ** 0.5))
    bounds.append(None)
    return bounds


#: A sparse mode (CSR, or compacted dense with its gather and finiteness check) is chosen only
#: when it measures at most this fraction of the plain dense product's time: the cost model times
#: one thread, the model may run on more, where dense GEMM scales better (1.6-1.8x on 2 threads
#: vs 1.3-1.5x for the CSR SpMM, benchmarks/NOTES.md), and layers share measurements within a
#: density bin of ±5 % (see ``_cost_key``).
SPARSE_MARGIN = 0.8
#: CSR is not timed above this density (nnz / (rows · used columns)): the measured crossovers
#: are at 0.15-0.5 on one thread (benchmarks/NOTES.md, "Cost model").
CSR_MAX_DENSITY = 0.5
#: Layers whose dense product has at most this many multiply-adds never use CSR (call overheads).
CSR_MIN_MACS = 16384


def _used_columns(layer: nn.Module) -> int:
    return int(used_columns(layer.col_indices, layer._cols).sum())


def _density(layer: nn.Module, used: int) -> float:
    return layer.num_nonzero / max(layer._rows * max(used, 1), 1)


def _plain_mode(layer: nn.Module) -> str:
    """The mode that is the dense model's own product: one F.linear on the zero-filled weight
    (SparseLinear "masked"), one F.conv2d (SparseConv2d "dense")."""
    return "masked" if isinstance(layer, SparseLinear) else "dense"


def rule_mode(layer: nn.Module, batch: int, device: Union[str, torch.device] = "cpu") -> str:
    """The documented rule used when nothing is measured (``cost_model="rule"``).

    SparseLinear, with the compiled kernel for ``device``: CSR when the density
    nnz / (out_features · used input columns) is at most 0.10 for batches ≤ 2 and at most 0.20 for
    larger batches on the CPU (measured, one thread: dense F.linear (MKL) time / csr_linear time
    falls to 1 at densities 0.15–0.3 for batch 1 and 0.3–0.5 for batches 4–256, on 300×784, 1024²
    and 4096² weights, benchmarks/NOTES.md; the limits sit below those crossovers because dense
    GEMM scales better with threads); on CUDA, until measured there, 0.10 / 0.02.
    Layers whose dense product has at most 16384 multiply-adds at that batch never use CSR (the
    call overheads dominate). Otherwise compacted dense ("dense") when at most half of the input
    columns are used and the product is larger than that (the gather and the finiteness check of
    x cost a few µs), else masked dense ("masked"): the dense model's own F.linear.

    SparseConv2d: always "dense" (dense conv2d on the compacted channels). The CSR path of a
    convolution materializes the im2col patches (F.unfold), a kH·kW-fold copy of the input, and
    measured slower than the dense convolution at every density for batches ≥ 16 (≈1.2x faster
    only at batch 1 on LeNet-5's layers); ``cost_model="measure"`` still picks it where it wins.
    """
    device = torch.device(device)
    if isinstance(layer, SparseConv2d):
        return "dense"
    rows, cols = layer._rows, layer._cols
    used = _used_columns(layer)
    big = rows * used * batch > CSR_MIN_MACS
    if kernel_available(device) and big:
        limit = (0.10 if batch <= 2 else 0.20) if device.type == "cpu" else (0.10 if batch <= 2 else 0.02)
        if _density(layer, used) <= limit:
            return "csr"
    return "dense" if used <= 0.5 * cols and big else "masked"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fns: Dict[str, Callable[[], object]], device: torch.device, budget_s: float = 0.015,
             min_reps: int = 2, max_reps: int = 15) -> Dict[str, float]:
    """Seconds per call of each fn: the least over interleaved (round-robin) samples, after a
    warm-up call; a candidate slower than 4x the best so far stops being timed.

    CUDA: wall time with synchronization. CPU: the calling thread's CPU time (time.thread_time)
    with torch on one thread, each sample a loop of calls of at least 2 ms. CPU time does not
    count the time other processes hold the core, so the ranking stays right on a shared machine
    (wall time of a parallel region there includes waits for descheduled threads, and process
    CPU time counts idle OpenMP workers spinning); the kernels compared (MKL GEMM/GEMV and the
    OpenMP CSR kernels) scale alike with the thread count.
    """
    cpu = device.type == "cpu"
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    clock = time.thread_time if cpu else time.perf_counter
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
                if reps > 0 and best[k] > 4 * lead:
                    continue
                calls, t0 = 0, clock()
                while True:
                    fn()
                    calls += 1
                    _sync(device)
                    elapsed = clock() - t0
                    if not cpu or elapsed >= 2e-3:
                        break
                best[k] = min(best[k], elapsed / calls)
            reps += 1
    finally:
        if cpu:
            torch.set_num_threads(threads)
    return best


def _cost_key(layer: nn.Module, used: int, input_shape, batch: int) -> tuple:
    """What the cost of a layer's modes depends on: type, sizes, used columns, density (in bins of
    ±5 %), dtype, device, the convolution's geometry and input, the batch size. Layers with the
    same key share one measurement (a transformer's q/k/v/o projections, its MLPs)."""
    density = _density(layer, used)
    bin_ = None if density == 0 else round(math.log(density) / math.log(1.1))
    conv = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
            tuple(input_shape)) if isinstance(layer, SparseConv2d) else None
    return (type(layer).__name__, layer._rows, layer._cols, used, bin_, layer.values.dtype,
            layer.values.device, conv, batch)


@torch.no_grad()
def plan_layer(layer: nn.Module, input_shape: Optional[Sequence[int]] = None,
               cost_model: str = "measure", buckets: Sequence[int] = BATCH_BUCKETS,
               cache: Optional[Dict[tuple, tuple]] = None) -> None:
    """Choose the kernel per batch size of one deployed layer and set its plan.

    The plain dense product (SparseLinear "masked": F.linear on the zero-filled weight;
    SparseConv2d "dense": F.conv2d) is the default at every batch size; a sparse mode replaces it
    only where it measures at most ``SPARSE_MARGIN`` (0.8) of its time, so a plan is never slower
    than the dense layer. Candidates that cannot win are not timed: CSR above density
    ``CSR_MAX_DENSITY`` (0.5) or at ≤ 16384 dense multiply-adds, compacted dense when more than 80 %
    of the columns are used. A layer with no candidate left (every layer of a model at low
    sparsity) gets the plain plan without any timing.

    Args:
        layer: a SparseLinear or SparseConv2d.
        input_shape: one sample's input shape for a SparseConv2d, (C, H, W) (needed to measure;
            without it the rule decides); ignored for SparseLinear.
        cost_model: ``"measure"``: time the candidate modes at each bucket's batch size (input rows
            for SparseLinear: a (B, T, in) input has B·T) on random inputs on the layer's device
            (CPU: CPU time on one thread, see ``_measure``), interleaved; a mode 2x slower than the
            best is not timed at larger batches; ``"rule"``: :func:`rule_mode`; or a mode name to
            force it.
        buckets: the batch sizes to decide for.
        cache: a dict shared by the layers of one model (:func:`plan_model`): layers with the same
            sizes, density bin, dtype and device (``_cost_key``) reuse one measurement.

    Raises:
        ValueError: unknown ``cost_model``.
    """
    modes = LINEAR_MODES if isinstance(layer, SparseLinear) else CONV_MODES
    if cost_model in modes:
        layer.set_plan(cost_model)
        return
    device, dtype = layer.values.device, layer.values.dtype
    bounds = _bucket_bounds(buckets)
    conv = isinstance(layer, SparseConv2d)
    if cost_model == "rule" or (conv and input_shape is None and cost_model == "measure"):
        layer.set_plan([(b, rule_mode(layer, n, device)) for b, n in zip(bounds, buckets)])
        return
    if cost_model != "measure":
        raise ValueError(f"cost_model: expected 'measure', 'rule' or a mode, got {cost_model!r}")
    plain = _plain_mode(layer)
    used = _used_columns(layer)
    density = _density(layer, used)
    others = []
    if kernel_available(device) and density <= CSR_MAX_DENSITY and not (conv and layer.groups != 1):
        others.append("csr")  # (the torch.sparse fallback is never faster)
    if not conv and used <= SPARSE_MARGIN * layer.in_features:
        others.append("dense")  # compacted dense: saves at most the unused columns' share
    macs = layer._rows * max(used, 1) * (math.prod(input_shape[1:]) if conv else 1)

    def candidates(n: int, live: List[str]) -> List[str]:
        return [m for m in live if m != "csr" or macs * n > CSR_MIN_MACS]

    if not any(candidates(n, others) for n in buckets):
        layer.set_plan(plain)  # nothing can beat the dense product: no timing
        return
    # build the caches of every candidate, then switch modes without rebuilding them
    layer.set_plan([(i, m) for i, m in enumerate(others)] + [(None, plain)])
    cache = {} if cache is None else cache
    plan = []
    live = list(others)
    for bound, n in zip(bounds, buckets):
        cands = candidates(n, live)
        if not cands:
            plan.append((bound, plain))
            continue
        key = _cost_key(layer, used, input_shape, n)
        if key not in cache:
            shape = (n, layer.in_features) if not conv else (n, *input_shape)
            x = torch.randn(shape, device=device, dtype=dtype)
            fns = {}
            for m in [plain] + cands:
                def run(m=m):
                    layer._use_mode(m)
                    return layer(x)
                fns[m] = run
            t = _measure(fns, device)
            best = plain
            for m in cands:
                if t[m] <= SPARSE_MARGIN * t[plain] and t[m] < t[best]:
                    best = m
            # a mode 2x slower than the best is not timed at larger batches (costs grow with the batch)
            cache[key] = (best, tuple(m for m in cands if t[m] > 2 * t[best]))
        best, slow = cache[key]
        plan.append((bound, best))
        live = [m for m in live if m not in slow]
    layer.set_plan(plan)


@torch.no_grad()
def plan_model(model: nn.Module, example_input: Optional[Tensor] = None, cost_model: str = "measure",
               buckets: Sequence[int] = BATCH_BUCKETS) -> nn.Module:
    """Set the plan of every deployed layer of ``model`` (see :func:`plan_layer`), in place.

    ``example_input`` (any batch size) gives the input shapes of the convolutions; it is run once
    through the model. Returns ``model``.
    """
    shapes: Dict[nn.Module, Tuple[int, ...]] = {}
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    if example_input is not None and any(isinstance(m, SparseConv2d) for m in layers):
        hooks = []
        for m in layers:
            if isinstance(m, SparseConv2d):
                m.set_plan("dense")
                dims = 2 if isinstance(m, SparseConv1d) else 3  # one sample: (C, L) / (C, H, W)
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, args, dims=dims: shapes.__setitem__(mod, tuple(args[0].shape[-dims:]))))
        try:
            was_training = model.training
            model.eval()
            model(example_input)
            model.train(was_training)
        finally:
            for h in hooks:
                h.remove()
    cache: Dict[tuple, tuple] = {}  # layers of the same sizes and density share measurements
    for m in layers:
        plan_layer(m, shapes.get(m), cost_model, buckets, cache)
    return model


# ------------------------------------------------------------------------------------ deploy
@torch.no_grad()
def deploy(
    model: nn.Module,
    example_input: Optional[Tensor] = None,
    *,
    cost_model: str = "measure",
    threshold: Optional[float] = None,
    buckets: Sequence[int] = BATCH_BUCKETS,
    trace: bool = True,
) -> nn.Module:
    """A new inference model in which every LinearSVDO / Conv2dSVDO becomes a SparseLinear /
    SparseConv2d (CSR weights; batch norms folded, dead neurons removed and folded, see the
    module docstring and :mod:`sparsevd.surgery`).

    Args:
        model: a module with sparse-VD layers (e.g. ``sparsevd.models.LeNet300()`` after
            training); left unchanged. Other modules are copied as they are.
        example_input: a batch of inputs of the model (any batch size, e.g. (1, 1, 28, 28)); used
            to measure the convolutions at their real input size. Optional.
        cost_model: ``"measure"`` (time the kernels that can beat the dense product on this
            machine, at each batch bucket; see :func:`plan_layer`), ``"rule"`` (:func:`rule_mode`, no timing), or a mode ("csr", "dense",
            "masked") forced on every layer that has it (convolutions fall back to "dense" when
            the mode is "masked").
        threshold: log α pruning threshold for every layer; default: each layer's own.
        buckets: batch sizes the plan distinguishes.
        trace: also fold batch norms and remove dead neurons inside modules other than
            nn.Sequential, found by torch.fx traces of their code (BERT / GPT-2 MLP blocks, a
            user's ``fc2(act(fc1(x)))``; :mod:`sparsevd.surgery`); False: Sequential chains only.

    Returns:
        The deployed model, in eval mode, on the device and in the dtype of ``model``. Its outputs
        equal the eval-mode outputs of ``model`` up to floating-point rounding. A Hugging Face
        model (or one inside it) gets the sparsevd quantizer: its ``save_pretrained`` writes a
        checkpoint that ``from_pretrained`` reloads exactly (:mod:`sparsevd.hf_integration`).

    Warns:
        RuntimeWarning when the compiled kernels (sparsevd._C) are missing: the deployed layers
        then use torch's dense / sparse kernels; the message says how to build them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    # One intra-op thread while deploying (restored after): the build is many small tensor ops
    # (masks, nonzero, CSR, checks), and on shared cores each OpenMP region of a multi-threaded
    # op waits for its descheduled threads: the 37 layers of a 6-layer transformer deployed in
    # 19 s on 2 loaded cores vs 1.3 s on one (benchmarks/NOTES.md, "Deployed overhead"). The
    # cost model times on one thread anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _deploy(model, example_input, cost_model, threshold, buckets, trace)
    finally:
        torch.set_num_threads(threads)


def _deploy(model, example_input, cost_model, threshold, buckets, trace) -> nn.Module:
    if isinstance(model, SVDO_LAYERS):
        new = deployed_layer(model, threshold)
        built = [new]
    else:
        new = copy.deepcopy(model)
        built = replace_layers(new, threshold, trace)
    if not built:
        warnings.warn("deploy: the model has no LinearSVDO / Conv2dSVDO layers; nothing to deploy",
                      RuntimeWarning, stacklevel=4)
    devices = {m.values.device for m in built}
    for d in devices:
        if not kernel_available(d):
            warnings.warn(
                f"deploy: the compiled sparsevd._C kernels are not available for {d.type} "
                f"({library.unavailable_reason() or 'built without CUDA'}); the deployed layers fall "
                f"back to torch's dense kernels. To get the sparse kernels, {library.BUILD_HINT}.",
                RuntimeWarning, stacklevel=4,
            )
    new.eval().requires_grad_(False)  # an inference model (csr_linear has no autograd formula)
    if cost_model in ("measure", "rule"):
        plan_model(new, example_input, cost_model, buckets)
    else:
        for m in built:
            mode = cost_model
            if isinstance(m, SparseConv2d) and mode not in CONV_MODES:
                mode = "dense"
            if mode not in LINEAR_MODES:
                raise ValueError(
                    f"cost_model: expected 'measure', 'rule' or one of {LINEAR_MODES}, got {cost_model!r}"
                )
            if mode == "csr" and isinstance(m, SparseConv2d) and m.groups != 1:
                mode = "dense"
            m.set_plan(mode)
    attach_hf_quantizer(new)  # save_pretrained writes a model from_pretrained rebuilds
    return new


# ------------------------------------------------------------------------- comparison
def dense_twin(model: nn.Module) -> nn.Module:
    """The model with every LinearSVDO / Conv2dSVDO replaced by nn.Linear / nn.Conv2d holding its
    eval-mode weight θ ⊙ [log α < threshold]: what a dense deployment would run."""
    model = copy.deepcopy(model).eval()

    def convert(m: nn.Module) -> nn.Module:
        w = (m.weight * m.mask()).detach()  # the eval-mode weight θ ⊙ [log α < threshold]
        if isinstance(m, LinearSVDO):
            d = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=w.device, dtype=w.dtype)
        else:
            d = (nn.Conv1d if isinstance(m, Conv1dSVDO) else nn.Conv2d)(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          m.dilation, m.groups, bias=m.bias is not None, device=w.device,
                          dtype=w.dtype)
        with torch.no_grad():
            d.weight.copy_(w)
            if m.bias is not None:
                d.bias.copy_(m.bias)
        return d.eval().requires_grad_(False)

    if isinstance(model, SVDO_LAYERS):
        return convert(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SVDO_LAYERS):
                setattr(parent, name, convert(child))
    return model


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the weights and biases of the sparse-VD layers as dense tensors."""
    return _tensor_bytes(t for m in model.modules() if isinstance(m, SVDO_LAYERS)
                         for t in (m.weight, m.bias) if t is not None)


def deployed_bytes(model: nn.Module) -> int:
    """Bytes of the tensors of the deployed layers (CSR + biases)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, SPARSE_LAYERS))


@torch.no_grad()
def latency(models: Dict[str, nn.Module], x: torch.Tensor, min_time: float) -> Dict[str, List[float]]:
    """Per model, the sorted times (s) of single forward calls on ``x``, interleaved."""
    for m in models.values():
        m(x)
    times: Dict[str, List[float]] = {k: [] for k in models}
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or min(len(v) for v in times.values()) < 5:
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v) for k, v in times.items()}
