"""Training with sparse variational dropout: :func:`fit` (the loop, for any model and data loaders)
and :func:`run` (what ``sparsevd train`` does: data, model, :func:`fit`, checkpoint, summary).

Recipe (Molchanov, Ashukha, Vetrov, ICML 2017, sec. 5): Adam, lr 1e-3, batch 100, loss SGVLB =
N · mean cross-entropy + β · KL (eq. 3) with N = number of training examples and β warmed up
linearly from 0 to 1 (here per step), log σ² initialised to −10, weights with log α ≥ 3 dropped at
evaluation. :func:`resolve_recipe` gives the defaults tuned for 30-epoch CPU runs (README,
"Recipe"): the first third of the epochs trains the dense model, which is then converted to
sparse-VD layers; β warms up over the next third; the learning rate decays linearly to 0 over the
whole run. ``pretrain_epochs=0, kl_warmup_epochs=5, lr_decay="none"`` is the plain from-scratch
recipe. Dense runs use the same optimiser and schedule with plain cross-entropy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, metadata, optim
from .allocator import keep_freed_memory
from ._files import atomic_write_bytes, check_writable, digest
from .checkpoint import (CHECKPOINT_WEIGHTS, checkpoint_owning, load_train_state, optimizer_state,
                         optimizer_tensors, read_config, save_checkpoint)
from .convert import convert, report
from .data import make_loaders
from .loss import SGVLB, kl_divergence, svdo_layers
from .models import build_model
from .nn import DEFAULT_THRESHOLD, Conv2dSVDO
from .plots import plot_run
from .uncertainty import evaluate_predictive

__all__ = ["METHODS", "TrainConfig", "TrainingDiverged", "adam", "evaluate", "fit", "resolve_recipe", "run"]

METHODS = ("sparse_vd", "dense")
LR_DECAYS = ("linear", "none")
#: Mixed precision of ``fit(amp=...)``: the autocast dtype of the forward (parameters, the KL and
#: the LRT variance stay fp32; fp16 adds a GradScaler and needs CUDA).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fp16_init_scale(loss_scale: float) -> float:
    """The initial scale of fp16 training's GradScaler for a loss of magnitude ``loss_scale`` per
    image: 2¹⁶ (GradScaler's default) for a mean cross-entropy (1), 2¹⁶ / 2^⌈log₂ N⌉ for the SGVLB
    N · CE + β · KL, whose ∂/∂logit is N/B times larger (paper, eq. 3): with the default, the first
    fp16 gradients of a 60 000-image data term overflow (N/B · 2¹⁶ > 65 504) and GradScaler would
    skip some ten steps backing off. A power of two, so scaling is exact."""
    return 2.0 ** (16 - math.ceil(math.log2(max(loss_scale, 1.0))))


@dataclasses.dataclass
class TrainConfig:
    """The settings of one ``sparsevd train`` run (the CLI's options, same names and defaults).

    ``pretrain_epochs`` and ``kl_warmup_epochs`` left as None take the defaults of
    :func:`resolve_recipe` (a third of ``epochs`` each).
    """

    model: str = "lenet300"
    dataset: str = "fashion-mnist"
    epochs: int = 30
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay: str = "linear"
    kl_warmup_epochs: Optional[float] = None
    pretrain_epochs: Optional[int] = None
    threshold: float = DEFAULT_THRESHOLD
    dense: bool = False
    device: str = "auto"
    seed: int = 0
    data_dir: Optional[str] = None
    download: bool = True
    out: Optional[str] = None
    json: Optional[str] = None
    subset: Optional[int] = None
    threads: Optional[int] = None
    progress: bool = True
    amp: Optional[str] = None
    #: On by default since issue 23 (item 8): better accuracy and compression on seeds 0 and 1
    #: (README, "Train-time clipping"); ``--no-train-clip`` turns it off.
    train_clip: bool = True

    def out_dir(self) -> Path:
        """``out``, or ``runs/<model>-<svd|dense>-<dataset>``."""
        if self.out:
            return Path(self.out)
        return Path("runs") / f"{self.model}-{'dense' if self.dense else 'svd'}-{self.dataset}"


def resolve_recipe(config):
    """Fill in the defaults that depend on ``epochs`` (in place; also returns ``config``, a
    :class:`TrainConfig` or an argparse namespace with the same fields).

    ``pretrain_epochs`` defaults to ``epochs // 3`` and ``kl_warmup_epochs`` to ``epochs / 3``:
    a third of the run trains the dense model, the sparse-VD phase warms β up over the next
    third and trains at β = 1 for the last one. With ``dense`` both are 0.
    """
    if config.dense:
        config.pretrain_epochs = 0
        config.kl_warmup_epochs = 0.0 if config.kl_warmup_epochs is None else config.kl_warmup_epochs
        return config
    if config.pretrain_epochs is None:
        config.pretrain_epochs = config.epochs // 3
    if config.kl_warmup_epochs is None:
        config.kl_warmup_epochs = config.epochs / 3
    return config


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode over ``loader``.

    The model is left in eval mode; sparse-VD layers use their deterministic masked weights.
    """
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)


def backend_name(model: nn.Module, device) -> Optional[str]:
    """The ops backend that runs the model's sparse-VD layers on ``device`` (None for a model
    without sparse-VD or convertible layers); counts the layers a dense pre-training converts."""
    from .ops.backend import get_impl

    kinds = {type(m) for m in model.modules()}
    if not kinds & {Conv2dSVDO, nn.Conv2d} and not svdo_layers(model) and nn.Linear not in kinds:
        return None
    op = "lrt_conv2d" if kinds & {Conv2dSVDO, nn.Conv2d} else "lrt_linear"
    try:
        return get_impl(op, torch.device(device))[0]
    except Exception as e:  # reported, not fatal: the first forward raises the real error
        return f"unavailable ({e})"


def _finite(v: float):
    return v if math.isfinite(v) else None


def _json_safe(obj):
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class TrainingDiverged(FloatingPointError):
    """A training run produced a non-finite loss or parameter and was stopped.

    Attributes: ``epoch`` (1-based), ``step`` (0-based within the epoch), ``global_step``,
    ``loss`` (the non-finite value), ``last_finite_loss`` (or None), ``layers`` (names of the
    parameters with non-finite values), ``checkpoint_epoch`` (the last good checkpoint kept, or
    None).
    """

    def __init__(self, message: str, **info) -> None:
        super().__init__(message)
        self.__dict__.update(info)


def _nonfinite_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters (and gradients, marked ".grad") holding NaN or ±inf: one pass over
    them, run only when a step's loss was not finite or before a checkpoint is written."""
    bad = []
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            bad.append(name)
        elif p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad.append(name + ".grad")
    return bad


def _loader_generators(loader) -> List[torch.Generator]:
    """The torch.Generators that decide a loader's batch order (the loader's own, its sampler's,
    a batch sampler's inner sampler's), so that a resumed run draws the same batches."""
    found: List[torch.Generator] = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for cand in (obj, getattr(obj, "sampler", None)):
            g = getattr(cand, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
    return found


def _loader_samplers(loader) -> list:
    """The samplers of a loader and of its batch sampler (to call ``set_epoch`` on)."""
    found = []
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for cand in (obj, getattr(obj, "sampler", None)):
            if cand is not None and all(cand is not f for f in found):
                found.append(cand)
    return found


#: The settings a resumed run must share with the run it continues.
_RECIPE_KEYS = ("epochs", "lr", "lr_decay", "method", "pretrain_epochs", "kl_warmup_epochs",
                "threshold", "train_size", "steps_per_epoch", "amp", "train_clip")


def adam(params, lr: float) -> optim.Adam:
    """The recipe's optimiser: torch's Adam with its fused kernel (one pass per parameter group
    instead of ~10 elementwise passes per tensor: sparse VD doubles the parameters, log σ² beside
    θ, so this matters twice as much as for dense training), on every device torch has it for
    (CPU and CUDA since torch 2.4); else the default implementation. Same update rule either way.
    :class:`sparsevd.optim.Adam`: its steps flush subnormal moments to zero (issue 23, item 8)."""
    params = list(params)
    types = {p.device.type for p in params}
    if types <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in params):
        try:
            return optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # a torch without fused Adam for this case
            pass
    return optim.Adam(params, lr=lr)


def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    *,
    epochs: int,
    lr: float = 1e-3,
    lr_decay: str = "linear",
    method: str = "sparse_vd",
    pretrain_epochs: int = 0,
    kl_warmup_epochs: float = 5.0,
    threshold: float = DEFAULT_THRESHOLD,
    train_size: Optional[int] = None,
    device=None,
    progress: bool = False,
    on_epoch: Optional[Callable[[dict], None]] = None,
    checkpoint_dir=None,
    checkpoint_config: Optional[dict] = None,
    resume: bool = False,
    mc_samples: int = 10,
    amp: Optional[str] = None,
    train_clip: Optional[bool] = None,
) -> dict:
    """Train ``model`` with sparse VD (or dense) and return the run's summary.

    Sparse VD (``method="sparse_vd"``): the model's nn.Linear / nn.Conv2d layers train densely with
    cross-entropy for ``pretrain_epochs`` epochs, then :func:`sparsevd.convert` turns them into
    sparse-VD layers (θ and b kept, log σ² = −10, in place) and training goes on with
    :class:`~sparsevd.SGVLB` (β rising per step from 0 to 1 over ``kl_warmup_epochs`` epochs
    counted from the conversion) and a fresh Adam on the same learning-rate schedule. A model that
    already has sparse-VD layers trains with SGVLB from the first epoch. ``method="dense"``:
    cross-entropy throughout.

    Divergence: the loss of every step is read anyway (for the running mean), and a non-finite one
    stops the run with :class:`TrainingDiverged`: the epoch, the step, the last finite loss and the
    parameters holding NaN / inf (found by one pass over them, on failure only); the parameters
    are checked once more before each checkpoint, so no checkpoint ever stores a non-finite value,
    and the last good one is kept.

    Data parallel: inside a torch.distributed process group (``torchrun``) the model trains as a
    DistributedDataParallel module: each rank's loss is the SGVLB of its share of the batch, DDP
    averages the gradients (the data term averaged, the KL counted once), every rank stops on a
    non-finite loss of any rank, rank 0 alone writes the checkpoints (with every rank's RNG state)
    and calls ``on_epoch``; the summary records ``world_size`` and whether the ranks ended with
    identical parameters (``ranks_in_sync``). See :mod:`sparsevd.distributed`.

    Checkpoints (``checkpoint_dir``): at the end of every epoch, as one atomic unit
    (:func:`sparsevd.checkpoint.save_checkpoint`: a crash keeps the previous epoch's whole), the
    training state (``train_state.safetensors``: model, Adam, schedule, RNG states of torch and of
    the loaders' generators, epoch, history; the measured times in ``timings.json``) and, with
    ``checkpoint_config``, the model checkpoint (``model.safetensors`` + ``config.json``).
    ``resume=True`` continues from the training state in ``checkpoint_dir``: the same settings, the
    same model architecture (as built before training; a sparse-VD phase is converted again; a
    state of another model is a ValueError naming the file) and, for a result equal bit for bit to
    the uninterrupted run, the same thread count.

    Args:
        model: a container module (e.g. ``sparsevd.models.LeNet300(svd=False)``), trained in place
            and converted in place after the pre-training; inputs and targets as ``train_loader``
            yields them (images (B, ...) float, labels (B,) int64).
        train_loader, test_loader: iterables of ``(x, y)`` batches; ``len(train_loader)`` steps an
            epoch.
        epochs: total number of epochs (pre-training included), ≥ 1.
        lr: Adam's learning rate; ``lr_decay="linear"`` decays it to 0 at the last step, "none"
            keeps it.
        pretrain_epochs: dense epochs before the conversion (sparse VD only), < ``epochs``.
        kl_warmup_epochs: epochs of the β warm-up (0: β = 1 from the conversion).
        threshold: log α pruning threshold of the converted layers.
        train_size: N of the SGVLB (default: ``len(train_loader.dataset)``).
        device: where to train (default: the model's parameters' device).
        progress: show a tqdm progress bar per epoch (on stderr).
        on_epoch: called with each epoch's history row (a dict) after its evaluation and its
            checkpoint (on rank 0 only in a process group).
        checkpoint_dir: directory of the per-epoch checkpoints (None: none are written).
        checkpoint_config: the config of the model checkpoint (:func:`sparsevd.save_checkpoint`:
            ``model``, ``svd``, ``threshold``, ...); ``svd`` is set to the phase trained.
        resume: continue the run saved in ``checkpoint_dir``.
        mc_samples: S of the Monte-Carlo predictive evaluation at the end (sparse VD only; 0: none).
        amp: mixed precision: None (fp32), "bf16" (autocast, CPU or CUDA) or "fp16" (autocast and
            a GradScaler per phase starting at :func:`fp16_init_scale` of its loss, CUDA only).
            The parameters, the KL and the LRT variance path stay fp32 (σ² ≈ e⁻¹⁰ would
            underflow fp16); evaluation runs in fp32.
        train_clip: train-time clipping of the sparse-VD layers (``sparsevd.convert(...,
            train_clip=)``: the weights with log α ≥ ``threshold`` leave the LRT forward and
            backward); True / False is set on every sparse-VD layer, None keeps what the model's
            layers have (off for the layers ``fit`` converts).

    Returns:
        The summary: ``test_accuracy`` (fraction, eval mode, after the last epoch),
        ``compression``, ``sparsity`` and ``per_layer_sparsity`` (fractions), ``history`` (one row
        per epoch: loss (SGVLB per image, or cross-entropy), ce, kl_per_image, beta, lr,
        test_accuracy, compression, train_seconds), ``report``, ``train_seconds`` (training
        steps only), step-time quantiles (``median_ms``, ``p20_ms``, ``p80_ms``), the recipe,
        ``device``, ``backend``, ``keep_freed_memory`` (whether CPU training runs with
        :func:`sparsevd.allocator.keep_freed_memory`'s heap settings), versions, the commit, ``resumed_from_epoch`` and ``predictive``:
        test accuracy, expected calibration error (15 bins), NLL and mean entropy of the
        deterministic eval-mode prediction (``eval``) and, for sparse VD, of the Monte-Carlo
        predictive mean over ``mc_samples`` LRT samples (``mc``; :func:`sparsevd.predict`).

    Raises:
        ValueError: an unknown ``method`` or ``lr_decay``, ``pretrain_epochs`` ≥ ``epochs``,
            ``epochs`` < 1, a bare nn.Linear / nn.Conv2d as ``model`` (it cannot be converted in
            place), ``resume`` without ``checkpoint_dir`` or with other settings than the saved
            run's (the message names them), a corrupted training state.
        FileNotFoundError: ``resume`` and no training state in ``checkpoint_dir``.
        TrainingDiverged: a non-finite loss or parameter (see above).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"lr_decay: expected one of {LR_DECAYS}, got {lr_decay!r}")
    if epochs < 1:
        raise ValueError(f"epochs: expected ≥ 1, got {epochs}")
    svd = method == "sparse_vd"
    pretrain = pretrain_epochs if svd else 0
    if svd and not 0 <= pretrain < epochs:
        raise ValueError(f"pretrain_epochs: expected 0 ≤ pretrain_epochs < epochs = {epochs}, got {pretrain}")
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise ValueError("model: expected a container module (e.g. nn.Sequential), got a bare "
                         f"{type(model).__name__}; it cannot be converted in place")
    if resume and checkpoint_dir is None:
        raise ValueError("resume: needs checkpoint_dir, the directory of the run to continue")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp: expected None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    kept = keep_freed_memory() if device.type == "cpu" else False  # no page faults per step
    commit = metadata.git_commit()  # the code this run starts with, not HEAD at its end
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 needs a CUDA device (its GradScaler); use amp='bf16' on the CPU")
    if train_size is None:
        train_size = len(train_loader.dataset)
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    recipe = dict(epochs=epochs, lr=lr, lr_decay=lr_decay, method=method, pretrain_epochs=pretrain,
                  kl_warmup_epochs=kl_warmup_epochs if svd else None, threshold=threshold,
                  train_size=train_size, steps_per_epoch=steps_per_epoch, amp=amp,
                  train_clip=train_clip)

    def grad_scaler(svd_phase: bool) -> Optional[torch.amp.GradScaler]:
        if amp != "fp16":
            return None
        return torch.amp.GradScaler("cuda", init_scale=fp16_init_scale(train_size if svd_phase else 1.0))

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    generators = _loader_generators(train_loader)

    def optimizer(first_step: int):
        # Adam; with linear decay lr_k = lr · (1 − k / total_steps) at global step k (0 at the end)
        opt = adam(model.parameters(), lr)
        if lr_decay != "linear":
            return opt, None
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: max(0.0, 1.0 - (k + first_step) / total_steps))

    history: List[dict] = []
    step_ms: List[float] = []
    train_seconds = eval_seconds = 0.0
    start_epoch = 0
    saved = None
    if resume:
        saved = load_train_state(ckpt_dir)
        meta = saved.meta
        different = [k for k in _RECIPE_KEYS if meta["recipe"].get(k) != recipe[k]]
        if different:
            raise ValueError("resume: the saved run in " f"{ckpt_dir} has other settings: "
                             + ", ".join(f"{k} = {meta['recipe'].get(k)!r} (given {recipe[k]!r})"
                                         for k in different))
        start_epoch = int(meta["epoch"])
        history, step_ms = meta["history"], meta["step_ms"]
        train_seconds, eval_seconds = meta["train_seconds"], meta["eval_seconds"]
    # the sparse-VD phase has begun when the run starts from scratch without pre-training, or
    # resumes after the epoch whose start converted the model (resuming right at that epoch, the
    # loop converts it, as the uninterrupted run did)
    in_svd_phase = svd and (not pretrain or start_epoch > pretrain)
    scaler = grad_scaler(in_svd_phase)

    def to_svd() -> None:  # convert, then the layers' train-time clipping as asked
        if not svdo_layers(model):
            convert(model, threshold=threshold)
        if train_clip is not None:
            for _, layer in svdo_layers(model):
                layer.train_clip = train_clip

    if in_svd_phase:
        to_svd()
    model.to(device)
    rank, world = distributed.rank_and_world()

    def data_parallel() -> nn.Module:
        # DDP averages the gradients over the ranks: the SGVLB data term becomes the mean over
        # the ranks' shares of the global batch, the KL (the same on every rank) counts once
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    opt, sched = optimizer(pretrain * steps_per_epoch if in_svd_phase and pretrain else 0)
    if saved is not None:
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
        suffix = f".rank{rank}" if world > 1 else ""
        if f"rng.torch{suffix}" not in tensors:
            raise ValueError(f"resume: the saved run has no RNG state for rank {rank} (it ran on "
                             f"{meta.get('world_size', 1)} processes, this one on {world})")
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        if device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], device)
        for i, g in enumerate(generators):
            g.set_state(tensors[f"rng.loader{i}"])
    crit = SGVLB(model, train_size, kl_warmup_epochs=kl_warmup_epochs) if in_svd_phase else None
    backend = backend_name(model, device) if svd else None

    def save(epoch_done: int) -> None:
        bad = _nonfinite_parameters(model)
        if bad:
            kept = epoch_done - 1 if ckpt_dir is not None and epoch_done > 1 else None
            raise TrainingDiverged(
                f"training diverged in epoch {epoch_done}: non-finite values in {', '.join(bad)} "
                "after its last step"
                + (f"; the checkpoint of epoch {kept} is kept in {ckpt_dir}" if kept else ""),
                epoch=epoch_done, step=steps_per_epoch - 1, global_step=epoch_done * steps_per_epoch - 1,
                loss=None, last_finite_loss=None, layers=bad, checkpoint_epoch=kept)
        if ckpt_dir is None:
            return
        rngs = distributed.all_gather_objects(  # every rank's generators, written by rank 0
            (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
        if rank != 0:
            return
        opt_tensors, opt_meta = optimizer_tensors(opt)
        tensors = dict(opt_tensors)
        for r, (cpu_state, cuda_state) in enumerate(rngs):
            suffix = f".rank{r}" if world > 1 else ""
            tensors[f"rng.torch{suffix}"] = cpu_state
            if cuda_state is not None:
                tensors[f"rng.cuda{suffix}"] = cuda_state
        for i, g in enumerate(generators):
            tensors[f"rng.loader{i}"] = g.get_state()
        state = (tensors, {
            "epoch": epoch_done, "recipe": recipe, "optimizer": opt_meta,
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history, "step_ms": step_ms, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds, "svd_phase": bool(svdo_layers(model)), "world_size": world,
        })
        # model, config and training state: one atomic unit (a crash keeps the previous epoch's)
        config = None if checkpoint_config is None else dict(checkpoint_config, svd=bool(svdo_layers(model)))
        save_checkpoint(model, ckpt_dir, config, train_state=state)

    from tqdm.auto import tqdm

    last_finite: Optional[float] = history[-1]["loss"] if history else None
    net = data_parallel()
    for epoch in range(start_epoch, epochs):
        if svd and pretrain and epoch == pretrain:
            # dense pre-training done: sparse-VD layers take over θ and b (log σ² = −10), with a
            # fresh Adam continuing the same learning-rate schedule
            to_svd()
            net = data_parallel()
            opt, sched = optimizer(epoch * steps_per_epoch)
            scaler = grad_scaler(True)  # the SGVLB is N times the dense loss
            crit = SGVLB(model, train_size, kl_warmup_epochs=kl_warmup_epochs)
        for sampler in _loader_samplers(train_loader):
            if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle every epoch
                sampler.set_epoch(epoch)
        phase_svd = svd and epoch >= pretrain
        model.train()
        t_ep = time.perf_counter()
        loss_sum = ce_sum = 0.0
        n_batches = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not progress, mininterval=0.5, file=sys.stderr)
        for i, (x, y) in enumerate(bar):
            t_step = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = net(x)
                if phase_svd:
                    crit.epoch = epoch - pretrain + i / steps_per_epoch  # β rises per step
                    loss = crit(logits, y)
                    with torch.no_grad():
                        ce = F.cross_entropy(logits, y)
                else:
                    loss = ce = F.cross_entropy(logits, y)
            loss_per_image = float(loss.detach()) / (train_size if phase_svd else 1)
            if not distributed.all_finite(loss_per_image, device):
                bad = _nonfinite_parameters(model)
                kept = history[-1]["epoch"] if history else None
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}, step {i} (global step "
                    f"{epoch * steps_per_epoch + i}): the loss is {loss_per_image}"
                    + (f"; non-finite values in {', '.join(bad)}" if bad else
                       "; the parameters are finite (the inputs or the loss overflowed)")
                    + (f"; last finite loss {last_finite:.6g}" if last_finite is not None
                       else "; no finite loss before it")
                    + (f"; the checkpoint of epoch {kept} is kept in {ckpt_dir}"
                       if kept is not None and ckpt_dir is not None else ""),
                    epoch=epoch + 1, step=i, global_step=epoch * steps_per_epoch + i,
                    loss=loss_per_image, last_finite_loss=last_finite, layers=bad,
                    checkpoint_epoch=kept if ckpt_dir is not None else None)
            last_finite = loss_per_image
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss_per_image
            ce_sum += float(ce.detach())
            step_ms.append(1e3 * (time.perf_counter() - t_step))
            n_batches += 1
            if i % 50 == 0 and progress:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ep_train = time.perf_counter() - t_ep
        train_seconds += ep_train
        loss_sum, ce_sum, n_batches = distributed.sum_over_ranks([loss_sum, ce_sum, n_batches], device)
        t_ev = time.perf_counter()
        acc = evaluate(model, test_loader, device)
        rep = report(model)
        eval_seconds += time.perf_counter() - t_ev
        row = {
            "epoch": epoch + 1,
            "epochs": epochs,
            "loss": loss_sum / max(n_batches, 1),
            "ce": ce_sum / max(n_batches, 1),
            "phase": "sparse_vd" if phase_svd else "dense",
            "kl_per_image": (float(kl_divergence(model).detach()) / train_size) if svd else 0.0,
            "beta": crit.beta if phase_svd else None,
            "lr": opt.param_groups[0]["lr"],
            "test_accuracy": acc,
            "compression": _finite(rep.compression),
            "train_seconds": ep_train,
        }
        history.append(row)
        save(epoch + 1)
        if on_epoch is not None and rank == 0:
            on_epoch(row)

    model.eval()
    rep = report(model)
    predictive = {"eval": evaluate_predictive(model, test_loader, device, 0)}
    if svd and mc_samples:
        predictive["mc"] = evaluate_predictive(model, test_loader, device, mc_samples, seed=0)
    digests = distributed.all_gather_objects(digest(model.state_dict()))
    q = torch.tensor(step_ms or [float("nan")], dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {
        "median_ms": _finite(q[0]),
        "p20_ms": _finite(q[1]),
        "p80_ms": _finite(q[2]),
        **{k: v for k, v in recipe.items() if k != "steps_per_epoch"},
        "svd": svd,
        "test_accuracy": history[-1]["test_accuracy"],
        "compression": _finite(rep.compression),
        "sparsity": rep.sparsity / 100.0,
        "per_layer_sparsity": [r.sparsity / 100.0 for r in rep.layers],
        "layers": [r.name for r in rep.layers],
        "params": rep.params,
        "nonzero": rep.nonzero,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "seconds_per_epoch": train_seconds / epochs,
        "resumed_from_epoch": start_epoch if resume else None,
        "world_size": world,
        "rank": rank,
        "ranks_in_sync": len(set(digests)) == 1,
        "device": device.type,
        "device_name": metadata.device_name(device),
        "num_threads": torch.get_num_threads(),
        "keep_freed_memory": kept,
        "cpu_count": os.cpu_count(),
        "backend": backend,
        **metadata.versions(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "history": history,
        "report": _json_safe(rep.as_dict()),
        "predictive": _json_safe(predictive),
    }


def run(config: TrainConfig, on_start: Optional[Callable[[dict], None]] = None,
        on_epoch: Optional[Callable[[dict], None]] = None, resume: bool = False
        ) -> Tuple[nn.Module, dict]:
    """What ``sparsevd train`` does: load the data set, build the model, :func:`fit` it with a
    checkpoint at the end of every epoch (``model.safetensors`` + ``config.json`` +
    ``train_state.safetensors``, see :mod:`sparsevd.checkpoint`), and write the summary
    (``summary.json``, and ``config.json``'s ``json`` path when given) and the pictures
    (``curves.png``, ``masks.png``: :func:`sparsevd.plots.plot_run`) under
    :meth:`TrainConfig.out_dir`.

    Args:
        config: the run's settings (``resolve_recipe`` is applied).
        on_start: called once before training with a dict describing the run (sizes, device,
            backend, threads, the epoch it resumes from).
        on_epoch: passed to :func:`fit`.
        resume: continue the run saved in ``config.out``: its settings come from its
            ``config.json``; of ``config``, only the :data:`RUNTIME_FIELDS` (threads, progress,
            json, data_dir, download, device) are used, where they differ from the defaults; any
            other field that differs from both its default and the saved run is an error.

    Returns:
        ``(model, summary)``: the trained model (eval mode) and the summary (a JSON-safe dict).

    Raises:
        FileNotFoundError: the data set cannot be found, downloaded or installed; ``resume`` of a
            directory without a checkpoint.
        ValueError: an invalid setting (see :func:`fit`), a corrupted checkpoint, ``resume`` with
            settings that contradict the saved run's (the message names them), a ``json`` path
            that is a file of a training checkpoint.
        FileWriteError (an OSError): a file cannot be written (a full disk): the message names
            it; the checkpoint of the last completed epoch is kept whole.
        TrainingDiverged: the run diverged (the last good checkpoint is kept).
    """
    if resume:
        config = _resumed_config(config)
    resolve_recipe(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, on_start, on_epoch, resume)
    finally:
        torch.set_num_threads(threads)


#: Settings a resumed run may change: where the data are, what is shown and written besides the
#: checkpoint, and where and on how many threads it runs. Every other setting is the recipe and
#: must be the saved run's. (The result equals the uninterrupted run's bit for bit only on the
#: same device with the same thread count: both change the rounding.)
RUNTIME_FIELDS = ("threads", "progress", "json", "data_dir", "download", "device")
#: Settings not stored in a checkpoint's ``train_config``: where the run writes (a resumed run
#: writes into the directory it continues), the summary's extra copy, the progress bar. Runs
#: that differ in them only write byte-identical checkpoints.
UNSAVED_FIELDS = ("out", "json", "progress")
#: What a checkpoint that lacks a field ran with, where the default has changed since.
_SAVED_BEFORE = {"train_clip": False}


def saved_settings(config: TrainConfig) -> dict:
    """The ``train_config`` that a run's checkpoint stores (every field but :data:`UNSAVED_FIELDS`)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in UNSAVED_FIELDS}


def resume_conflicts(saved: dict, given: dict) -> List[Tuple[str, object, object]]:
    """The settings of ``given`` (field name → value) that contradict the saved run's
    ``train_config`` ``saved``: ``(field, saved value, given value)`` for every field outside
    :data:`RUNTIME_FIELDS` and ``out`` whose value differs."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**_SAVED_BEFORE, **saved}
    return [(k, saved.get(k, defaults.get(k)), v) for k, v in given.items()
            if k not in RUNTIME_FIELDS and k != "out" and saved.get(k, defaults.get(k)) != v]


def _resumed_config(given: TrainConfig) -> TrainConfig:
    if not given.out:
        raise ValueError("resume: needs the run's directory (config.out)")
    saved = read_config(given.out).get("train_config")
    if not isinstance(saved, dict):
        raise ValueError(f"{given.out}: this checkpoint records no training settings to resume "
                         "(written by an older sparsevd?)")
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    asked = {k: v for k, v in dataclasses.asdict(given).items() if v != fields[k]}
    conflicts = resume_conflicts(saved, asked)
    if conflicts:
        raise ValueError(f"resume: the saved run in {given.out} has other settings: "
                         + ", ".join(f"{k} = {s!r} (given {v!r})" for k, s, v in conflicts)
                         + f"; a resumed run may change only {', '.join(RUNTIME_FIELDS)}")
    values = {k: v for k, v in {**_SAVED_BEFORE, **saved}.items() if k in fields and k not in UNSAVED_FIELDS}
    # a runtime setting given (other than its default) replaces the saved one
    values.update({k: getattr(given, k) for k in RUNTIME_FIELDS if getattr(given, k) != fields[k]},
                  out=given.out)
    return TrainConfig(**values)


def _run(config: TrainConfig, on_start, on_epoch, resume: bool) -> Tuple[nn.Module, dict]:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    rank, world, own_group = distributed.init_from_env(device.type)
    try:
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        result = _run_on(config, on_start, on_epoch, resume, device, rank, world)
        if own_group:
            distributed.barrier()  # every rank done (rank 0 writes the files) before the group goes
        return result
    finally:
        if own_group:
            distributed.close_group()


def _run_on(config: TrainConfig, on_start, on_epoch, resume: bool, device, rank: int,
            world: int) -> Tuple[nn.Module, dict]:
    svd = not config.dense
    out_dir = config.out_dir()
    if rank == 0:
        check_writable(out_dir, "output directory", directory=True)
        if config.json:
            check_writable(config.json, "summary file", directory=False)
            owner = checkpoint_owning(config.json, run_dir=out_dir)
            if owner is not None:
                raise ValueError(f"summary file {config.json} is a file of the training checkpoint "
                                 f"in {owner}: writing it would damage the checkpoint; choose another")
    else:  # only rank 0 prints and writes
        on_start = on_epoch = None
    torch.manual_seed(config.seed)

    t0 = time.perf_counter()
    train_loader, test_loader = make_loaders(
        config.dataset, config.batch_size, data_dir=config.data_dir, subset=config.subset,
        seed=config.seed, download=config.download, test_batch_size=1000, apt=config.download,
        world_size=world, rank=rank)
    train_size, test_size = len(train_loader.dataset), len(test_loader.dataset)
    data_seconds = time.perf_counter() - t0

    model = build_model(config.model, svd=svd and config.pretrain_epochs == 0,
                        threshold=config.threshold).to(device)
    if world > 1:  # the same model on every rank, then each rank's own noise stream
        torch.manual_seed(distributed.rank_seed(config.seed, rank))
    if on_start is not None:
        on_start({
            "model": config.model, "svd": svd, "dataset": config.dataset, "train_size": train_size,
            "test_size": test_size, "epochs": config.epochs, "batch_size": config.batch_size,
            "lr": config.lr, "lr_decay": config.lr_decay,
            "kl_warmup_epochs": config.kl_warmup_epochs, "pretrain_epochs": config.pretrain_epochs,
            "backend": backend_name(model, device) if svd else None, "device": str(device),
            "device_name": metadata.device_name(device), "threads": torch.get_num_threads(),
            "out": str(out_dir), "resume": resume, "amp": config.amp, "world_size": world,
            "train_clip": config.train_clip,
        })
    checkpoint_config = {
        "model": config.model, "svd": svd, "threshold": config.threshold,
        "dataset": config.dataset, "num_classes": 10, "input_shape": [1, 28, 28],
        "train_config": saved_settings(config)}
    fitted = fit(
        model, train_loader, test_loader, epochs=config.epochs, lr=config.lr,
        lr_decay=config.lr_decay, method="dense" if config.dense else "sparse_vd",
        pretrain_epochs=config.pretrain_epochs, kl_warmup_epochs=config.kl_warmup_epochs,
        threshold=config.threshold, train_size=train_size, device=device,
        progress=config.progress, on_epoch=on_epoch, checkpoint_dir=out_dir,
        checkpoint_config=checkpoint_config, resume=resume, amp=config.amp,
        train_clip=config.train_clip)

    summary = {
        "benchmark": f"{config.model}_train",
        "provider": "sparsevd" if svd else "dense",
        "mode": "train",
        "dtype": "float32" if config.amp is None else f"{AMP_DTYPES[config.amp]} autocast".replace("torch.", ""),
        "shape": f"batch={config.batch_size},train_size={train_size}",
        "model": config.model,
        "dataset": config.dataset,
        **fitted,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "subset": config.subset,
        "test_size": test_size,
        "data_seconds": data_seconds,
        "checkpoint": str(out_dir / CHECKPOINT_WEIGHTS),
    }
    if rank != 0:
        return model, summary
    text = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write_bytes(out_dir / "summary.json", text)
    if config.json:
        atomic_write_bytes(config.json, text)
    try:
        plot_run(out_dir)
    except Exception as e:  # a picture is no reason to lose a run: say why and go on
        warnings.warn(f"{out_dir}: the pictures (curves.png, masks.png) could not be drawn: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
    return model, summary
