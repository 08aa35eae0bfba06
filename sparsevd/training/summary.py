"""The summary ``fit`` returns: the result (accuracy, compression, the report, the predictive
evaluation), the recipe, the timings and where the run ran; JSON-safe (non-finite floats → None)."""
from __future__ import annotations

import datetime
import math
import os
from typing import List, Optional

import torch

from .. import distributed, metadata
from ..convert import Report
from .state import Progress

__all__ = ["finite", "fit_summary", "json_safe", "step_quantiles"]


def finite(v: float) -> Optional[float]:
    """``v``, or None when it is NaN or ±inf (JSON has no such numbers)."""
    return v if math.isfinite(v) else None


def json_safe(obj):
    """``obj`` with every non-finite float (in nested dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return finite(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def step_quantiles(step_ms: List[float]) -> dict:
    """The median and 20 / 80 % quantiles of the step times (ms; None without a step)."""
    q = torch.tensor(step_ms or [float("nan")], dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": finite(q[0]), "p20_ms": finite(q[1]), "p80_ms": finite(q[2])}


def fit_summary(*, rep: Report, predictive: dict, recipe: dict, progress: Progress, svd: bool,
                epochs: int, resumed: bool, digests: list, device: torch.device, rank: int,
                world: int, freed_memory_kept: bool, backend: Optional[str], commit) -> dict:
    """The summary of a finished run (see :func:`sparsevd.train.fit`, "Returns")."""
    return {
        **step_quantiles(progress.step_ms),
        **{k: v for k, v in recipe.items() if k != "steps_per_epoch"},
        "svd": svd,
        "test_accuracy": progress.history[-1]["test_accuracy"],
        "compression": finite(rep.compression),
        "sparsity": rep.sparsity / 100.0,
        "per_layer_sparsity": [r.sparsity / 100.0 for r in rep.layers],
        "layers": [r.name for r in rep.layers],
        "params": rep.params,
        "nonzero": rep.nonzero,
        "train_seconds": progress.train_seconds,
        "eval_seconds": progress.eval_seconds,
        "seconds_per_epoch": progress.train_seconds / epochs,
        "resumed_from_epoch": progress.start_epoch if resumed else None,
        "world_size": world,
        "rank": rank,
        "ranks_in_sync": len(set(digests)) == 1,
        "device": device.type,
        "device_name": metadata.device_name(device),
        "num_threads": torch.get_num_threads(),
        "keep_freed_memory": freed_memory_kept,
        "cpu_count": os.cpu_count(),
        "backend": backend,
        **metadata.versions(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "history": progress.history,
        "report": json_safe(rep.as_dict()),
        "predictive": json_safe(predictive),
    }
