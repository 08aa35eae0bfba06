"""Data-parallel training on torch.distributed (DistributedDataParallel with gloo on the CPU, NCCL
on GPUs), as ``torchrun --nproc-per-node N -m sparsevd train ...`` starts it.

What sparse VD needs of it, and where it is done:

- the SGVLB data term averaged over the ranks as DDP averages gradients: each rank's loss is
  N · mean cross-entropy of its share of the global batch + β · KL, and DDP averages the gradients,
  so the data term is the mean over ranks and the KL (the same on every rank) counts once per step;
- different LRT noise on each rank, reproducible from the seed: each rank seeds torch's generator
  with (seed, rank) after the model is built (the model itself is identical on every rank);
- only rank 0 prints and writes files; every rank stops together on a non-finite loss.

The helpers here are thin wrappers of torch.distributed; nothing here reimplements it.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import torch.distributed as dist

__all__ = ["all_finite", "all_gather_objects", "barrier", "close_group", "init_from_env", "is_distributed",
           "rank_and_world", "rank_seed", "sum_over_ranks"]


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_type: str) -> Tuple[int, int, bool]:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE`` > 1):
    gloo for CPU training, NCCL for CUDA (each rank on GPU ``LOCAL_RANK``).

    Returns:
        (rank, world size, whether this call initialized the group, so the caller destroys it).

    Raises:
        RuntimeError: CUDA training with more processes on this node than visible GPUs (NCCL
            takes one GPU per process); the message names ``--nproc-per-node``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if device_type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise RuntimeError(
                f"--nproc-per-node: process LOCAL_RANK={local_rank} has no GPU of its own ({gpus} "
                "visible); NCCL needs one GPU per process: start at most that many per node, or "
                "train on the CPU (gloo)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if is_distributed():
        dist.barrier()


def close_group() -> None:
    """Destroy the process group that :func:`init_from_env` created. Garbage-collects first: a
    DistributedDataParallel wrapper left in a reference cycle would otherwise be freed after the
    group, or during interpreter shutdown, where gloo's worker threads releasing their work can
    abort the process. That is the suspected cause of one rank of a 2-rank CI run aborting with
    "terminate called without an active exception" after its last epoch; 30 local runs did not
    reproduce it, before or after this change."""
    import gc

    gc.collect()
    dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s noise: ``seed`` itself on rank 0, distinct 63-bit values on the
    others (a fixed odd multiplier, so the streams of neighbouring seeds do not collide)."""
    return (seed + rank * 0x9E3779B97F4A7C15) % (2**63)


def all_finite(value: float, device) -> bool:
    """True when ``value`` is finite on every rank (one tiny all-reduce), so that every rank stops
    at the same step."""
    import math

    if not is_distributed():
        return math.isfinite(value)
    flag = torch.tensor([1.0 if math.isfinite(value) else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def sum_over_ranks(values: List[float], device) -> List[float]:
    """Element-wise sums of ``values`` over the ranks (the values themselves outside a group)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (``[obj]`` outside a group)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
