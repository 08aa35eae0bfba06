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

The loop reads by phase: :func:`_setup` (arguments, resume, optimiser), per epoch
:func:`_begin_epoch` (the conversion after the dense pre-training), :func:`_train_epoch` (its
steps, :func:`_train_step`) and :func:`_end_epoch` (evaluation, history row, checkpoint), then
:func:`_finish` (the summary). What they share is a :class:`_Run`; the concepts beside the loop
live in :mod:`sparsevd.training` (configuration, precision, divergence, state, summary).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, metadata, optim
from .allocator import keep_freed_memory
from ._files import atomic_write_bytes, check_writable, digest
from .checkpoint import CHECKPOINT_WEIGHTS, checkpoint_owning
from .convert import convert, report
from .data import make_loaders
from .loss import SGVLB, kl_divergence, svdo_layers
from .models import build_model
from .nn import DEFAULT_THRESHOLD, Conv2dSVDO
from .plots import plot_run
from .training.config import (LR_DECAYS, METHODS, RUNTIME_FIELDS, UNSAVED_FIELDS, TrainConfig,
                              resolve_recipe, resume_conflicts, resumed_config, saved_settings)
from .training.divergence import TrainingDiverged, check_parameters, step_diverged
from .training.precision import AMP_DTYPES, autocast, check_amp, fp16_init_scale, grad_scaler
from .training.state import (Progress, load_resume_state, loader_generators, loader_samplers, restore,
                             write_checkpoint)
from .training.summary import finite, fit_summary
from .target import SCOPES, CompressionTarget, kept_floor, raise_to_floor
from .uncertainty import evaluate_predictive

__all__ = ["METHODS", "TrainConfig", "TrainingDiverged", "adam", "evaluate", "fit", "freeze_mask", "hold_mask",
           "resolve_recipe", "run"]

#: The share of the sparse-VD phase over which fit's compression target rises from 1× to the
#: target (measured on LeNet-300-100, benchmarks/NOTES.md; the rest holds it).
TARGET_RAMP = 0.5
#: Seconds between two updates of the progress bar's fields (tqdm's redraw interval): reading
#: the KL pass's kept count is a host sync on a GPU, so it is read when the bar can show it,
#: not after every step.
PROGRESS_REFRESH_S = 0.5

