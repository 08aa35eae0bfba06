"""Predictive uncertainty, the Bayesian half of sparse VD: Monte-Carlo predictive distributions and
their calibration.

``predict(model, x, samples=S)`` averages the softmax over S forward passes in which every
sparse-VD layer samples its output with the local reparameterization trick (the training-mode
forward, noise from the seed), while every other module stays in eval mode (dropout off, batch norm
on its running statistics). S = 0 is the deterministic eval mode (the pruned mean weights).

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369), sec. 4 (the approximate posterior q(w | θ, α) and its LRT samples);
expected calibration error as in Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural
Networks", ICML 2017 (equal-width confidence bins).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .nn import SVDO_LAYERS
from .outputs import find_logits

__all__ = ["Prediction", "evaluate_predictive", "expected_calibration_error", "predict", "sampling"]


@dataclasses.dataclass
class Prediction:
    """``probs`` (B, C): the predictive mean of the softmax; ``entropy`` (B,): its entropy in nats,
    H[p] = −Σ_c p_c log p_c (0 for a certain prediction, log C at most); ``samples``: S."""

    probs: Tensor
    entropy: Tensor
    samples: int


@contextlib.contextmanager
def sampling(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``model`` is in eval mode except its sparse-VD layers, which sample
    (LRT, training-mode forward); the modes are restored on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, SVDO_LAYERS):
            m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


@torch.no_grad()
def predict(model: nn.Module, x, samples: int = 10, seed: Optional[int] = None,
            logits: Union[None, str, int] = None) -> Prediction:
    """The Monte-Carlo predictive distribution of a classifier with sparse-VD layers.

    p(y | x) ≈ (1/S) Σ_s softmax(f(x; w_s)), w_s ~ q(w | θ, α), drawn through the LRT (each layer
    samples its pre-activations, eq. of sec. 4.2); S = 0 gives the deterministic eval-mode
    prediction softmax(f(x; θ ⊙ [log α < threshold])).

    Args:
        model: maps x to logits (B, C), or to a dict, a Hugging Face ``ModelOutput`` or a tuple
            holding them (see ``logits``); its own train/eval modes are restored afterwards.
        x: a batch of inputs on the model's device: a tensor (``model(x)``) or a dict of
            keyword arguments such as a tokenizer's output (``model(**x)``).
        samples: S ≥ 0.
        seed: seeds the noise (``torch.manual_seed`` inside a forked RNG state, so the caller's
            generator is untouched); None draws from the current generator.
        logits: where the logits are in the model's output: a key of a dict / ModelOutput, or
            an index of a tuple. Default: the output itself when it is a tensor, its
            ``"logits"`` entry for a dict / ModelOutput, its first element for a tuple (where
            transformers puts the logits when no labels are given).

    Returns:
        :class:`Prediction`: ``probs`` (B, C) in fp32 or wider, rows summing to 1, ``entropy``
        (B,) in nats, ``samples``: S, or 0 when the prediction is deterministic.

    Warns:
        RuntimeWarning: ``samples`` > 0 for a model without sparse-VD layers (a dense model, a
            deployed one: nothing to sample); the deterministic eval-mode prediction is returned,
            labelled ``samples=0``.

    Raises:
        ValueError: ``samples`` < 0 or not an int; logits that are not (B, C); an output whose
            logits are not found (the message lists its keys).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples: expected an int ≥ 0, got {samples!r}")
    if samples and not any(isinstance(m, SVDO_LAYERS) for m in model.modules()):
        warnings.warn(f"predict: the model has no sparse-VD layers (LinearSVDO, Conv2dSVDO, "
                      f"Conv1dSVDO; a dense or a deployed model), so nothing is sampled: the "
                      f"prediction is deterministic (the eval-mode softmax, returned with "
                      f"samples=0), not a {samples}-sample Monte-Carlo mean", RuntimeWarning,
                      stacklevel=3)
        samples = 0
    was = {m: m.training for m in model.modules()}
    try:
        run = _caller(model, x, logits)
        if samples == 0:
            model.eval()
            out = run()
            probs = torch.softmax(out.float() if out.dtype in (torch.float16, torch.bfloat16)
                                  else out, -1)
            return Prediction(probs, _entropy(probs), 0)
        device = next((v.device for v in (x.values() if isinstance(x, Mapping) else [x])
                       if isinstance(v, Tensor)), torch.device("cpu"))
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with sampling(model):
                total = None
                for _ in range(samples):
                    out = run()
                    p = torch.softmax(out.float() if out.dtype in (torch.float16, torch.bfloat16)
                                      else out, -1)
                    total = p if total is None else total + p
        probs = total / samples
        return Prediction(probs, _entropy(probs), samples)
    finally:
        for m, mode in was.items():
            m.train(mode)


def _caller(model: nn.Module, x, key: Union[None, str, int]):
    """A function running the model on x and returning its checked (B, C) logits."""
    def run() -> Tensor:
        out = model(**x) if isinstance(x, Mapping) else model(x)
        logits = find_logits(out, key)
        _check_logits(logits)
        return logits
    return run


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"model: expected logits as a tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"model: expected logits of shape (B, C), got {tuple(logits.shape)}")


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b| over ``bins`` equal-width bins of the
    confidence max_c p_c (Guo et al. 2017), a fraction in [0, 1].

    Args:
        probs: (n, C) predictive probabilities. labels: (n,) int64 classes. bins: ≥ 1.

    Raises:
        ValueError: mismatched shapes, no rows, ``bins`` < 1.
    """
    if probs.dim() != 2 or labels.shape != probs.shape[:1] or probs.shape[0] == 0:
        raise ValueError(f"probs, labels: expected (n, C) and (n,) with n ≥ 1, got "
                         f"{tuple(probs.shape)} and {tuple(labels.shape)}")
    if bins < 1:
        raise ValueError(f"bins: expected ≥ 1, got {bins}")
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 falls into the first bin
    idx = torch.clamp(torch.ceil(conf * bins).long() - 1, 0, bins - 1)
    n = conf.numel()
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        if k:
            ece += k / n * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece if math.isfinite(ece) else float("nan")


@torch.no_grad()
def evaluate_predictive(model: nn.Module, loader, device, samples: int = 0, bins: int = 15,
                        seed: Optional[int] = 0) -> dict:
    """Accuracy, ECE (``bins`` bins), negative log-likelihood and mean entropy of
    :func:`predict` with ``samples`` over a loader of ``(x, y)`` batches.

    Returns:
        ``{"samples", "accuracy", "ece", "nll", "entropy"}``: fractions, and nats per example.
    """
    probs, labels = [], []
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        pred = predict(model, x, samples, seed=None if seed is None else seed + i)
        samples = pred.samples  # 0 when the model has nothing to sample (predict warns)
        probs.append(pred.probs.double().cpu())
        labels.append(y.cpu())
    p, y = torch.cat(probs), torch.cat(labels)
    nll = float(-torch.log(p.gather(1, y[:, None]).clamp_min(1e-300)).mean())
    return {"samples": samples, "accuracy": float((p.argmax(1) == y).double().mean()),
            "ece": expected_calibration_error(p, y, bins), "nll": nll,
            "entropy": float(_entropy(p).mean())}
