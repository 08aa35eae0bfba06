"""``sparsevd deploy CHECKPOINT --out FILE``: a trained checkpoint → a deployed sparse model file.

Reads what ``sparsevd train --out DIR`` writes (model.safetensors + config.json, through
:func:`sparsevd.checkpoint.load_checkpoint`), runs :func:`sparsevd.deploy`, writes the deployed
model with :func:`sparsevd.save`, and prints

- sizes: the dense inference model's weights and biases vs the deployed model's tensors (bytes);
- a latency table, dense (the eval-mode masked model as nn.Linear / nn.Conv2d) vs deployed, at
  batch 1 and 64 (median of interleaved runs, ms), and the largest output difference.

Exit status: 0 on success, 1 when the checkpoint cannot be read (missing, truncated, not
safetensors, changed after it was written: the message says which file and what), ``--out`` is a
file of a training checkpoint (refused before anything is written: the deployed model would
replace the checkpoint's weights) or cannot be written (checked first; a full disk while
writing: one line naming the file, the previous file unchanged), 2 for usage errors.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .._files import check_writable
from ..checkpoint import checkpoint_owning, input_shape, load_checkpoint
from ..compare import deployed_bytes, dense_bytes, dense_twin, latency
from ..deploy import deploy
from ..io import save
from ..nn.sparse import SPARSE_LAYERS, SparseLinear
from ..nn.svdo import SVDO_LAYERS
from ..ops.library import available as extension_available
from .args import finite_float, positive_float, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsevd deploy",
        description="Turn a checkpoint of `sparsevd train` into a sparse inference model "
                    "(CSR layers, dead neurons removed) and compare it with the dense model.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="directory written by `sparsevd train --out DIR` (or its model.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="deployed model file (.safetensors)")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help="log α pruning threshold (default: the checkpoint's)")
    p.add_argument("--cost-model", default="measure",
                   choices=("measure", "rule", "csr", "dense", "masked"),
                   help="how each layer's format and kernel are chosen (default: measure)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 64], metavar="B",
                   help="batch sizes of the latency table (default: 1 64)")
    p.add_argument("--min-time", type=positive_float, default=0.3, metavar="S",
                   help="seconds of timing per model and batch size (default: 0.3)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads, which the cost model measures with (default: torch's)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sparsevd deploy`` with ``argv`` (the arguments after ``deploy``); returns the exit
    status (0 ok, 1 unreadable checkpoint, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    owner = checkpoint_owning(args.out)
    if owner is not None:
        print(f"sparsevd deploy: --out {args.out} is a file of the training checkpoint in {owner}: "
              "the deployed model would replace it; choose another file", file=sys.stderr)
        return 1
    try:
        check_writable(args.out, "--out", directory=False)
    except OSError as e:
        print(f"sparsevd deploy: {e}", file=sys.stderr)
        return 1
    try:
        model = load_checkpoint(args.checkpoint)
        shape = input_shape(args.checkpoint)
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
    example = torch.randn(1, *shape)
    deployed = deploy(model, example, cost_model=args.cost_model)
    try:
        out = save(deployed, args.out)
    except OSError as e:  # a full disk: FileWriteError names the file, the old one is unchanged
        print(f"sparsevd deploy: {e}", file=sys.stderr)
        return 1
    dense = dense_twin(model)

    db, sb = dense_bytes(model), deployed_bytes(deployed)
    print(f"checkpoint : {args.checkpoint}")
    print(f"deployed   : {out} ({out.stat().st_size} bytes on disk)")
    print(f"kernels    : {'sparsevd._C (compiled)' if extension_available() else 'torch fallback'}, "
          f"{torch.get_num_threads()} threads, cost model {args.cost_model}")
    print(f"dense size : {db} bytes (fp weights + biases)")
    print(f"sparse size: {sb} bytes (CSR or dense weights + biases), {db / max(sb, 1):.1f}x smaller")
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