# Re-exported from sparsevd.training (their homes), importable from sparsevd.train as before.
_REEXPORTED = (AMP_DTYPES, LR_DECAYS, RUNTIME_FIELDS, UNSAVED_FIELDS, fp16_init_scale, resume_conflicts,
               saved_settings)


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
    loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
    target_compression: Optional[float] = None,
    target_scope: str = "linear",
    finetune_epochs: int = 0,
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
        train_loader, test_loader: iterables of ``(x, y)`` batches (any batch with ``loss_fn``);
            ``len(train_loader)`` steps an epoch. ``test_loader`` None: no evaluation
            (``test_accuracy`` None, no ``predictive``).
        epochs: total number of epochs (pre-training included), ≥ 1.
        lr: Adam's learning rate; ``lr_decay="linear"`` decays it to 0 at the last step, "none"
            keeps it.
        pretrain_epochs: dense epochs before the conversion (sparse VD only), < ``epochs``.
        kl_warmup_epochs: epochs of the β warm-up (0: β = 1 from the conversion).
        threshold: log α pruning threshold of the converted layers.
        train_size: N of the SGVLB (default: ``len(train_loader.dataset)``).
        device: where to train (default: the model's parameters' device).
        progress: show a tqdm progress bar per epoch (on stderr): the mean loss and, in the
            sparse-VD phase, the compression of the converted layers and of the whole model,
            counted in every step's KL pass (no pass of its own; issue 23 item 7) and read at
            most every ``PROGRESS_REFRESH_S`` seconds, tqdm's redraw interval (a read is a host
            sync on a GPU).
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
        loss_fn: the data term of any batch: ``loss_fn(model, batch) -> 0-dim tensor``, the mean
            over the batch's examples (e.g. ``lambda m, b: F.mse_loss(m(**b["inputs"]).logits,
            b["teacher"])`` for a Hugging Face dict batch), called with the batch moved to
            ``device`` (tensors in dicts, lists and tuples). The sparse-VD phase minimises
            N · loss_fn + β · KL (:meth:`sparsevd.SGVLB.with_kl`), the dense one loss_fn; the
            history's ``ce`` is its mean, and the evaluation is ``test_loss``, the mean of
            ``loss_fn`` over ``test_loader`` in eval mode (no accuracy, no ``predictive``).
            None: ``(x, y)`` batches and cross-entropy of ``model(x)`` (logits (B, C)).
        target_compression: end the run at this compression (> 1, e.g. 20 for 20×): a
            :class:`sparsevd.target.CompressionTarget` adapts a factor on the KL every step of
            the sparse-VD phase from the compression measured with the method's mask (log α <
            ``threshold``), its setpoint rising from 1× to the target over the first
            :data:`TARGET_RAMP` of the phase. This changes the objective (β ≠ 1); None, the
            default, is the paper's. The history's ``beta`` is the KL weight used (warm-up ×
            controller), ``target_beta`` the controller's factor. With ``train_clip=True`` (what
            ``sparsevd train`` uses) the controller holds the mask from the step that reaches
            the target (``CompressionTarget(hold_at_target=True)``, β = 1 from then on):
            clipped weights cannot come back, so the compression would otherwise run past it.
        target_scope: what the target counts: "linear" (the sparse-VD layers' weights, as
            ``compression``) or "model" (every parameter, embeddings included).
        finetune_epochs: sparse VD only: the last ``finetune_epochs`` of the ``epochs`` train the
            pruned model deterministically (:func:`freeze_mask`): the mask frozen at the method's
            log α < ``threshold`` where the phase begins, log σ² frozen, no LRT noise, no KL, the
            data term alone on the kept θ and the biases, a fresh Adam on the same learning-rate
            schedule (the analogue of gradual magnitude pruning's fixed-mask tail). The
            compression target's ramp spans the sparse-VD epochs before it. 0 (the default): none.

    Returns:
        The summary: ``test_accuracy`` (fraction, eval mode, after the last epoch),
        ``compression``, ``sparsity`` and ``per_layer_sparsity`` (fractions), ``history`` (one row
        per epoch: loss (SGVLB per image, or cross-entropy), ce, kl_per_image, beta, lr,
        test_accuracy, compression, compression_model (the whole model, embeddings, biases and
        norms counted as kept), train_seconds), ``report``, ``train_seconds`` (training
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
    _check_fit_args(model, epochs=epochs, lr_decay=lr_decay, method=method,
                    pretrain_epochs=pretrain_epochs, resume=resume, checkpoint_dir=checkpoint_dir, amp=amp,
                    loss_fn=loss_fn, target_compression=target_compression, target_scope=target_scope,
                    finetune_epochs=finetune_epochs)
    r = _setup(model, train_loader, epochs=epochs, lr=lr, lr_decay=lr_decay, method=method,
               pretrain_epochs=pretrain_epochs, kl_warmup_epochs=kl_warmup_epochs, threshold=threshold,
               train_size=train_size, device=device, progress_bar=progress, checkpoint_dir=checkpoint_dir,
               checkpoint_config=checkpoint_config, resume=resume, amp=amp, train_clip=train_clip,
               loss_fn=loss_fn, target_compression=target_compression, target_scope=target_scope,
               finetune_epochs=finetune_epochs)
    for epoch in range(r.progress.start_epoch, epochs):
        _begin_epoch(r, train_loader, epoch)
        _train_epoch(r, train_loader, epoch)
        _end_epoch(r, test_loader, epoch, on_epoch)
    return _finish(r, test_loader, mc_samples)


def _check_fit_args(model: nn.Module, *, epochs, lr_decay, method, pretrain_epochs, resume,
                    checkpoint_dir, amp, loss_fn=None, target_compression=None, target_scope="linear",
                    finetune_epochs=0) -> None:
    """The argument errors of :func:`fit` that need no data (ValueError naming the argument)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"lr_decay: expected one of {LR_DECAYS}, got {lr_decay!r}")
    if epochs < 1:
        raise ValueError(f"epochs: expected ≥ 1, got {epochs}")
    pretrain = pretrain_epochs if method == "sparse_vd" else 0
    if method == "sparse_vd" and not 0 <= pretrain < epochs:
        raise ValueError(f"pretrain_epochs: expected 0 ≤ pretrain_epochs < epochs = {epochs}, got {pretrain}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs: expected an int ≥ 0, got {finetune_epochs!r}")
    if finetune_epochs and method != "sparse_vd":
        raise ValueError("finetune_epochs: needs method='sparse_vd' (a dense run has no mask to freeze)")
    if finetune_epochs and pretrain + finetune_epochs >= epochs:
        raise ValueError(f"finetune_epochs: expected pretrain_epochs + finetune_epochs < epochs = {epochs} "
                         f"(at least one sparse-VD epoch), got {pretrain} + {finetune_epochs}")
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise ValueError("model: expected a container module (e.g. nn.Sequential), got a bare "
                         f"{type(model).__name__}; it cannot be converted in place")
    if resume and checkpoint_dir is None:
        raise ValueError("resume: needs checkpoint_dir, the directory of the run to continue")
    check_amp(amp)
    if target_compression is not None:
        if method != "sparse_vd":
            raise ValueError("target_compression: needs method='sparse_vd' (a dense run prunes nothing)")
        if isinstance(target_compression, bool) or not isinstance(target_compression, (int, float)) \
                or not math.isfinite(target_compression) or target_compression <= 1:
            raise ValueError(f"target_compression: expected a compression > 1 (20 for 20×), got {target_compression!r}")
    if target_scope not in SCOPES:
        raise ValueError(f"target_scope: expected one of {SCOPES}, got {target_scope!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a function (model, batch) -> 0-dim tensor, got {loss_fn!r}")


@dataclasses.dataclass
class _Run:
    """What the phases of one :func:`fit` call share: the settings, the model (``net``: the same
    model, wrapped in DistributedDataParallel in a process group), the optimiser, schedule, fp16
    scaler and SGVLB of the current phase, the accumulators and where the run runs."""

    model: nn.Module
    device: torch.device
    recipe: dict
    svd: bool
    pretrain: int
    epochs: int
    steps_per_epoch: int
    train_size: int
    kl_warmup_epochs: float
    threshold: float
    train_clip: Optional[bool]
    amp: Optional[str]
    progress_bar: bool
    resumed: bool
    ckpt_dir: Optional[Path]
    checkpoint_config: Optional[dict]
    generators: List[torch.Generator]
    progress: Progress
    loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None
    target_compression: Optional[float] = None
    target_scope: str = "linear"
    controller: Optional[CompressionTarget] = None
    finetune: int = 0
    frozen: Optional[list] = None  # freeze_mask's (layer, mask, floor) in the fine-tuning phase
    rank: int = 0
    world: int = 1
    net: Optional[nn.Module] = None
    opt: Optional[torch.optim.Optimizer] = None
    sched: Optional[torch.optim.lr_scheduler.LambdaLR] = None
    scaler: Optional[torch.amp.GradScaler] = None
    crit: Optional[SGVLB] = None
    backend: Optional[str] = None
    commit: Optional[str] = None
    freed_memory_kept: bool = False
    last_finite: Optional[float] = None
    epoch_seconds: float = 0.0  # the training time of the epoch in progress
    prunable: int = 0  # the sparse-VD layers' weights (the sparse-VD phase's)
    model_params: int = 0  # every parameter but log σ² (the whole model's compression)
    kl_count_for_target: bool = False  # the KL's kept count is the controller's (same thresholds)
    epoch_means: Tuple[float, float] = (0.0, 0.0)  # its mean loss and cross-entropy over the ranks

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def finetune_start(self) -> int:
        """The first epoch of the deterministic fine-tuning (``epochs`` when there is none)."""
        return self.epochs - self.finetune

    def phase(self, epoch: int) -> str:
        """"dense", "sparse_vd" or "finetune" (the fixed-mask tail) at ``epoch`` (0-based)."""
        if not self.svd or epoch < self.pretrain:
            return "dense"
        return "finetune" if epoch >= self.finetune_start else "sparse_vd"

    def optimizer(self, first_step: int):
        """A fresh Adam; with linear decay lr_k = lr · (1 − k / total_steps) at global step k (0
        at the end), counted from ``first_step``."""
        opt = adam([p for p in self.model.parameters() if p.requires_grad], self.recipe["lr"])
        if self.recipe["lr_decay"] != "linear":
            return opt, None
        total = self.total_steps
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - (k + first_step) / total))

    def to_svd(self) -> None:
        """Convert the model (unless it has sparse-VD layers), then set the layers' train-time
        clipping as asked."""
        if not svdo_layers(self.model):
            convert(self.model, threshold=self.threshold)
        if self.train_clip is not None:
            for _, layer in svdo_layers(self.model):
                layer.train_clip = self.train_clip

    def data_parallel(self) -> nn.Module:
        """The model, as a DistributedDataParallel module in a process group. DDP averages the
        gradients over the ranks: the SGVLB data term becomes the mean over the ranks' shares of
        the global batch, the KL (the same on every rank) counts once."""
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def sgvlb(self) -> SGVLB:
        """The SGVLB of the sparse-VD phase, with a fresh compression controller when a target
        is asked for (its setpoint ramped over the first TARGET_RAMP of the phase; holding the
        mask once the target is reached when the layers clip at train time)."""
        layers = [m for _, m in svdo_layers(self.model)]
        self.prunable = sum(m.weight.numel() for m in layers)
        self.model_params = sum(p.numel() for n, p in self.model.named_parameters() if not n.endswith("log_sigma2"))
        if self.target_compression is not None:
            ramp = int(TARGET_RAMP * (self.epochs - self.pretrain - self.finetune) * self.steps_per_epoch)
            self.controller = CompressionTarget(self.model, self.target_compression, self.target_scope,
                                                threshold=self.threshold, ramp_steps=ramp,
                                                hold_at_target=all(m.train_clip for m in layers))
            self.kl_count_for_target = all(m.threshold == self.controller.threshold for m in layers)
        return SGVLB(self.model, self.train_size, kl_warmup_epochs=self.kl_warmup_epochs,
                     target=self.controller)


def _setup(model: nn.Module, train_loader, *, epochs, lr, lr_decay, method, pretrain_epochs,
           kl_warmup_epochs, threshold, train_size, device, progress_bar, checkpoint_dir,
           checkpoint_config, resume, amp, train_clip, loss_fn, target_compression, target_scope,
           finetune_epochs=0) -> _Run:
    """Everything before the first epoch: the device, the recipe, the state of a resumed run, the
    phase the run is in (converted if it is sparse VD), the optimiser and the SGVLB."""
    svd = method == "sparse_vd"
    pretrain = pretrain_epochs if svd else 0
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    freed_memory_kept = keep_freed_memory() if device.type == "cpu" else False  # no page faults per step
    commit = metadata.git_commit()  # the code this run starts with, not HEAD at its end
    check_amp(amp, device)
    if train_size is None:
        train_size = len(train_loader.dataset)
    steps_per_epoch = len(train_loader)
    recipe = dict(epochs=epochs, lr=lr, lr_decay=lr_decay, method=method, pretrain_epochs=pretrain,
                  kl_warmup_epochs=kl_warmup_epochs if svd else None, threshold=threshold,
                  train_size=train_size, steps_per_epoch=steps_per_epoch, amp=amp,
                  train_clip=train_clip, target_compression=target_compression,
                  target_scope=target_scope if target_compression is not None else None,
                  finetune_epochs=finetune_epochs)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    saved, progress = load_resume_state(ckpt_dir, recipe) if resume else (None, Progress())
    r = _Run(model=model, device=device, recipe=recipe, svd=svd, pretrain=pretrain, epochs=epochs,
             steps_per_epoch=steps_per_epoch, train_size=train_size, kl_warmup_epochs=kl_warmup_epochs,
             threshold=threshold, train_clip=train_clip, amp=amp, progress_bar=progress_bar,
             resumed=resume, ckpt_dir=ckpt_dir, checkpoint_config=checkpoint_config,
             generators=loader_generators(train_loader), progress=progress, commit=commit,
             freed_memory_kept=freed_memory_kept, loss_fn=loss_fn, target_compression=target_compression,
             target_scope=target_scope, finetune=finetune_epochs if svd else 0)
    # the sparse-VD phase has begun when the run starts from scratch without pre-training, or
    # resumes after the epoch whose start converted the model (resuming right at that epoch, the
    # loop converts it, as the uninterrupted run did)
    in_svd_phase = svd and (not pretrain or progress.start_epoch > pretrain)
    in_finetune = svd and finetune_epochs and progress.start_epoch > r.finetune_start
    r.scaler = grad_scaler(amp, train_size if in_svd_phase and not in_finetune else 1.0)
    if in_svd_phase:
        r.to_svd()
    model.to(device)
    if in_finetune:  # log σ² out of the optimiser; the mask is taken below, from the saved model
        freeze_mask(model)
    r.rank, r.world = distributed.rank_and_world()
    # the schedule of the phase's optimiser counts from the phase's first step
    first = r.finetune_start if in_finetune else pretrain if in_svd_phase else 0
    r.opt, r.sched = r.optimizer(first * steps_per_epoch)
    if saved is not None:
        restore(saved, model, r.opt, r.sched, r.scaler, r.generators, device, r.rank, r.world)
    if in_finetune:
        r.frozen = freeze_mask(model)
    r.crit = r.sgvlb() if in_svd_phase and not in_finetune else None
    if r.controller is not None and saved is not None and saved.meta.get("target"):
        r.controller.load_state_dict(saved.meta["target"])
    r.backend = backend_name(model, device) if svd else None
    r.last_finite = progress.last_finite_loss
    r.net = r.data_parallel()
    return r


@torch.no_grad()
def freeze_mask(model: nn.Module) -> list:
    """Start the deterministic fine-tuning of a sparse-VD model (``fit(finetune_epochs=)``): every
    sparse-VD layer's log σ² stops requiring grad, and its mask [log α < threshold] is taken as it
    is now. Returns ``[(layer, mask, floor)]`` for :func:`hold_mask`: ``mask`` (bool, shape of θ)
    and ``floor`` = sqrt(1.01 · exp(log σ² − threshold)), the smallest |θ| a kept weight may take
    and stay kept (log α = log σ² − log(θ² + 1e-8) < threshold)."""
    frozen = []
    for _, layer in svdo_layers(model):
        layer.log_sigma2.requires_grad_(False)
        frozen.append((layer, layer.mask(), kept_floor(layer.log_sigma2, layer.threshold).to(layer.weight.dtype)))
    return frozen


@torch.no_grad()
def hold_mask(frozen: list) -> None:
    """After a fine-tuning step: a kept θ whose |θ| fell below its floor is set back to the floor
    (same sign), so that the mask stays the one :func:`freeze_mask` took. A dropped θ gets no
    gradient through the masked forward, so Adam (fresh, no weight decay) leaves it as it is."""
    for layer, mask, floor in frozen:
        raise_to_floor(layer.weight, mask, floor)


def _begin_epoch(r: _Run, train_loader, epoch: int) -> None:
    """At the end of the dense pre-training, the sparse-VD layers take over θ and b (log σ² =
    −10), with a fresh Adam continuing the same learning-rate schedule and a scaler for a loss N
    times the dense one; a DistributedSampler gets its epoch (a new shuffle)."""
    if r.svd and r.pretrain and epoch == r.pretrain:
        r.to_svd()
        r.net = r.data_parallel()
        r.opt, r.sched = r.optimizer(epoch * r.steps_per_epoch)
        r.scaler = grad_scaler(r.amp, r.train_size)
        r.crit = r.sgvlb()
    if r.finetune and epoch == r.finetune_start:
        r.frozen = freeze_mask(r.model)
        r.opt, r.sched = r.optimizer(epoch * r.steps_per_epoch)
        r.scaler = grad_scaler(r.amp, 1.0)
        r.crit = r.controller = None
    for sampler in loader_samplers(train_loader):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _to_device(batch, device: torch.device):
    """``batch`` with every tensor in it (in dicts, lists and tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch) if type(batch) in (list, tuple) \
            else type(batch)(*(_to_device(v, device) for v in batch))  # a namedtuple
    return batch


def _data_term(r: _Run, batch) -> torch.Tensor:
    """The mean data term of a batch: ``loss_fn(net, batch)``, or the cross-entropy of the
    logits of an ``(x, y)`` batch."""
    if r.loss_fn is not None:
        value = r.loss_fn(r.net, _to_device(batch, r.device))
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError("loss_fn: expected a 0-dim tensor (the mean over the batch), got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        return value
    if isinstance(batch, Mapping) or not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise ValueError(f"train_loader: expected (x, y) batches, got a {type(batch).__name__}; for "
                         "other batches (e.g. dicts) pass loss_fn=(model, batch) -> mean loss")
    x, y = batch
    x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)
    return F.cross_entropy(r.net(x), y)


def _svd_loss(r: _Run, data: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
    """N · data term + β · KL at this step. The KL's pass also counts the weights kept
    (``r.crit.kept``), before the controller's step, which takes that count: the compression of
    the parameters of this step, as a pass of its own would measure it (none is run). At β = 0
    (the first step of the warm-up) the KL is not in the loss: it is run without gradients for
    the count only, when the controller or the progress bar wants it."""
    r.crit.epoch = epoch - r.pretrain + i / r.steps_per_epoch  # β rises per step
    kl = None
    if r.crit.warmup_beta != 0.0:
        kl = r.crit.kl()
    elif r.controller is not None or r.progress_bar:
        with torch.no_grad():
            kl = r.crit.kl()  # not in the loss: with_kl leaves it out at β = 0
    if r.controller is not None:
        r.controller.step(kept=int(r.crit.kept.sum()) if r.kl_count_for_target else None)
    return r.crit.with_kl(data, kl=kl)


def _train_step(r: _Run, batch, epoch: int, i: int, phase_svd: bool) -> Tuple[float, float]:
    """One step: forward (autocast), the loss (N · data term + β · KL with β at this step, or the
    data term), the divergence check, backward, Adam, the schedule. Returns (loss per example,
    data term)."""
    with autocast(r.amp, r.device):
        data = _data_term(r, batch)
        loss = _svd_loss(r, data, epoch, i) if phase_svd else data
    loss_per_example = float(loss.detach()) / (r.train_size if phase_svd else 1)
    if not distributed.all_finite(loss_per_example, r.device):
        raise step_diverged(r.model, epoch=epoch, step=i, steps_per_epoch=r.steps_per_epoch,
                            loss=loss_per_example, last_finite=r.last_finite,
                            last_epoch_done=r.progress.last_epoch_done, ckpt_dir=r.ckpt_dir)
    r.last_finite = loss_per_example
    r.opt.zero_grad(set_to_none=True)
    if r.scaler is not None:
        r.scaler.scale(loss).backward()
        r.scaler.step(r.opt)
        r.scaler.update()
    else:
        loss.backward()
        r.opt.step()
    if r.sched is not None:
        r.sched.step()
    if r.frozen is not None:
        hold_mask(r.frozen)
    elif phase_svd and r.controller is not None:
        r.controller.hold()  # with train-time clipping: no pruning past the target
    return loss_per_example, float(data.detach())


def _train_epoch(r: _Run, train_loader, epoch: int) -> None:
    """The steps of one epoch, with a progress bar; their mean loss and cross-entropy (over the
    ranks) go into ``r.epoch_means``, the epoch's training time into the accumulators."""
    from tqdm.auto import tqdm

    phase = r.phase(epoch)
    phase_svd = phase == "sparse_vd"
    r.model.train()
    if phase == "finetune":  # the deterministic masked forward, gradients to the kept θ
        for _, layer in svdo_layers(r.model):
            layer.eval()
    t_ep = time.perf_counter()
    loss_sum = ce_sum = 0.0
    n_batches = 0
    bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{r.epochs}", leave=False,
               disable=not r.progress_bar, mininterval=PROGRESS_REFRESH_S, file=sys.stderr)
    shown_at = -math.inf
    for i, batch in enumerate(bar):
        t_step = time.perf_counter()
        loss, ce = _train_step(r, batch, epoch, i, phase_svd)
        loss_sum += loss
        ce_sum += ce
        r.progress.step_ms.append(1e3 * (time.perf_counter() - t_step))
        n_batches += 1
        if r.progress_bar and time.perf_counter() - shown_at >= PROGRESS_REFRESH_S:
            bar.set_postfix(_progress_fields(r, loss_sum / n_batches, phase_svd), refresh=False)
            shown_at = time.perf_counter()
    bar.close()
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)
    r.epoch_seconds = time.perf_counter() - t_ep
    r.progress.train_seconds += r.epoch_seconds
    loss_sum, ce_sum, n_batches = distributed.sum_over_ranks([loss_sum, ce_sum, n_batches], r.device)
    r.epoch_means = (loss_sum / max(n_batches, 1), ce_sum / max(n_batches, 1))


def _progress_fields(r: _Run, mean_loss: float, phase_svd: bool) -> dict:
    """The progress bar's fields after a step: the epoch's mean loss and, in the sparse-VD phase,
    the compression of the converted layers and of the whole model (every parameter but log σ²,
    the unconverted ones counted as kept) from this step's KL pass (``r.crit.kept``: no pass of
    its own), and the controller's β."""
    shown = {"loss": f"{mean_loss:.4f}"}
    if phase_svd and r.crit.kept is not None:
        kept = int(r.crit.kept.sum())
        fixed = r.model_params - r.prunable
        shown["compression"] = f"{r.prunable / kept:.1f}x" if kept else "inf"
        shown["model"] = f"{r.model_params / (kept + fixed):.1f}x" if kept + fixed else "inf"
    if phase_svd and r.controller is not None:
        shown["beta"] = f"{r.crit.beta:.3g}"
    return shown


def _end_epoch(r: _Run, test_loader, epoch: int, on_epoch) -> None:
    """Evaluate, append the epoch's history row, check the parameters and write the checkpoint,
    then call ``on_epoch`` (rank 0)."""
    phase = r.phase(epoch)
    phase_svd = phase == "sparse_vd"
    t_ev = time.perf_counter()
    acc = test_loss = None
    if test_loader is not None and r.loss_fn is not None:
        test_loss = _evaluate_loss(r, test_loader)
    elif test_loader is not None:
        acc = evaluate(r.model, test_loader, r.device)
    rep = report(r.model)
    r.progress.eval_seconds += time.perf_counter() - t_ev
    loss, ce = r.epoch_means
    row = {
        "epoch": epoch + 1,
        "epochs": r.epochs,
        "loss": loss,
        "ce": ce,
        "phase": phase,
        "kl_per_image": (float(kl_divergence(r.model).detach()) / r.train_size) if r.svd else 0.0,
        "beta": r.crit.beta if phase_svd else None,
        "lr": r.opt.param_groups[0]["lr"],
        "test_accuracy": acc,
        "compression": finite(rep.compression),
        "compression_model": finite(rep.model_compression),
        "train_seconds": r.epoch_seconds,
    }
    if r.loss_fn is not None:
        row["test_loss"] = test_loss
    if r.controller is not None:
        row["target_beta"] = r.controller.beta if phase_svd else None
    elif r.target_compression is not None:
        row["target_beta"] = None
    r.progress.history.append(row)
    check_parameters(r.model, epoch_done=epoch + 1, steps_per_epoch=r.steps_per_epoch, ckpt_dir=r.ckpt_dir)
    if r.ckpt_dir is not None:
        write_checkpoint(r.ckpt_dir, r.model, epoch_done=epoch + 1, recipe=r.recipe, progress=r.progress,
                         opt=r.opt, sched=r.sched, scaler=r.scaler, generators=r.generators,
                         svd_phase=bool(svdo_layers(r.model)), checkpoint_config=r.checkpoint_config,
                         device=r.device, rank=r.rank, world=r.world,
                         target_state=None if r.controller is None else r.controller.state_dict())
    if on_epoch is not None and r.rank == 0:
        on_epoch(row)


@torch.no_grad()
def _evaluate_loss(r: _Run, loader) -> float:
    """The mean of ``loss_fn`` over ``loader``'s batches, the model in eval mode (left so)."""
    r.model.eval()
    total = n = 0
    for batch in loader:
        total += float(_data_term(r, batch))
        n += 1
    return total / max(n, 1)


def _finish(r: _Run, test_loader, mc_samples: int) -> dict:
    """The summary: the final report, the predictive evaluation (eval mode and, for sparse VD,
    Monte-Carlo), whether the ranks ended in sync, the timings and the recipe."""
    r.model.eval()
    rep = report(r.model)
    predictive = {}
    if test_loader is not None and r.loss_fn is None:
        predictive["eval"] = evaluate_predictive(r.model, test_loader, r.device, 0)
    if r.svd and mc_samples and "eval" in predictive:
        predictive["mc"] = evaluate_predictive(r.model, test_loader, r.device, mc_samples, seed=0)
    digests = distributed.all_gather_objects(digest(r.model.state_dict()))
    return fit_summary(rep=rep, predictive=predictive, recipe=r.recipe, progress=r.progress, svd=r.svd,
                       epochs=r.epochs, resumed=r.resumed, digests=digests, device=r.device, rank=r.rank,
                       world=r.world, freed_memory_kept=r.freed_memory_kept, backend=r.backend,
                       commit=r.commit)


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
        config = resumed_config(config)
    resolve_recipe(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, on_start, on_epoch, resume)
    finally:
        torch.set_num_threads(threads)


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
        on_start(_start_info(config, model, device, out_dir, train_size, test_size, resume, world))
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
        train_clip=config.train_clip, target_compression=config.target_compression,
        target_scope=config.target_scope, finetune_epochs=config.finetune_epochs)

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
    if rank == 0:
        _write_summary(config, out_dir, summary)
    return model, summary


