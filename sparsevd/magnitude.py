"""Gradual magnitude pruning, the baseline sparse VD is compared with (issue 23, item 5).

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression"
(ICLR workshop 2018, arXiv:1710.01878), eq. 1: the sparsity s_t rises from s_i to s_f over
[t₀, t₀ + nΔt] along a cubic,

    s_t = s_f + (s_i − s_f) · (1 − (t − t₀) / (nΔt))³,

and every Δt steps the weights of smallest magnitude are masked up to s_t — here globally over the
weights of every nn.Linear and nn.Conv2d of the model (``torch.nn.utils.prune.global_unstructured``
with L1 magnitude), so layers keep what their magnitudes earn. The masked weights stay zero under
training (torch's forward pre-hook multiplies by the mask, so their gradient is zero too);
:meth:`GradualMagnitudePruning.finish` makes the pruning permanent (``prune.remove``: plain weights
with zeros, no hooks).

    pruner = GradualMagnitudePruning(model, target_compression=20, begin_step=0, end_step=6000)
    for step, (x, y) in enumerate(batches):
        loss(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()                       # after the optimiser step, as in the paper
    pruner.finish()

Compression is counted over the pruned weights (biases excluded), as ``sparsevd.report`` counts the
converted layers' weights: compression = total / kept = 1 / (1 − sparsity).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["GradualMagnitudePruning", "cubic_sparsity", "prunable_weights"]


def cubic_sparsity(step: int, final_sparsity: float, begin_step: int, end_step: int,
                   initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta's eq. 1: the sparsity at ``step``, ``initial_sparsity`` up to ``begin_step``,
    ``final_sparsity`` from ``end_step`` on, the cubic in between.

    Raises:
        ValueError: a sparsity outside [0, 1), or ``end_step`` < ``begin_step`` (messages name the argument).
    """
    for name, s in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"{name}: expected a fraction in [0, 1), got {s}")
    if end_step < begin_step:
        raise ValueError(f"end_step: expected >= begin_step ({begin_step}), got {end_step}")
    if step <= begin_step:
        return initial_sparsity if step < begin_step or end_step > begin_step else final_sparsity
    if step >= end_step:
        return final_sparsity
    frac = (step - begin_step) / (end_step - begin_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


def prunable_weights(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, "weight") of every nn.Linear and nn.Conv2d of ``model``, in module order."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class GradualMagnitudePruning:
    """Global gradual magnitude pruning of a model's nn.Linear / nn.Conv2d weights (Zhu & Gupta 2017).

    Args:
        model: the model, pruned in place (torch.nn.utils.prune reparametrises each ``weight`` as
            ``weight_orig * weight_mask`` until :meth:`finish`).
        target_compression: the final compression X of the pruned weights (sparsity 1 − 1/X), > 1.
        final_sparsity: or the final sparsity directly, in (0, 1); exactly one of the two.
        begin_step, end_step: the cubic runs over [begin_step, end_step] (counted in calls of
            :meth:`step`); from ``end_step`` on the sparsity is the final one.
        frequency: prune every ``frequency`` steps (Δt), and at ``end_step``.
        initial_sparsity: s_i, 0 by default.

    Raises:
        ValueError: neither or both of the targets, a target out of range, ``end_step`` <
            ``begin_step``, ``begin_step`` < 0, ``frequency`` < 1, or a model without Linear/Conv2d
            weights (each message names the argument).
    """

    def __init__(self, model: nn.Module, target_compression: Optional[float] = None,
                 final_sparsity: Optional[float] = None, begin_step: int = 0, end_step: int = 1000,
                 frequency: int = 100, initial_sparsity: float = 0.0):
        if (target_compression is None) == (final_sparsity is None):
            raise ValueError("target_compression / final_sparsity: give exactly one of them")
        if target_compression is not None:
            if not (isinstance(target_compression, (int, float)) and math.isfinite(target_compression)
                    and target_compression > 1):
                raise ValueError(f"target_compression: expected a finite number > 1, got {target_compression!r}")
            final_sparsity = 1.0 - 1.0 / float(target_compression)
        if not 0.0 < final_sparsity < 1.0:
            raise ValueError(f"final_sparsity: expected a fraction in (0, 1), got {final_sparsity}")
        if begin_step < 0:
            raise ValueError(f"begin_step: expected >= 0, got {begin_step}")
        if frequency < 1:
            raise ValueError(f"frequency: expected >= 1, got {frequency}")
        cubic_sparsity(begin_step, final_sparsity, begin_step, end_step, initial_sparsity)  # checks
        self.params = prunable_weights(model)
        if not self.params:
            raise ValueError(f"model: {type(model).__name__} has no nn.Linear or nn.Conv2d weights to prune")
        self.model = model
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(frequency)
        self.step_count = 0
        self.total = sum(m.weight.numel() for m, _ in self.params)
        self.finished = False

    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity after ``step`` calls of :meth:`step`."""
        return cubic_sparsity(step, self.final_sparsity, self.begin_step, self.end_step, self.initial_sparsity)

    def _due(self, t: int) -> bool:
        in_window = self.begin_step <= t <= self.end_step
        return in_window and ((t - self.begin_step) % self.frequency == 0 or t == self.end_step)

    def masked(self) -> int:
        """How many of the pruned weights are masked now."""
        return sum(int((m.weight_mask == 0).sum()) for m, _ in self.params if hasattr(m, "weight_mask"))

    def _prune_to(self, sparsity: float) -> None:
        # torch applies a repeated global_unstructured to the still unmasked weights only (its
        # PruningContainer), so the amount is what the target adds to the mask
        amount = int(round(sparsity * self.total)) - self.masked()
        if amount > 0:
            prune.global_unstructured(self.params, pruning_method=prune.L1Unstructured, amount=amount)

    def step(self) -> float:
        """Advance the schedule by one training step; prunes when due. Returns the target sparsity now.

        Raises:
            RuntimeError: after :meth:`finish`.
        """
        if self.finished:
            raise RuntimeError("GradualMagnitudePruning.step: called after finish()")
        self.step_count += 1
        s = self.sparsity_at(self.step_count)
        if self._due(self.step_count):
            self._prune_to(s)
        return s

    def sparsity(self) -> float:
        """The measured fraction of zero weights over the pruned weights."""
        zeros = sum(int((m.weight == 0).sum()) for m, _ in self.params)
        return zeros / self.total

    def compression(self) -> float:
        """total / nonzero over the pruned weights (inf when every weight is zero)."""
        kept = self.total - round(self.sparsity() * self.total)
        return math.inf if kept == 0 else self.total / kept

    def finish(self) -> nn.Module:
        """Prune to the final sparsity (whatever step the schedule reached) and make it permanent:
        each weight becomes a plain parameter with its zeros, the masks and hooks are removed.
        Returns the model; idempotent."""
        if not self.finished:
            self._prune_to(self.final_sparsity)
            for m, name in self.params:
                if prune.is_pruned(m):
                    prune.remove(m, name)
            self.finished = True
        return self.model
