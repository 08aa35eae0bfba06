"""The training loop's optimiser: Adam immune to subnormal floats (issue 23, item 8).

Under train-time clipping (``sparsevd.convert(..., train_clip=True)``) the clipped weights get zero
gradients, so Adam's moments decay geometrically (m by β₁ = 0.9, v by β₂ = 0.999 per step) through
the subnormal range (|x| < 2⁻¹²⁶ ≈ 1.2e-38 in fp32), where every x86 floating-point operation on
them takes ~100 cycles instead of ~1: the sparse-VD epochs of the main job took 3.8–5.4 s instead of
1.8 s (benchmarks/NOTES.md, "Subnormal floats"). :class:`Adam` runs each step with subnormals flushed
to zero (:func:`flush_denormals`), so such moments become exact zeros (an update of 0 instead of
~1e-31·lr: the same training) and the step costs what it costs without clipping. The library's own
CPU kernels flush inside every call (csrc/cpu/denormals.h).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from .functional import kl_sparse_vd_many as _kl_sparse_vd_many
from .nn import SVDO_LAYERS
from .ops import library

__all__ = ["Adam", "SparseVDAdam", "flush_denormals"]

#: The smallest normal fp32 number; a subnormal probe below it reads as 0 under DAZ.
_PROBE = torch.tensor([1e-40], dtype=torch.float32)


def _calling_thread_flushes() -> bool:
    # DAZ reads the subnormal input as 0 (a 1-element op runs on the calling thread).
    return bool((_PROBE * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero on every intra-op CPU thread inside the block, then restore the
    previous mode (of the calling thread; the other threads of torch's team get the same).

    With the compiled library (:func:`sparsevd.ops.library.set_flush_denormal`) this covers torch's
    OpenMP threads, which run the fused Adam and the elementwise kernels; without it
    ``torch.set_flush_denormal`` covers the calling thread only. ``enabled=False`` does nothing (GPU
    parameters: subnormals cost a GPU nothing).
    """
    if not enabled:
        yield
        return
    if library.has_op("native_set_flush_denormal"):
        previous = library.set_flush_denormal(True)
        try:
            yield
        finally:
            library.set_flush_denormal(previous)
        return
    previous = _calling_thread_flushes()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, update rule, state and ``state_dict``) whose ``step``
    runs under :func:`flush_denormals` when some parameter is on the CPU: moments that would be
    subnormal are exact zeros. ``sparsevd.train.adam`` builds it (fused where torch has it).

    Source: Kingma & Ba, "Adam", ICLR 2015 (the rule); issue 23, item 8 (why the flush).
    """

    def step(self, closure=None):  # noqa: D102 (torch.optim.Adam.step)
        on_cpu = any(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        with flush_denormals(on_cpu):
            return super().step(closure)


class SparseVDAdam(Adam):
    """:class:`Adam` that applies the KL of sparse VD itself, for sparsifying a trained model.

    The loss the caller backpropagates is the data term alone; ``step(kl_weight=w)`` adds
    ``w · KL`` (eq. 14 over ``layers``, w per example, e.g. ``kl_scale · β / N``) in two parts:

    - its gradient in log σ² joins the data term's inside Adam (as if it were in the loss);
    - its gradient g in θ is applied after Adam's step, preconditioned by the data term's own
      second moment v̂ (Adam's bias-corrected ``exp_avg_sq`` of θ, which the KL never enters):
      |θ| ← max(|θ| − lr · |g| / (√v̂ + eps), 0), θ's sign kept (g always points θ toward 0).

    Why: inside Adam a gradient is divided by its own root mean square, so when the KL dominates a
    weight's gradient every θ, important or not, moves toward 0 at ≈ lr per step. On a trained
    model that drags the weights the data needs (all-MiniLM-L6-v2: held-out cosine 0.842 at 4×).
    Divided by the data's root mean square instead, the pull is ∝ β·c/(θ·√F) (F the data gradient's
    second moment, an empirical Fisher): weights the data does not hold shrink fast, the others
    barely move, and the SGVLB's stationary points are the same (benchmarks/NOTES.md, "MiniLM,
    the KL's pull preconditioned"). As AdamW takes weight decay out of Adam's normalisation
    (Loshchilov & Hutter, ICLR 2019), this takes the prior's pull out; the step stops at 0
    instead of crossing it (a proximal step).

    Args:
        params: as ``torch.optim.Adam`` (e.g. :func:`sparsevd.recipe.param_groups`); must
            include every θ and log σ² of ``layers``.
        layers: the sparse-VD layers whose KL is applied, or a module holding them.
        **kwargs: ``torch.optim.Adam``'s (lr, betas, eps, ...).

    Raises:
        ValueError: ``layers`` holds no sparse-VD layer, or a θ / log σ² of ``layers`` is not in
            ``params`` (``step``'s KL would not be applied to it).

    Source: Molchanov, Ashukha, Vetrov, ICML 2017 (arXiv:1701.05369), eq. 14 (the KL); Kingma &
    Ba, ICLR 2015 (Adam's moments).
    """

    def __init__(self, params, layers, **kwargs):
        super().__init__(params, **kwargs)
        if isinstance(layers, nn.Module):
            layers = [layers] if isinstance(layers, SVDO_LAYERS) else \
                [m for m in layers.modules() if isinstance(m, SVDO_LAYERS)]
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("layers: holds no sparse-VD layer (convert the model first)")
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for m in self.layers:
            for name in ("weight", "log_sigma2"):
                if id(getattr(m, name)) not in owned:
                    raise ValueError(f"params: a sparse-VD layer's {name} is not among the optimizer's "
                                     "parameters (pass every θ and log σ² of `layers`)")

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def step(self, closure=None, kl_weight: float = 0.0):
        """One Adam step on the gradients in ``.grad`` plus ``kl_weight`` · KL (see the class).

        Args:
            closure: as ``torch.optim.Adam.step`` (it computes the data term's gradients; it is
                called before the KL's are added).
            kl_weight: the KL's weight per example (≥ 0; 0: a plain Adam step).

        Returns:
            The closure's loss, as Adam's ``step``.

        Raises:
            ValueError: ``kl_weight`` is negative or not finite.
        """
        kl_weight = float(kl_weight)
        if not (kl_weight >= 0 and math.isfinite(kl_weight)):
            raise ValueError(f"kl_weight: expected a finite number ≥ 0, got {kl_weight}")
        if kl_weight == 0:
            return super().step(closure)
        loss = None
        if closure is not None:  # the data term's gradients first: the KL's log σ² part adds to them
            with torch.enable_grad():
                loss = closure()
        weights = [m.weight for m in self.layers]
        log_sigma2s = [m.log_sigma2 for m in self.layers]
        with torch.enable_grad():
            kl = kl_weight * _kl_sparse_vd_many(weights, log_sigma2s, check_finite=False)
            grads = torch.autograd.grad(kl, weights + log_sigma2s)
        for s, g in zip(log_sigma2s, grads[len(weights):]):
            s.grad = g.detach().clone() if s.grad is None else s.grad.add_(g)
        super().step()
        with torch.no_grad():
            for w, g in zip(weights, grads[:len(weights)]):
                self._pull_toward_zero(w, g)
        return loss

    def _data_rms(self, p: torch.Tensor) -> torch.Tensor:
        group, state = self._group_of(p), self.state[p]
        _, beta2 = group["betas"]
        if "step" not in state:
            return torch.full_like(p, group["eps"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        return (v / (1 - beta2 ** float(state["step"]))).sqrt_().add_(group["eps"])

    def _pull_toward_zero(self, w: torch.Tensor, g: torch.Tensor) -> None:
        """|θ| ← max(|θ| − lr · |g| / (√v̂ + eps), 0) in place, v̂ the data term's second moment
        (v = 0 for a θ that has had no data gradient yet: eps alone)."""
        shrink = g.abs().mul_(self._group_of(w)["lr"]).div_(self._data_rms(w))
        w.copy_(w.sign() * (w.abs() - shrink).clamp_(min=0))
