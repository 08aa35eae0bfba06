"""What a run carries from epoch to epoch and across a resume: the accumulators
(:class:`Progress`), the RNG states (torch's, CUDA's, the loaders' generators) and the training
checkpoint (:func:`write_checkpoint`, :func:`load_resume_state`, :func:`restore`).

A resumed run equals the uninterrupted one bit for bit (same device, same thread count): the
model, Adam, the schedule, fp16's scaler, every RNG state that decides noise and batch order.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .. import distributed
from ..checkpoint import load_train_state, optimizer_state, optimizer_tensors, save_checkpoint

__all__ = ["RECIPE_KEYS", "Progress", "load_resume_state", "loader_generators", "loader_samplers",
           "restore", "write_checkpoint"]

#: The settings a resumed run must share with the run it continues.
RECIPE_KEYS = ("epochs", "lr", "lr_decay", "method", "pretrain_epochs", "kl_warmup_epochs",
               "threshold", "train_size", "steps_per_epoch", "amp", "train_clip", "target_compression",
               "target_scope", "finetune_epochs")
#: What a saved run that lacks a recipe key ran with (the key is newer than the run).
_RECIPE_BEFORE = {"finetune_epochs": 0}


@dataclasses.dataclass
class Progress:
    """The run's accumulators, saved in every checkpoint: the epoch rows, the step times (ms),
    the seconds spent training and evaluating, and the epoch the run (re)started at."""

    history: List[dict] = dataclasses.field(default_factory=list)
    step_ms: List[float] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    start_epoch: int = 0

    @property
    def last_finite_loss(self) -> Optional[float]:
        """The mean loss of the last epoch done (None before the first)."""
        return self.history[-1]["loss"] if self.history else None

    @property
    def last_epoch_done(self) -> Optional[int]:
        """The 1-based number of the last epoch done (None before the first)."""
        return self.history[-1]["epoch"] if self.history else None


def loader_generators(loader) -> List[torch.Generator]:
    """The torch.Generators that decide a loader's batch order (the loader's own, its sampler's,
    a batch sampler's inner sampler's), so that a resumed run draws the same batches."""
    found: List[torch.Generator] = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for cand in (obj, getattr(obj, "sampler", None)):
            g = getattr(cand, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
    return found


def loader_samplers(loader) -> list:
    """The samplers of a loader and of its batch sampler (to call ``set_epoch`` on)."""
    found = []
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for cand in (obj, getattr(obj, "sampler", None)):
            if cand is not None and all(cand is not f for f in found):
                found.append(cand)
    return found


def load_resume_state(ckpt_dir: Path, recipe: dict):
    """The training state saved in ``ckpt_dir`` and its :class:`Progress`.

    Raises:
        ValueError: the saved run has other settings (of :data:`RECIPE_KEYS`; the message names
            them), a corrupted state.
        FileNotFoundError: no training state in ``ckpt_dir``.
    """
    saved = load_train_state(ckpt_dir)
    meta = saved.meta
    old = {k: meta["recipe"].get(k, _RECIPE_BEFORE.get(k)) for k in RECIPE_KEYS}
    different = [k for k in RECIPE_KEYS if old[k] != recipe[k]]
    if different:
        raise ValueError("resume: the saved run in " f"{ckpt_dir} has other settings: "
                         + ", ".join(f"{k} = {old[k]!r} (given {recipe[k]!r})"
                                     for k in different))
    progress = Progress(history=meta["history"], step_ms=meta["step_ms"],
                        train_seconds=meta["train_seconds"], eval_seconds=meta["eval_seconds"],
                        start_epoch=int(meta["epoch"]))
    return saved, progress


def _rank_suffix(rank: int, world: int) -> str:
    return f".rank{rank}" if world > 1 else ""


def restore(saved, model: nn.Module, opt, sched, scaler, generators, device: torch.device,
            rank: int, world: int) -> None:
    """Load the saved model, Adam, schedule, scaler and RNG states (this rank's) into the run.

    Raises:
        ValueError: the state does not fit the model (another run's state), or has no RNG state
            for this rank (saved by another number of processes).
    """
    model_state, tensors, meta, state_path = saved
    try:
        model.load_state_dict(model_state, strict=True)
        opt.load_state_dict(optimizer_state(tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as e:
        why = "; ".join(line.strip() for line in str(e).splitlines()[1:4] if line.strip())
        raise ValueError(f"{state_path}: the training state does not fit this run's model "
                         f"(another run's state copied here?): {why or e}") from None
    if sched is not None:
        sched.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    suffix = _rank_suffix(rank, world)
    if f"rng.torch{suffix}" not in tensors:
        raise ValueError(f"resume: the saved run has no RNG state for rank {rank} (it ran on "
                         f"{meta.get('world_size', 1)} processes, this one on {world})")
    torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    if device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], device)
    for i, g in enumerate(generators):
        g.set_state(tensors[f"rng.loader{i}"])


def _rng_tensors(rngs, generators, world: int) -> dict:
    tensors = {}
    for r, (cpu_state, cuda_state) in enumerate(rngs):
        suffix = _rank_suffix(r, world)
        tensors[f"rng.torch{suffix}"] = cpu_state
        if cuda_state is not None:
            tensors[f"rng.cuda{suffix}"] = cuda_state
    for i, g in enumerate(generators):
        tensors[f"rng.loader{i}"] = g.get_state()
    return tensors


def write_checkpoint(ckpt_dir: Path, model: nn.Module, *, epoch_done: int, recipe: dict,
                     progress: Progress, opt, sched, scaler, generators, svd_phase: bool,
                     checkpoint_config: Optional[dict], device: torch.device, rank: int,
                     world: int, target_state: Optional[dict] = None) -> None:
    """Write the model, its config and the training state after epoch ``epoch_done`` as one
    atomic unit (:func:`sparsevd.checkpoint.save_checkpoint`: a crash keeps the previous
    epoch's). Every rank takes part (their RNG states are gathered); rank 0 writes."""
    rngs = distributed.all_gather_objects(  # every rank's generators, written by rank 0
        (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    if rank != 0:
        return
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = dict(opt_tensors)
    tensors.update(_rng_tensors(rngs, generators, world))
    state = (tensors, {
        "epoch": epoch_done, "recipe": recipe, "optimizer": opt_meta,
        "scheduler": sched.state_dict() if sched is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": progress.history, "step_ms": progress.step_ms,
        "train_seconds": progress.train_seconds, "eval_seconds": progress.eval_seconds,
        "svd_phase": svd_phase, "world_size": world,
    })
    if target_state is not None:  # the compression controller's (absent without a target)
        state[1]["target"] = target_state
    config = None if checkpoint_config is None else dict(checkpoint_config, svd=svd_phase)
    save_checkpoint(model, ckpt_dir, config, train_state=state)
