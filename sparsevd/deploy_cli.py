"""``sparsevd deploy CHECKPOINT --out FILE``: a trained checkpoint → a deployed sparse model file.

Reads what ``sparsevd train --out DIR`` writes (model.safetensors + config.json, through
:func:`sparsevd.cli.load_checkpoint`), runs :func:`sparsevd.deploy`, writes the deployed model with
:func:`sparsevd.save`, and prints

- sizes: the dense inference model's weights and biases vs the deployed model's tensors (bytes);
- a latency table, dense (the eval-mode masked model as nn.Linear / nn.Conv2d) vs deployed, at
  batch 1 and 64 (median of interleaved runs, ms), and the largest output difference.

Exit status: 0 on success, 1 when the checkpoint cannot be read, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .deploy import SPARSE_LAYERS, deploy
from .io import save
from .nn.sparse import SparseLinear
from .nn.svdo import SVDO_LAYERS, Conv2dSVDO, LinearSVDO
from .ops.csr import extension_available

#: One input sample of the models of sparsevd.models (28x28 grey images), when the checkpoint's
#: config.json has no ``input_shape``.
SAMPLE_SHAPE = (1, 28, 28)


def sample_shape(checkpoint) -> tuple:
    """``input_shape`` of the checkpoint's config.json, else :data:`SAMPLE_SHAPE`."""
    p = Path(checkpoint)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        shape = json.loads(cfg.read_text()).get("input_shape")
        if shape and all(isinstance(v, int) and v > 0 for v in shape):
            return tuple(shape)
    except (OSError, ValueError, AttributeError):
        pass
    return SAMPLE_SHAPE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsevd deploy",
        description="Turn a checkpoint of `sparsevd train` into a sparse inference model "
                    "(CSR layers, dead neurons removed) and compare it with the dense model.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="directory written by `sparsevd train --out DIR` (or its model.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="deployed model file (.safetensors)")
    p.add_argument("--threshold", type=float, default=None,
                   help="log α pruning threshold (default: the checkpoint's)")
    p.add_argument("--cost-model", default="measure",
                   choices=("measure", "rule", "csr", "dense", "masked"),
                   help="how each layer's kernel is chosen per batch size (default: measure)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], metavar="B",
                   help="batch sizes of the latency table (default: 1 64)")
    p.add_argument("--min-time", type=float, default=0.3, metavar="S",
                   help="seconds of timing per model and batch size (default: 0.3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def dense_twin(model: nn.Module) -> nn.Module:
    """The model with every LinearSVDO / Conv2dSVDO replaced by nn.Linear / nn.Conv2d holding its
    eval-mode weight θ ⊙ [log α < threshold]: what a dense deployment would run."""
    model = copy.deepcopy(model).eval()

    def convert(m: nn.Module) -> nn.Module:
        w = (m.weight * m.mask()).detach()
        if isinstance(m, LinearSVDO):
            d = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=w.device, dtype=w.dtype)
        else:
            d = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sparsevd deploy`` with ``argv`` (the arguments after ``deploy``); returns the exit
    status (0 ok, 1 unreadable checkpoint, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if any(b <= 0 for b in args.batch):
        print("sparsevd deploy: --batch sizes must be positive", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from .cli import load_checkpoint  # the training CLI owns the checkpoint format

    try:
        model = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"sparsevd deploy: cannot read checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    if not any(isinstance(m, SVDO_LAYERS) for m in model.modules()):
        print(f"sparsevd deploy: checkpoint {args.checkpoint} has no sparse-VD layers (trained "
              "without sparse VD?); nothing to deploy", file=sys.stderr)
        return 1
    if args.threshold is not None:
        for m in model.modules():
            if isinstance(m, SVDO_LAYERS):
                m.threshold = float(args.threshold)
    model.eval()
    shape = sample_shape(args.checkpoint)
    example = torch.randn(1, *shape)
    deployed = deploy(model, example, cost_model=args.cost_model)
    out = save(deployed, args.out)
    dense = dense_twin(model)

    db, sb = dense_bytes(model), deployed_bytes(deployed)
    print(f"checkpoint : {args.checkpoint}")
    print(f"deployed   : {out} ({out.stat().st_size} bytes on disk)")
    print(f"kernels    : {'sparsevd._C (compiled)' if extension_available() else 'torch fallback'}, "
          f"{torch.get_num_threads()} threads, cost model {args.cost_model}")
    print(f"dense size : {db} bytes (fp weights + biases)")
    print(f"sparse size: {sb} bytes (CSR values + indices + biases), {db / max(sb, 1):.1f}x smaller")
    print()
    print("layers:")
    for name, m in deployed.named_modules():
        if isinstance(m, SPARSE_LAYERS):
            plan = ", ".join(f"{'<=' + str(b) if b is not None else 'else'}:{mode}" for b, mode in m.plan)
            kept = (f"{m.out_features}x{m.in_features}" if isinstance(m, SparseLinear)
                    else f"{m.out_channels}x{m.in_channels}")
            print(f"  {name:<6} {type(m).__name__:<13} trained {'x'.join(map(str, m.dense_shape)):<12} "
                  f"deployed {kept:<9} nnz {m.num_nonzero:<8} plan [{plan}]")
    print()
    print(f"{'batch':>5}  {'dense ms':>10}  {'deployed ms':>11}  {'speedup':>7}  {'max |diff|':>10}")
    for b in args.batch:
        x = torch.randn(b, *shape)
        t = latency({"dense": dense, "deployed": deployed}, x, args.min_time)
        med = {k: v[len(v) // 2] * 1e3 for k, v in t.items()}
        with torch.no_grad():
            diff = (dense(x) - deployed(x)).abs().max().item()
        print(f"{b:>5}  {med['dense']:>10.4f}  {med['deployed']:>11.4f}  "
              f"{med['dense'] / med['deployed']:>6.2f}x  {diff:>10.2e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
