"""The SGVLB objective of sparse variational dropout (eq. 3) with a linear KL warm-up, for any
data term (:data:`DATA_LOSSES` or a function) and, with a compression target
(:class:`sparsevd.target.CompressionTarget`), an adaptive KL weight."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._args import check_real
from . import functional as SF
from .nn import SVDO_LAYERS
from .outputs import find_logits


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


def kl_divergence_kept(model: nn.Module) -> Tuple[Tensor, Tensor]:
    """:func:`kl_divergence` (the same value and gradients) and, from the same pass over θ and
    log σ², the number of weights of each sparse-VD layer kept at evaluation (log α < the layer's
    own ``threshold``; :func:`sparsevd.functional.kl_sparse_vd_kept`): the model's compression at
    every step without a pass of its own (issue 23 item 7).

    Returns:
        (KL: 0-dim fp32 tensor, as :func:`kl_divergence`; kept: int64 (num_layers,) on the
        parameters' device, in the order of :func:`svdo_layers`, not differentiable).
    """
    layers = [m for _, m in svdo_layers(model)]
    if not layers:
        return kl_divergence(model), torch.zeros(0, dtype=torch.int64)
    return SF.kl_sparse_vd_kept([m.weight for m in layers], [m.log_sigma2 for m in layers],
                                [m.threshold for m in layers], check_finite=False)


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


#: The data terms SGVLB knows by name (``data_loss=``), each a mean over examples (see
#: :class:`SGVLB`); a callable ``(output, targets) -> 0-dim tensor`` is the fifth form.
DATA_LOSSES = ("cross_entropy", "soft_cross_entropy", "mse", "cosine")


def _class_last(output: Tensor, targets: Tensor, name: str) -> Tuple[Tensor, Tensor]:
    """(…, C) logits and (…) targets as (M, C) and (M,): one row per example or token."""
    if output.dim() < 2:
        raise ValueError(f"output: expected logits of shape (B, C) or (B, T, C), got {tuple(output.shape)}")
    if tuple(targets.shape) != tuple(output.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(output.shape[:-1])} for {name} with logits "
                         f"{tuple(output.shape)} (classes last), got {tuple(targets.shape)}")
    return output.reshape(-1, output.shape[-1]), targets.reshape(-1)


def data_term(output: Tensor, targets: Tensor, data_loss: str = "cross_entropy",
              ignore_index: int = -100) -> Tensor:
    """The mean data term of :class:`SGVLB` (a mean over examples, or over tokens), fp32 0-dim.

    * ``"cross_entropy"``: output (B, C) or (B, T, C) logits (classes last), targets (B,) or (B, T)
      int64 class indices; the mean of −log softmax(output)[target] over the targets other than
      ``ignore_index`` (``F.cross_entropy``). Float targets are a ValueError (soft labels only
      with ``"soft_cross_entropy"``).
    * ``"soft_cross_entropy"``: targets of the output's shape, float probabilities over the last
      dimension; the mean over rows of −Σ_c p_c log softmax(output)_c.
    * ``"mse"``: the mean over every element of (output − targets)² (``F.mse_loss``), same shape.
    * ``"cosine"``: the mean over rows of 1 − cos(output, targets) along the last dimension
      (distillation of embeddings), same shape.

    Raises:
        ValueError: an unknown ``data_loss``; float targets with "cross_entropy"; targets of
            another shape than the form needs (the message names ``targets`` and both shapes).
    """
    if data_loss == "cross_entropy":
        if targets.is_floating_point():
            raise ValueError(f"targets: cross_entropy needs int64 class indices, got {targets.dtype}; "
                             "for soft labels (probabilities) pass data_loss='soft_cross_entropy'")
        logits, labels = _class_last(output, targets, data_loss)
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    if data_loss in ("soft_cross_entropy", "mse", "cosine"):
        if tuple(targets.shape) != tuple(output.shape):
            raise ValueError(f"targets: {data_loss} needs targets of the output's shape "
                             f"{tuple(output.shape)}, got {tuple(targets.shape)}")
        if not targets.is_floating_point():
            raise ValueError(f"targets: {data_loss} needs float targets, got {targets.dtype}")
        out, tgt = output.float(), targets.float()
        if data_loss == "mse":
            return F.mse_loss(out, tgt)
        if data_loss == "cosine":
            return (1.0 - F.cosine_similarity(out, tgt, dim=-1)).mean()
        c = out.shape[-1]
        return F.cross_entropy(out.reshape(-1, c), tgt.reshape(-1, c))
    raise ValueError(f"data_loss: expected one of {DATA_LOSSES} or a callable, got {data_loss!r}")


class SGVLB(nn.Module):
    """Negative SGVLB of sparse VD (eq. 3), the loss to minimise:

        L = N · data term(output, targets) + β · KL(model),

    the data term a mean over examples (:func:`data_term`; flat or token-level cross-entropy by
    default), β rising linearly from ``beta_start`` to 1 over ``kl_warmup_epochs`` epochs (the
    authors' recipes warm up over 5–20 epochs); call :meth:`step_epoch` at the end of every
    epoch, or set :attr:`epoch`. The unit is nats over the whole training set (for a data term
    that is a negative log-likelihood per example).

    **N** (``train_size``) is the number of examples the data term averages over in one pass over
    the training set: N · mean = the sum over the training set, the expected log-likelihood of
    eq. 3. For token-level losses that is the number of examples (sequences) when the mean is per
    sequence; with the per-token mean of ``"cross_entropy"`` on (B, T, C) logits, N = the number of
    target tokens makes the data term the sum over every token. In fine-tuning and distillation N
    is the size of the data set that is trained on (the fine-tuning set, the distillation corpus),
    not the pre-training set: the KL is weighed against the evidence that is seen; a larger N keeps
    more weights (the prior matters less), a smaller one prunes more. N is a prior strength here,
    not a unit: for MSE / cosine distillation the data term is not a log-likelihood in nats, so
    N · data term is only proportional to one, and a compression target
    (:class:`sparsevd.target.CompressionTarget`) is the direct way to set how much is pruned.

    Args:
        model: the network whose sparse-VD layers enter the KL.
        train_size: number of training examples N (see above).
        kl_warmup_epochs: epochs until β = 1; 0 gives β = 1 from the start.
        beta_start: β at epoch 0 (0 by default).
        data_loss: the data term: one of :data:`DATA_LOSSES` (see :func:`data_term`) or a callable
            ``(output, targets) -> 0-dim tensor`` (a mean over examples).
        ignore_index: target index that ``"cross_entropy"`` skips (padding tokens).
        output_key: where the prediction is in a dict / ``ModelOutput`` / tuple output
            (:func:`sparsevd.outputs.find_logits`; default ``"logits"`` / element 0).
        target: a :class:`sparsevd.target.CompressionTarget` (or anything with a float ``beta``):
            the KL is multiplied by its ``beta`` (the last value of its ``step()``), which changes
            the objective (β ≠ 1); None, the default, is the paper's objective.

    Raises:
        ValueError: train_size ≤ 0 or not a whole number, kl_warmup_epochs < 0, β outside [0, 1],
            a non-finite value, an unknown ``data_loss``.
        TypeError: an argument that is not a number; a ``data_loss`` that is neither a name nor
            callable; a ``target`` without ``beta``.
    """

    def __init__(
        self, model: nn.Module, train_size: int, kl_warmup_epochs: float = 5, beta_start: float = 0.0,
        *, data_loss: Union[str, Callable[[object, Tensor], Tensor]] = "cross_entropy",
        ignore_index: int = -100, output_key: Union[None, str, int] = None, target=None,
    ) -> None:
        super().__init__()
        train_size = _check_train_size(train_size)
        kl_warmup_epochs = check_real(kl_warmup_epochs, "kl_warmup_epochs")
        beta_start = check_real(beta_start, "beta_start")
        if kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs: expected ≥ 0, got {kl_warmup_epochs}")
        if not 0.0 <= beta_start <= 1.0:
            raise ValueError(f"beta_start: expected a value in [0, 1], got {beta_start}")
        if isinstance(data_loss, str):
            if data_loss not in DATA_LOSSES:
                raise ValueError(f"data_loss: expected one of {DATA_LOSSES} or a callable, got {data_loss!r}")
        elif not callable(data_loss):
            raise TypeError(f"data_loss: expected one of {DATA_LOSSES} or a callable, got {data_loss!r}")
        if target is not None and not hasattr(target, "beta"):
            raise TypeError(f"target: expected a sparsevd.target.CompressionTarget, got {type(target).__name__}")
        self.model = [model]  # a list, so the model is not registered as a submodule
        self.train_size = train_size
        self.kl_warmup_epochs = kl_warmup_epochs
        self.beta_start = beta_start
        self.data_loss = data_loss
        self.ignore_index = int(ignore_index)
        self.output_key = output_key
        self.target = target
        self.epoch = 0.0
        #: The per-layer kept counts of the last KL this criterion evaluated (int64
        #: (num_layers,), :func:`kl_divergence_kept`; each layer's own threshold), counted in the
        #: KL's own pass; None before the first KL and after a step whose β was 0 (no KL then).
        self.kept: Optional[Tensor] = None

    @property
    def warmup_beta(self) -> float:
        """The warm-up's KL weight at the current epoch, in [beta_start, 1]."""
        if self.kl_warmup_epochs == 0:
            return 1.0
        frac = min(max(self.epoch / self.kl_warmup_epochs, 0.0), 1.0)
        return self.beta_start + (1.0 - self.beta_start) * frac

    @property
    def beta(self) -> float:
        """The KL weight β: the warm-up's, times the compression target's (when there is one)."""
        beta = self.warmup_beta
        return beta if self.target is None else beta * float(self.target.beta)

    def step_epoch(self) -> None:
        """Advance the warm-up by one epoch."""
        self.epoch += 1

    def data_term(self, output, targets: Tensor) -> Tensor:
        """The mean data term (before the factor N) of the model's ``output`` (a tensor, dict,
        ``ModelOutput`` or tuple) against ``targets``: 0-dim fp32 (see :func:`data_term`)."""
        pred = find_logits(output, self.output_key)
        if callable(self.data_loss):
            value = self.data_loss(pred, targets)
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise ValueError("data_loss: the callable must return a 0-dim tensor (the mean over "
                                 f"examples), got {getattr(value, 'shape', type(value).__name__)}")
            return value
        return data_term(pred, targets, self.data_loss, self.ignore_index)

    def kl(self) -> Tensor:
        """The model's KL (0-dim fp32, differentiable, as :func:`kl_divergence`); sets
        :attr:`kept` from the same pass."""
        kl, self.kept = kl_divergence_kept(self.model[0])
        return kl

    def with_kl(self, data: Tensor, kl: Optional[Tensor] = None) -> Tensor:
        """N · ``data`` + β · KL: the loss for a mean data term computed elsewhere (a 0-dim tensor,
        e.g. the loss of a user function over a batch). ``kl``: this step's :meth:`kl` if the
        caller has it already (``fit`` computes it before the controller's step, which takes its
        kept count); None: computed here, unless β = 0."""
        loss = data * self.train_size
        beta = self.beta
        if beta == 0.0:
            if kl is None:
                self.kept = None
            return loss
        return loss + beta * (self.kl() if kl is None else kl)

    def forward(self, output, targets: Tensor) -> Tensor:
        """output (the logits: (B, C), (B, T, C), or a dict / ModelOutput / tuple holding them;
        or predictions of the targets' shape for "mse" / "cosine" / soft labels), targets (see
        :func:`data_term`) → 0-dim loss tensor (fp32)."""
        return self.with_kl(self.data_term(output, targets))
