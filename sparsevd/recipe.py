"""The recipe for sparsifying a trained (pretrained) model with sparse VD.

The paper trains from scratch: log σ² = −10 everywhere, one Adam learning rate, KL weight 1 with
N the training-set size. On a trained model that recipe ruins the model (all-MiniLM-L6-v2 fell
to cosine 0.75 to its dense self at 29.5 % sparsity, issue 23): the KL of 10⁷ weights (≈ 2·10⁷
nats) outweighs a distillation loss below 1 by seven orders of magnitude, and a learning rate
large enough to move log σ² by several units destroys θ. This module holds what works instead
(measured on MiniLM, ``examples/compress_minilm.py``, README "Compressing a pretrained model"):

- :func:`init_log_sigma2`: one log σ² for every weight (the paper's shape) with the median weight
  at log α₀, or log σ² = log α₀ + log(θ² + 1e-8) per weight (every weight at log α₀; sec. 4's
  additive reparameterisation: α = σ²/θ²);
- :func:`param_groups`: log σ² in its own optimizer group with its own (much larger) learning
  rate and no weight decay;
- :class:`PretrainedRecipe`: those learning rates, log α₀, the KL scale and the KL warm-up in
  steps (:meth:`PretrainedRecipe.kl_weight`);
- :func:`rewind`: the fixed-mask fine-tuning started from the trained model's values, the mask
  sparse VD's.

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369), sec. 4 (α = σ²/θ²), sec. 5 (log σ² = −10, KL warm-up).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
from torch import nn

from ._args import check_real
from .nn import DEFAULT_THRESHOLD, SVDO_LAYERS
from .optim import SparseVDAdam
from .target import raise_to_floor
from .ops.weights import EPS_THETA


def _svdo_modules(model: nn.Module) -> List[nn.Module]:
    if isinstance(model, SVDO_LAYERS):
        return [model]
    return [m for m in model.modules() if isinstance(m, SVDO_LAYERS)]


#: Above this many weights the shared init's median is taken over an evenly strided sample.
_MEDIAN_SAMPLE = 1 << 24


@torch.no_grad()
def init_log_sigma2(model: nn.Module, log_alpha_init: float, shared: bool = False) -> nn.Module:
    """Set every sparse-VD layer's log σ² from log α₀ = ``log_alpha_init``, in place.

    - ``shared=False``: log σ² = log α₀ + log(θ² + 1e-8) per weight (the ``1e-8`` of
      :func:`sparsevd.reference.log_alpha`): every weight starts at the same log α₀.
    - ``shared=True``: one log σ² for every weight of every layer, the paper's shape (a constant
      log σ², sec. 5), placed so that the median weight starts at log α₀: log σ² = log α₀ +
      median over all the layers' weights of log(θ² + 1e-8). A smaller weight starts at a larger
      log α (α = σ²/θ²), so the mask grows from the small weights across all layers, as global
      magnitude pruning's would, and the data and the KL move it from there. Capped per weight at
      log α = threshold − 1 (the tiny weights), so that no weight starts dropped. On
      all-MiniLM-L6-v2 at 4× it lifted the held-out cosine from 0.898 (per-weight) to 0.938,
      above gradual magnitude pruning's 0.912 (benchmarks/NOTES.md, "MiniLM: one log σ² for
      every weight").

    Args:
        model: a module holding sparse-VD layers (or one layer).
        log_alpha_init: log α₀, below each layer's threshold, so that the model in eval mode still
            computes what it did (no weight is dropped at the start).
        shared: one log σ² for all weights (True) or one log α (False).

    Returns:
        ``model``.

    Raises:
        TypeError: ``log_alpha_init`` is not a real number, ``shared`` not a bool.
        ValueError: ``log_alpha_init`` is not finite or not below a layer's threshold (every weight
            would be dropped); ``model`` holds no sparse-VD layer.
    """
    log_alpha_init = check_real(log_alpha_init, "log_alpha_init")
    if not isinstance(shared, bool):
        raise TypeError(f"shared: expected a bool, got {shared!r}")
    layers = _svdo_modules(model)
    if not layers:
        raise ValueError("model: holds no sparse-VD layer (convert it first)")
    for m in layers:
        if log_alpha_init >= m.threshold:
            raise ValueError(f"log_alpha_init: expected below the threshold {m.threshold}, got "
                             f"{log_alpha_init} (every weight would be dropped)")
    log_theta2 = [torch.log(m.weight.float() ** 2 + EPS_THETA) for m in layers]
    if shared:
        log_sigma2 = log_alpha_init + _median([t.flatten() for t in log_theta2])
    for m, lt in zip(layers, log_theta2):
        value = (torch.clamp(lt + m.threshold - 1.0, max=log_sigma2) if shared else lt + log_alpha_init)
        m.log_sigma2.copy_(value.to(m.log_sigma2.dtype))
    return model


def _median(parts: List[torch.Tensor]) -> float:
    """The median of the concatenated ``parts`` (of an evenly strided sample of at most
    :data:`_MEDIAN_SAMPLE` values when there are more)."""
    flat = torch.cat(parts)
    if flat.numel() > _MEDIAN_SAMPLE:
        flat = flat[:: -(-flat.numel() // _MEDIAN_SAMPLE)]
    return float(flat.median())


def param_groups(model: nn.Module, lr: float, log_sigma2_lr: float,
                 weight_decay: float = 0.0) -> List[Dict[str, object]]:
    """Optimizer parameter groups: every ``log_sigma2`` of the sparse-VD layers at
    ``log_sigma2_lr`` with weight decay 0, every other trainable parameter (θ, biases, embeddings,
    norms) at ``lr`` with ``weight_decay``. Pass the list to any torch optimizer
    (``torch.optim.Adam(param_groups(model, 2e-5, 0.1))``).

    Returns:
        ``[{"params": [...], "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": [...], "lr": log_sigma2_lr, "weight_decay": 0.0, "name": "log_sigma2"}]``;
        a group with no parameter is left out.

    Raises:
        TypeError: a learning rate or ``weight_decay`` is not a real number.
        ValueError: a learning rate ≤ 0, ``weight_decay`` < 0, or a non-finite value.
    """
    for name, v in (("lr", lr), ("log_sigma2_lr", log_sigma2_lr)):
        if check_real(v, name) <= 0:
            raise ValueError(f"{name}: expected > 0, got {v}")
    if check_real(weight_decay, "weight_decay") < 0:
        raise ValueError(f"weight_decay: expected ≥ 0, got {weight_decay}")
    sigma = {id(m.log_sigma2) for m in _svdo_modules(model)}
    seen: set = set()
    rest, log_s2 = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (log_s2 if id(p) in sigma else rest).append(p)
    groups = [{"params": rest, "lr": float(lr), "weight_decay": float(weight_decay), "name": "weights"},
              {"params": log_s2, "lr": float(log_sigma2_lr), "weight_decay": 0.0, "name": "log_sigma2"}]
    return [g for g in groups if g["params"]]


@dataclasses.dataclass
class PretrainedRecipe:
    """Hyper-parameters for sparsifying a trained model (README "Compressing a pretrained
    model"), measured on all-MiniLM-L6-v2 (benchmarks/NOTES.md, "MiniLM, the KL's pull
    preconditioned": 1,000 steps of 16 sentences, layer-wise distillation, β set by a
    :class:`sparsevd.target.CompressionTarget` for 4×, train-time clipping with the mask held at
    the target, then a fixed-mask tail; the KL applied by :meth:`optimizer`'s step: 4.01× at
    held-out cosine 0.887 on two seeds, 0.893 with the tail :func:`rewind`-ed to the teacher,
    0.898 with ``finetune_lr`` 5e-4, **0.938 with one log σ² for every weight** (``shared_init``;
    "MiniLM: one log σ² for every weight"), against 0.871 with the KL inside Adam's loss and
    gradual magnitude pruning's 0.912 at 4.00× with its best θ rate, the same 1e-3). ``lr`` 1e-3 was the best of
    2e-4 / 5e-4 / 1e-3 for sparse VD and of 2e-4 / 5e-4 / 1e-3 / 2e-3 for magnitude pruning. Of
    the other values tried (fourth attempt), ``kl_scale`` 0.01 (log σ² lr 0.04) drowned the
    student in noise and 1e-5 pruned nothing in 600 steps; a log σ² lr of 0.001–0.004 made the
    mask lag its target. ``warmup_steps`` (for a fixed KL weight, without a target) was not
    measured.

    Attributes:
        lr: Adam learning rate of θ, biases and the layers left dense (a fine-tuning rate).
        log_sigma2_lr: Adam learning rate of log σ² (its own group, :func:`param_groups`).
        log_alpha_init: log α of the median weight after :func:`sparsevd.convert` with
            ``init="pretrained"`` (of every weight when ``shared_init`` is False;
            :func:`init_log_sigma2`).
        shared_init: one log σ² for every weight (the paper's shape, the small weights nearest
            the threshold: :func:`init_log_sigma2` ``shared=True``), or one log α.
        finetune_lr: Adam learning rate of the fixed-mask tail (a fresh Adam state; θ, biases,
            norms), :func:`rewind`-ed to the trained model.
        kl_scale: the KL's weight per training example at the end of the warm-up: the objective
            is ``mean data loss + kl_scale · KL / N`` (N the number of training examples; 1 is
            the paper's SGVLB per example).
        warmup_steps: optimizer steps over which the KL weight rises linearly from 0 to
            ``kl_scale``.
    """

    lr: float = 1e-3
    log_sigma2_lr: float = 0.01
    log_alpha_init: float = -8.0
    kl_scale: float = 3e-3
    warmup_steps: int = 10
    shared_init: bool = True
    finetune_lr: float = 5e-4

    def __post_init__(self) -> None:
        for name in ("lr", "log_sigma2_lr", "finetune_lr"):
            if check_real(getattr(self, name), name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if check_real(self.log_alpha_init, "log_alpha_init") >= DEFAULT_THRESHOLD:
            raise ValueError(f"log_alpha_init: expected below {DEFAULT_THRESHOLD}, got {self.log_alpha_init}")
        if check_real(self.kl_scale, "kl_scale") < 0:
            raise ValueError(f"kl_scale: expected ≥ 0, got {self.kl_scale}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int ≥ 0, got {self.warmup_steps!r}")
        if not isinstance(self.shared_init, bool):
            raise TypeError(f"shared_init: expected a bool, got {self.shared_init!r}")

    def kl_weight(self, step: int) -> float:
        """The KL's weight per example at optimizer step ``step`` (0-based): ``kl_scale ·
        min(1, (step + 1) / warmup_steps)`` (``kl_scale`` when ``warmup_steps`` is 0)."""
        if self.warmup_steps == 0:
            return self.kl_scale
        return self.kl_scale * min(1.0, (step + 1) / self.warmup_steps)

    def param_groups(self, model: nn.Module, weight_decay: float = 0.0) -> List[Dict[str, object]]:
        """:func:`param_groups` with this recipe's learning rates."""
        return param_groups(model, self.lr, self.log_sigma2_lr, weight_decay)

    def optimizer(self, model: nn.Module) -> SparseVDAdam:
        """Adam over :meth:`param_groups` that applies the KL of ``model``'s sparse-VD layers
        itself: :class:`sparsevd.optim.SparseVDAdam` (``opt.step(kl_weight=w)`` with the data
        term alone in the loss; ``opt.step()`` is the training loop's plain Adam, for a KL put in
        the loss). Its steps flush subnormal moments to zero."""
        return SparseVDAdam(self.param_groups(model), model)


@torch.no_grad()
def rewind(model: nn.Module, source: nn.Module, frozen: list) -> nn.Module:
    """Start the fixed-mask fine-tuning from the trained model's values: sparse VD chooses the
    mask, and the drift its noise caused in the kept weights is undone.

    In place, after :func:`sparsevd.train.freeze_mask`: every kept θ (``mask`` True) of a layer
    in ``frozen`` takes ``source``'s value, raised to the layer's ``floor`` (same sign) where
    smaller, so the mask stays exactly the frozen one; the dropped θ and every log σ² are left as
    they are; every other parameter of ``model`` (biases, norms, layers left dense) whose name
    and shape ``source`` has takes ``source``'s value. On all-MiniLM-L6-v2 at 4× it lifted the
    held-out cosine from 0.887 to 0.893 on two seeds (benchmarks/NOTES.md, "MiniLM, the KL's
    pull preconditioned"). Rewinding to earlier weights is Frankle et al.'s (ICML 2020,
    "Linear mode connectivity and the lottery ticket hypothesis"); here to the trained model.

    Args:
        model: the converted model being sparsified (``sparsevd.convert`` of a copy of
            ``source``: the same parameter names).
        source: the trained model (e.g. the dense teacher).
        frozen: ``freeze_mask(model)``'s list of (layer, mask, floor).

    Returns:
        ``model``.

    Raises:
        ValueError: a layer of ``frozen`` is not in ``model``, or ``source`` has no parameter of
            its θ's name and shape.
    """
    src = dict(source.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {}
    for layer, mask, floor in frozen:
        name = names.get(id(layer.weight))
        if name is None:
            raise ValueError("frozen: holds a layer that is not in model (pass freeze_mask(model))")
        if name not in src or src[name].shape != layer.weight.shape:
            raise ValueError(f"source: has no parameter {name!r} of shape {tuple(layer.weight.shape)} "
                             "(model must be converted from a copy of source)")
        kept[name] = (mask, floor)
    for name, p in model.named_parameters():
        if name in kept:
            mask, floor = kept[name]
            p.copy_(torch.where(mask, src[name].to(p.dtype), p))
            raise_to_floor(p, mask, floor)
        elif name in src and src[name].shape == p.shape and not name.endswith("log_sigma2"):
            p.copy_(src[name])
    return model