def _start_info(config: TrainConfig, model: nn.Module, device, out_dir: Path, train_size: int,
                test_size: int, resume: bool, world: int) -> dict:
    """What ``on_start`` is told about the run: sizes, recipe, device, backend, threads."""
    svd = not config.dense
    return {
        "model": config.model, "svd": svd, "dataset": config.dataset, "train_size": train_size,
        "test_size": test_size, "epochs": config.epochs, "batch_size": config.batch_size,
        "lr": config.lr, "lr_decay": config.lr_decay,
        "kl_warmup_epochs": config.kl_warmup_epochs, "pretrain_epochs": config.pretrain_epochs,
        "backend": backend_name(model, device) if svd else None, "device": str(device),
        "device_name": metadata.device_name(device), "threads": torch.get_num_threads(),
        "out": str(out_dir), "resume": resume, "amp": config.amp, "world_size": world,
        "train_clip": config.train_clip, "target_compression": config.target_compression,
        "target_scope": config.target_scope, "finetune_epochs": config.finetune_epochs,
    }


def _write_summary(config: TrainConfig, out_dir: Path, summary: dict) -> None:
    """``summary.json`` (and the ``json`` copy), then the pictures (a failure to draw them only warns)."""
    text = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write_bytes(out_dir / "summary.json", text)
    if config.json:
        atomic_write_bytes(config.json, text)
    try:
        plot_run(out_dir)
    except Exception as e:  # a picture is no reason to lose a run: say why and go on
        warnings.warn(f"{out_dir}: the pictures (curves.png, masks.png) could not be drawn: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
