"""The SGVLB objective of sparse variational dropout (eq. 3) with a linear KL warm-up."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from .nn import SVDO_LAYERS


def svdo_layers(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """(name, module) of every LinearSVDO / Conv2dSVDO in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDO_LAYERS)]


def kl_divergence(model: nn.Module) -> Tensor:
    """Σ over the model's sparse-VD layers of KL(q‖p) (eq. 14), one batched op for all layers.

    Returns:
        0-dim fp32 tensor in nats (0 for a model without sparse-VD layers), on the parameters'
        device.
    """
    layers = [m for _, m in svdo_layers(model)]
    if not layers:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=None if p is None else p.device)
    # no per-call NaN/inf pass: a diverging run is stopped by the training loop (sparsevd.train.fit)
    return SF.kl_sparse_vd_many([m.weight for m in layers], [m.log_sigma2 for m in layers],
                                check_finite=False)


def _check_train_size(train_size) -> int:
    """``train_size`` as a positive int; integral floats such as 60000.0 are accepted."""
    if isinstance(train_size, bool):
        raise TypeError(
            f"train_size: expected a positive integer number of examples, got {train_size!r}"
        )
    try:
        n = operator.index(train_size)
    except TypeError:
        if not isinstance(train_size, numbers.Real):
            raise TypeError(
                f"train_size: expected a positive integer number of examples, got {train_size!r}"
            ) from None
        if not (math.isfinite(train_size) and float(train_size).is_integer()):
            raise ValueError(
                f"train_size: expected a positive integer number of examples, got {train_size!r}"
            ) from None
        n = int(train_size)
    if n <= 0:
        raise ValueError(f"train_size: expected a positive number of examples, got {train_size}")
    return n


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


class SGVLB(nn.Module):
    """Negative SGVLB of sparse VD (eq. 3), the loss to minimise:

        L = train_size · mean cross-entropy(logits, targets) + β · KL(model),

    with β rising linearly from ``beta_start`` to 1 over ``kl_warmup_epochs`` epochs (the authors'
    recipes warm up over 5–20 epochs); call :meth:`step_epoch` at the end of every epoch, or set
    :attr:`epoch`. The unit is nats over the whole training set.

    Args:
        model: the network whose sparse-VD layers enter the KL.
        train_size: number of training examples N.
        kl_warmup_epochs: epochs until β = 1; 0 gives β = 1 from the start.
        beta_start: β at epoch 0 (0 by default).

    Raises:
        ValueError: train_size ≤ 0 or not a whole number, kl_warmup_epochs < 0, β outside [0, 1],
            a non-finite value.
        TypeError: an argument that is not a number.
    """

    def __init__(
        self, model: nn.Module, train_size: int, kl_warmup_epochs: float = 5, beta_start: float = 0.0
    ) -> None:
        super().__init__()
        train_size = _check_train_size(train_size)
        kl_warmup_epochs = _check_real(kl_warmup_epochs, "kl_warmup_epochs")
        beta_start = _check_real(beta_start, "beta_start")
        if kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs: expected ≥ 0, got {kl_warmup_epochs}")
        if not 0.0 <= beta_start <= 1.0:
            raise ValueError(f"beta_start: expected a value in [0, 1], got {beta_start}")
        self.model = [model]  # a list, so the model is not registered as a submodule
        self.train_size = train_size
        self.kl_warmup_epochs = kl_warmup_epochs
        self.beta_start = beta_start
        self.epoch = 0.0

    @property
    def beta(self) -> float:
        """The KL weight β at the current epoch, in [beta_start, 1]."""
        if self.kl_warmup_epochs == 0:
            return 1.0
        frac = min(max(self.epoch / self.kl_warmup_epochs, 0.0), 1.0)
        return self.beta_start + (1.0 - self.beta_start) * frac

    def step_epoch(self) -> None:
        """Advance the warm-up by one epoch."""
        self.epoch += 1

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits (B, C), targets (B,) int64 → 0-dim loss tensor (fp32)."""
        nll = F.cross_entropy(logits, targets) * self.train_size
        beta = self.beta
        if beta == 0.0:
            return nll
        return nll + beta * kl_divergence(self.model[0])
