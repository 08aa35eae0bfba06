"""A compression target: the KL weight adapted each step so that training ends at the compression
asked for (:class:`CompressionTarget`).

Sparse VD's sparsity comes out of N, β, the learning rates and the threshold (paper, sec. 6: it
"cannot control pruning levels"). The controller measures the compression of the sparse-VD layers
(or of the whole model) with the method's own mask, log α < threshold (3 by default: the mask is
the method's, not a magnitude cut), and sets a factor β on the KL of the SGVLB by a PI controller
in log space:

    e_k   = log(c_k / ĉ_k)                      (c_k measured, ĉ_k the target, ramped up)
    I_k   = I_{k−1} + k_i · e_k                  (clamped to the β range: no wind-up)
    log β = clamp(−k_p · e_k − I_k, log β_min, log β_max)

Too little compression (e < 0) raises β (more weight on the KL prunes more); too much lowers it.
β ≠ 1 changes the objective: the loss is N · data term + β · KL instead of the paper's evidence
lower bound (β = 1, the default everywhere without a target). With ``ramp_steps`` the target rises
geometrically from 1× to ``target`` over that many steps, so the controller tracks a setpoint that
moves as slowly as the weights can follow.

With train-time clipping (``layer.train_clip``: a weight past the threshold leaves the forward and
gets no data gradient) pruning cannot be undone, so lowering β cannot bring an overshoot back:
LeNet-300-100 ends at 13.8× for a 10× target and 136× for 100× (benchmarks/NOTES.md). There
``hold_at_target`` caps it: from the first step whose measured compression reaches ``target``,
:meth:`hold` (after each optimiser step) keeps every weight kept then kept, setting a θ whose
log α crossed the threshold back to the smallest |θ| that stays below it, and every weight
dropped then dropped, and sets β back to 1.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch
from torch import nn

from .nn import DEFAULT_THRESHOLD, SVDO_LAYERS
from ._args import check_threshold
from .functional import kept_count
from .ops.weights import EPS_THETA

__all__ = ["RAMPS", "SCOPES", "CompressionTarget", "keep_dropped", "kept_floor", "raise_to_floor"]

#: What a compression counts: "linear": the weights of the sparse-VD layers (as
#: :func:`sparsevd.report`); "model": every parameter of the model (embeddings, norms, biases and
#: layers that were not converted included, as kept), log σ² excluded.
SCOPES = ("linear", "model")
#: The setpoint's shapes on the ramp (:meth:`CompressionTarget.setpoint`).
RAMPS = ("geometric", "cubic")
#: The default integral gain times the ramp's length in steps.
KI_PER_RAMP = 30.0


def _positive(value, name: str, *, above: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not value > above:
        raise ValueError(f"{name}: expected a finite number > {above:g}, got {value!r}")
    return float(value)


def kept_floor(log_sigma2: torch.Tensor, threshold: float) -> torch.Tensor:
    """sqrt(1.01 · e^{log σ² − threshold}) in fp32 (shape of log σ²): the smallest |θ| that keeps
    log α = log σ² − log(θ² + 1e-8) below ``threshold`` (1 % of margin in θ²)."""
    return torch.exp(0.5 * (log_sigma2.detach().float() - threshold)) * math.sqrt(1.01)


@torch.no_grad()
def raise_to_floor(weight: torch.Tensor, keep: torch.Tensor, floor: torch.Tensor) -> None:
    """In place: every θ of ``weight`` where ``keep`` (bool, θ's shape) with |θ| < ``floor`` is set
    to ``floor`` with θ's sign (+ for an exact 0), so those weights stay kept; the others are left
    as they are."""
    low = keep & (weight.float().abs() < floor)
    if bool(low.any()):
        weight.copy_(torch.where(low, torch.copysign(floor, weight.float()), weight.float()).to(weight.dtype))


@torch.no_grad()
def keep_dropped(weight: torch.Tensor, log_sigma2: torch.Tensor, drop: torch.Tensor, threshold: float) -> None:
    """In place: every log σ² where ``drop`` (bool, θ's shape) whose log α = log σ² − log(θ² +
    1e-8) fell below ``threshold`` is raised to log(θ² + 1e-8) + threshold + 0.01, so those
    weights stay dropped (θ, which the masked model never uses, is left as it is)."""
    floor = torch.log(weight.detach().float() ** 2 + EPS_THETA) + (threshold + 0.01)
    low = drop & (log_sigma2.float() < floor)
    if bool(low.any()):
        log_sigma2.copy_(torch.where(low, floor, log_sigma2.float()).to(log_sigma2.dtype))


class CompressionTarget:
    """A controller of the KL weight β that drives a model to ``target``× compression.

    Use: ``ctl = CompressionTarget(model, 20)``, ``crit = SGVLB(model, N, target=ctl)``, and call
    ``ctl.step()`` once per optimiser step before the loss (``fit(target_compression=)`` does).

    Args:
        model: the network, already converted (its sparse-VD layers are what is pruned).
        target: the compression to reach, params / kept > 1 (20 for 20×).
        scope: "linear" (the sparse-VD layers' weights) or "model" (every parameter, log σ²
            excluded): :data:`SCOPES`.
        threshold: log α threshold of the mask; None: 3 (the paper's, the layers' default).
        ramp_steps: steps over which the setpoint rises from 1× to ``target`` (0: ``target``
            from the first step).
        ramp: the setpoint's shape on the ramp: "geometric" (the compression rises by the same
            factor each step) or "cubic" (the sparsity 1 − 1/compression follows gradual magnitude
            pruning's s·(1 − (1 − k/ramp_steps)³), Zhu & Gupta 2017, eq. 1: fast at first, slow
            near the target, leaving the weights time to recover).
        kp, ki: the proportional and integral gains (in log units; ``ki`` per step). ``ki``
            None: :data:`KI_PER_RAMP` / max(``ramp_steps``, 100), the integral's time scale that
            of the ramp (measured on LeNet-300-100 and a small MLP, benchmarks/NOTES.md).
        beta_min, beta_max: the range of β.
        measure_every: measure the compression every that many steps (β is held in between)
            when :meth:`step` is not given the count (``fit`` gives it every step, from the KL's
            pass: :attr:`sparsevd.loss.SGVLB.kept`).
        hold_at_target: once a measured compression reaches ``target``, keep the kept weights
            kept and the dropped ones dropped (:meth:`hold`, to call after each optimiser step):
            the compression stops there, and β is 1 from then on (the paper's objective on the
            held mask: a larger β would only add noise to the kept weights). For training with train-time clipping, where a dropped
            weight cannot return (``fit`` sets it when its layers clip).
        anti_windup: below the setpoint, reset to 0 an integral that lowers β (conditional
            integration, Åström & Murray, Feedback Systems, sec. 10.4). Where weights drop
            faster than any β can slow them (a pretrained model converted with one log σ²:
            its tiny weights are dropped at the first steps) and a dropped weight cannot
            return, the mask runs ahead of the ramp, the integral winds up, and once the
            setpoint overtakes the mask β stays below 1 for hundreds of steps (all-MiniLM-L6-v2,
            10× in 3,000 steps: 7.05× at step 2,100 with β 0.62; in 1,000 steps it ended at
            8.41×, with ``anti_windup`` at 9.17×). Off by default: the LeNet results were
            measured without it.

    Attributes:
        beta: the current β (1 before the first step).
        compression: the last measured compression (None before the first measurement).
        steps: the number of :meth:`step` calls.
        holding: whether the target was reached with ``hold_at_target`` (the mask is held).

    Raises:
        ValueError: ``target`` ≤ 1 or not finite, an unknown ``scope``, a model without sparse-VD
            layers, a "model" target above what pruning every sparse-VD weight would give (the
            message gives that bound), a non-finite ``threshold``, ``ramp_steps`` < 0, an unknown
            ``ramp``, gains < 0, an empty β range, ``measure_every`` < 1.
    """

    def __init__(self, model: nn.Module, target: float, scope: str = "linear", threshold: Optional[float] = None,
                 ramp_steps: int = 0, *, ramp: str = "geometric", kp: float = 1.0, ki: Optional[float] = None,
                 beta_min: float = 1e-6, beta_max: float = 1e4, measure_every: int = 1,
                 hold_at_target: bool = False, anti_windup: bool = False) -> None:
        self.target = _positive(target, "target", above=1.0)
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        self.layers = [m for m in model.modules() if isinstance(m, SVDO_LAYERS)]
        if not self.layers:
            raise ValueError("model: has no sparse-VD layers to prune; convert it first (sparsevd.convert)")
        self.scope = scope
        self.threshold = DEFAULT_THRESHOLD if threshold is None else check_threshold(threshold)
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, numbers.Integral) or ramp_steps < 0:
            raise ValueError(f"ramp_steps: expected an integer ≥ 0, got {ramp_steps!r}")
        if ramp not in RAMPS:
            raise ValueError(f"ramp: expected one of {RAMPS}, got {ramp!r}")
        self.ramp = ramp
        if isinstance(measure_every, bool) or not isinstance(measure_every, numbers.Integral) or measure_every < 1:
            raise ValueError(f"measure_every: expected an integer ≥ 1, got {measure_every!r}")
        if ki is None:
            ki = KI_PER_RAMP / max(int(ramp_steps), 100)
        for name, v in (("kp", kp), ("ki", ki)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite gain ≥ 0, got {v!r}")
        beta_min, beta_max = _positive(beta_min, "beta_min"), _positive(beta_max, "beta_max")
        if not beta_min < beta_max:
            raise ValueError(f"beta_min, beta_max: expected beta_min < beta_max, got {beta_min}, {beta_max}")
        self.ramp_steps, self.measure_every = int(ramp_steps), int(measure_every)
        self.kp, self.ki = float(kp), float(ki)
        self.log_beta_range = (math.log(beta_min), math.log(beta_max))
        self.prunable = sum(m.weight.numel() for m in self.layers)
        self.total = self.prunable if scope == "linear" else self._model_params(model)
        self._check_reachable()
        self.integral = 0.0
        self.log_beta = 0.0
        self.steps = 0
        self.compression: Optional[float] = None
        self.hold_at_target = bool(hold_at_target)
        self.anti_windup = bool(anti_windup)
        self.holding = False
        self._held: Optional[List[torch.Tensor]] = None  # per layer: the mask held (bool, θ's shape)

    @staticmethod
    def _model_params(model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_sigma2"))

    def _check_reachable(self) -> None:
        fixed = self.total - self.prunable  # never pruned: counted as kept
        if fixed and self.target >= self.total / fixed:
            raise ValueError(
                f"target: {self.target:g}× of the whole model is out of reach: its {fixed} parameters "
                f"outside the sparse-VD layers stay, so even with every prunable weight dropped the "
                f"compression is {self.total / fixed:.3g}×; ask for less, or scope='linear'")

    @property
    def beta(self) -> float:
        """The current KL factor β = exp(log β)."""
        return math.exp(self.log_beta)

    def setpoint(self) -> float:
        """The target of the current step k: ``target`` past the ramp; on it target^(k / ramp_steps)
        ("geometric") or 1 / (1 − s·(1 − (1 − k/ramp_steps)³)) with s = 1 − 1/target ("cubic")."""
        if self.ramp_steps == 0 or self.steps >= self.ramp_steps:
            return self.target
        frac = self.steps / self.ramp_steps
        if self.ramp == "cubic":
            return 1.0 / (1.0 - (1.0 - 1.0 / self.target) * (1.0 - (1.0 - frac) ** 3))
        return math.exp(math.log(self.target) * frac)

    @torch.no_grad()
    def count_kept(self) -> int:
        """The number of weights of the sparse-VD layers with log α < threshold (one pass)."""
        return sum(kept_count(m.weight, m.log_sigma2, self.threshold) for m in self.layers)

    def measured(self, kept: int) -> float:
        """The scope's compression when ``kept`` weights of the sparse-VD layers are kept."""
        nonzero = kept + (self.total - self.prunable)
        return self.total / nonzero if nonzero else float("inf")

    def step(self, kept: Optional[int] = None) -> float:
        """One controller update; returns β for this step's loss.

        Args:
            kept: the number of sparse-VD weights kept (log α < threshold), if the caller has it
                (e.g. from the KL pass: ``SGVLB.kl()`` then ``int(crit.kept.sum())``, as ``fit``
                does); None: counted here (every ``measure_every`` steps).
        """
        if kept is None and self.steps % self.measure_every:
            self.steps += 1
            return self.beta
        if kept is None:
            kept = self.count_kept()
        self.compression = self.measured(int(kept))
        if self.hold_at_target and self.compression >= self.target:
            self.holding = True
        if self.holding and self._held is None:  # the parameters of this step's loss
            self._held = [m.mask(self.threshold) for m in self.layers]
        if self.holding:  # nothing left to control: the paper's objective on the held mask
            self.log_beta = 0.0
            self.steps += 1
            return self.beta
        error = math.log(min(self.compression, 1e12) / self.setpoint())
        lo, hi = self.log_beta_range
        self.integral = min(max(self.integral + self.ki * error, -hi), -lo)
        if self.anti_windup and error < 0 and self.integral > 0:  # behind: nothing holds β down
            self.integral = 0.0
        self.log_beta = min(max(-self.kp * error - self.integral, lo), hi)
        self.steps += 1
        return self.beta

    @torch.no_grad()
    def hold(self) -> None:
        """After an optimiser step, while :attr:`holding`, the mask stays the one held, both ways:
        a kept weight whose log α = log σ² − log(θ² + 1e-8) reached the threshold gets |θ| =
        sqrt(1.01 · e^{log σ² − threshold}) (:func:`raise_to_floor`); a dropped one whose log α
        fell below it (under Adam a dropped θ oscillates around 0 with the learning rate's
        amplitude, and a tiny |θ| has a small log α) gets its log σ² raised
        (:func:`keep_dropped`). A no-op before the target is reached."""
        if self._held is None:
            return
        for m, keep in zip(self.layers, self._held):
            raise_to_floor(m.weight, keep, kept_floor(m.log_sigma2, self.threshold))
            keep_dropped(m.weight, m.log_sigma2, ~keep, self.threshold)

    def state_dict(self) -> dict:
        """The controller's state (JSON-safe floats and ints), for a resumed run. The held mask
        is not stored: it is the mask of the parameters at the next :meth:`step`, which
        :meth:`hold` kept equal to it, both ways."""
        return {"integral": self.integral, "log_beta": self.log_beta, "steps": self.steps,
                "compression": self.compression, "holding": self.holding}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.log_beta = float(state["integral"]), float(state["log_beta"])
        self.steps, self.compression = int(state["steps"]), state["compression"]
        self.holding, self._held = bool(state.get("holding", False)), None
