"""Pictures of a training run, with matplotlib: where people look rather than read.

- ``curves.png``: per epoch, the test accuracy (eval mode), the compression (all weights / weights
  kept, log scale) and KL/N (nats per training example), with the dense pre-training shaded;
- ``masks.png``: for the first linear layer, which input pixels survive (a pixel survives when any
  kept weight reads it), as an image of the input's shape, and the kept-weight pattern of every
  layer (rows: outputs, columns: inputs; convolutions flattened to (C_out, C_in·kH·kW)).

``plot_run(DIR)`` draws both from what ``sparsevd train --out DIR`` wrote (summary.json and the
checkpoint); ``sparsevd train`` calls it at the end and ``sparsevd plot DIR`` redraws.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._files import atomic_write_bytes
from .nn import SVDO_LAYERS, LinearSVDO

__all__ = ["kept_masks", "plot_curves", "plot_masks", "plot_run"]

PathLike = Union[str, Path]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: PathLike) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix, PNG by default) atomically: a full disk
    raises one FileWriteError (an OSError) naming the file and keeps the previous picture."""
    path = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=path.suffix[1:].lower() or "png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_curves(history: Sequence[dict], path: PathLike, title: str = "") -> Path:
    """Draw ``curves.png`` from a summary's ``history`` (one dict per epoch with ``epoch``,
    ``test_accuracy``, ``compression``, ``kl_per_image``, ``phase``).

    Raises:
        ValueError: an empty history.
    """
    if not history:
        raise ValueError("history: no epoch to plot")
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    dense = [h["epoch"] for h in history if h.get("phase") == "dense"]
    panels = [
        ("test accuracy (%)", [100 * h["test_accuracy"] for h in history], False),
        ("compression (×, log scale)",
         [h["compression"] if h.get("compression") else math.nan for h in history], True),
        ("KL / N (nats per example)", [h.get("kl_per_image") or 0.0 for h in history], False),
    ]
    for ax, (label, values, log) in zip(axes, panels):
        ax.plot(epochs, values, marker="o", markersize=3, color="tab:blue")
        if log and any(v and v > 0 for v in values):
            ax.set_yscale("log")
        if dense and len(dense) < len(epochs):
            ax.axvspan(min(dense) - 0.5, max(dense) + 0.5, color="0.9", zorder=0,
                       label="dense pre-training")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


@torch.no_grad()
def kept_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{layer name: boolean mask of the kept weights as a 2-D (outputs, inputs) tensor} for every
    sparse-VD layer (its eval-mode rule, log α < threshold) and every nn.Linear / nn.Conv2d
    (its nonzero weights)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SVDO_LAYERS):
            mask = m.mask()
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            mask = m.weight != 0
        else:
            continue
        out[name] = mask.reshape(mask.shape[0], -1).cpu()
    return out


def plot_masks(model: nn.Module, path: PathLike, input_shape: Optional[Tuple[int, ...]] = None,
               title: str = "") -> Path:
    """Draw ``masks.png``: the surviving input pixels of the first linear layer (when it reads
    the flattened input, ``prod(input_shape)`` features) and every layer's kept-weight pattern.

    Raises:
        ValueError: a model without weight layers.
    """
    masks = kept_masks(model)
    if not masks:
        raise ValueError("model: no weight layers to draw")
    plt = _pyplot()
    first_linear = next((n for n, m in model.named_modules()
                         if isinstance(m, (LinearSVDO, nn.Linear)) and n in masks), None)
    pixels = None
    if first_linear is not None and input_shape is not None:
        used = masks[first_linear].any(0)
        if used.numel() == math.prod(input_shape):
            h, w = input_shape[-2], input_shape[-1]
            pixels = used.reshape(-1, h, w).any(0).float()
    n = len(masks) + (pixels is not None)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.6), constrained_layout=True, squeeze=False)
    axes = axes[0]
    i = 0
    if pixels is not None:
        axes[0].imshow(pixels.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0].set_title(f"input pixels kept by {first_linear}\n{int(pixels.sum())} of "
                          f"{pixels.numel()}", fontsize=9)
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        i = 1
    for ax, (name, mask) in zip(axes[i:], masks.items()):
        big = max(mask.shape) > 200  # more cells than pixels: grey levels show the density
        ax.imshow(mask.float().numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto",
                  interpolation="antialiased" if big else "nearest")
        kept = int(mask.sum())
        ax.set_title(f"layer {name}: {tuple(mask.shape)}\n{kept} kept "
                     f"({100 * kept / max(mask.numel(), 1):.2f}%)", fontsize=9)
        ax.set_xlabel("inputs")
        ax.set_ylabel("outputs")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_run(run_dir: PathLike) -> Tuple[Path, Path]:
    """Draw ``curves.png`` and ``masks.png`` into ``run_dir`` from its ``summary.json`` and its
    checkpoint (as written by ``sparsevd train --out run_dir``).

    Returns:
        The two paths.

    Raises:
        FileNotFoundError: no summary.json or no checkpoint in ``run_dir``.
        ValueError: a corrupted checkpoint or summary.
    """
    from .checkpoint import input_shape, load_checkpoint

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: not found (a run of `sparsevd train --out DIR` "
                                "writes it)")
    try:
        summary = json.loads(summary_path.read_text())
        history = summary["history"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{summary_path}: not a training summary ({e})") from None
    title = (f"{summary.get('model', '')} {'sparse VD' if summary.get('svd') else 'dense'} on "
             f"{summary.get('dataset', '')}: {100 * summary.get('test_accuracy', 0):.2f}%, "
             f"{summary.get('compression') or 0:.1f}x")
    curves = plot_curves(history, run_dir / "curves.png", title)
    model = load_checkpoint(run_dir)
    masks = plot_masks(model, run_dir / "masks.png", input_shape(run_dir), title)
    return curves, masks
