"""A diverging run: :class:`TrainingDiverged` and how ``fit`` finds it (a non-finite step loss,
or a non-finite parameter before a checkpoint)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

__all__ = ["TrainingDiverged", "check_parameters", "nonfinite_parameters", "step_diverged"]


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


def nonfinite_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters (and gradients, marked ".grad") holding NaN or ±inf: one pass over
    them, run only when a step's loss was not finite or before a checkpoint is written."""
    bad = []
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            bad.append(name)
        elif p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad.append(name + ".grad")
    return bad


def step_diverged(model: nn.Module, *, epoch: int, step: int, steps_per_epoch: int, loss: float,
                  last_finite: Optional[float], last_epoch_done: Optional[int],
                  ckpt_dir: Optional[Path]) -> TrainingDiverged:
    """The error for a non-finite loss ``loss`` at step ``step`` of epoch ``epoch`` (0-based):
    names the parameters holding NaN / inf (one pass over them), the last finite loss and the
    checkpoint kept (of epoch ``last_epoch_done``, when ``ckpt_dir`` is given)."""
    bad = nonfinite_parameters(model)
    global_step = epoch * steps_per_epoch + step
    checkpoint_epoch = last_epoch_done if ckpt_dir is not None else None
    return TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, step {step} (global step {global_step}): the "
        f"loss is {loss}"
        + (f"; non-finite values in {', '.join(bad)}" if bad else
           "; the parameters are finite (the inputs or the loss overflowed)")
        + (f"; last finite loss {last_finite:.6g}" if last_finite is not None
           else "; no finite loss before it")
        + (f"; the checkpoint of epoch {checkpoint_epoch} is kept in {ckpt_dir}"
           if checkpoint_epoch is not None else ""),
        epoch=epoch + 1, step=step, global_step=global_step, loss=loss, last_finite_loss=last_finite,
        layers=bad, checkpoint_epoch=checkpoint_epoch)


def check_parameters(model: nn.Module, *, epoch_done: int, steps_per_epoch: int,
                     ckpt_dir: Optional[Path]) -> None:
    """Raise :class:`TrainingDiverged` if a parameter of ``model`` is not finite after epoch
    ``epoch_done`` (1-based), before its checkpoint is written (the previous one is kept)."""
    bad = nonfinite_parameters(model)
    if not bad:
        return
    checkpoint_epoch = epoch_done - 1 if ckpt_dir is not None and epoch_done > 1 else None
    raise TrainingDiverged(
        f"training diverged in epoch {epoch_done}: non-finite values in {', '.join(bad)} "
        "after its last step"
        + (f"; the checkpoint of epoch {checkpoint_epoch} is kept in {ckpt_dir}" if checkpoint_epoch else ""),
        epoch=epoch_done, step=steps_per_epoch - 1, global_step=epoch_done * steps_per_epoch - 1,
        loss=None, last_finite_loss=None, layers=bad, checkpoint_epoch=checkpoint_epoch)
