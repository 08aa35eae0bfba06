"""Model surgery: ``convert`` dense layers to sparse-VD layers, and ``report`` the sparsity."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, List, Optional, Union

import torch
from torch import nn

from .nn import DEFAULT_THRESHOLD, SVDO_LAYERS, Conv2dSVDO, LinearSVDO

NameFilter = Union[None, Callable[[str], bool], Iterable[str]]


def _name_filter(include: NameFilter) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if callable(include):
        return include
    names = set(include)
    return lambda name: name in names


def _convert_one(name: str, m: nn.Module, threshold: float) -> nn.Module:
    factory = {"device": m.weight.device, "dtype": m.weight.dtype}
    if isinstance(m, nn.Linear):
        new = LinearSVDO(m.in_features, m.out_features, m.bias is not None, threshold, **factory)
    else:
        if m.padding_mode != "zeros":
            raise ValueError(
                f"model: {name} uses padding_mode={m.padding_mode!r}; "
                "Conv2dSVDO supports zero padding (ints, pairs, 'same', 'valid')"
            )
        new = Conv2dSVDO(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups, m.bias is not None, threshold, **factory,
        )
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


def convert(
    model: nn.Module, include: NameFilter = None, threshold: float = DEFAULT_THRESHOLD
) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by its sparse-VD twin, in place.

    θ and b are copied; log σ² starts at −10, so in training mode the converted model computes what
    the dense one did up to noise of std e⁻⁵·sqrt(Σ x²) per output. In eval mode it computes the
    dense model without its tiny weights: log α = −10 − log(θ² + 1e-8) ≥ 3 exactly where
    θ² + 1e-8 ≤ e⁻¹³ (|θ| ≲ 1.5e-3), and those are dropped from the start.

    Args:
        model: any module (a bare nn.Linear / nn.Conv2d is converted and returned).
        include: None (all layers), a collection of module names (as in ``named_modules``), or a
            predicate on the name.
        threshold: the layers' log α pruning threshold.

    Returns:
        ``model`` (or the new layer when ``model`` itself is nn.Linear / nn.Conv2d).

    Raises:
        ValueError: a Conv2d with a padding mode other than zeros (padding='same' and 'valid'
            convert, and resolve as torch resolves them).
    """
    keep = _name_filter(include)
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        return _convert_one("", model, threshold) if keep("") else model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) in (nn.Linear, nn.Conv2d):  # subclasses may change forward: left alone
                if keep(full):
                    setattr(module, child_name, _convert_one(full, child, threshold))
    return model


class _Counts:
    """sparsity and compression from ``params`` (all weights) and ``nonzero`` (weights kept)."""

    params: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        """Percentage of weights dropped."""
        return 100.0 * (1.0 - self.nonzero / self.params) if self.params else 0.0

    @property
    def compression(self) -> float:
        """params / nonzero (inf when everything is dropped)."""
        return self.params / self.nonzero if self.nonzero else float("inf")


@dataclasses.dataclass
class LayerReport(_Counts):
    """One row of :func:`report`: a weight layer and how much of it is kept."""

    name: str
    kind: str
    shape: tuple
    params: int
    nonzero: int

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d.update(sparsity=self.sparsity, compression=self.compression)
        return d


@dataclasses.dataclass
class Report(_Counts):
    """Per-layer sparsity of a model; ``str(report)`` is a printable table."""

    layers: List[LayerReport]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(r.nonzero for r in self.layers)

    def as_dict(self) -> dict:
        return {
            "layers": [r.as_dict() for r in self.layers],
            "params": self.params,
            "nonzero": self.nonzero,
            "sparsity": self.sparsity,
            "compression": self.compression,
        }

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "params", "nonzero", "sparsity %", "compression")
        rows = [
            (r.name, r.kind, "x".join(map(str, r.shape)), str(r.params), str(r.nonzero),
             f"{r.sparsity:.2f}", f"{r.compression:.1f}x")
            for r in self.layers
        ]
        rows.append(("total", "", "", str(self.params), str(self.nonzero),
                     f"{self.sparsity:.2f}", f"{self.compression:.1f}x"))
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

        def fmt(row):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths)))

        lines = [fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows[:-1]]
        lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
        return "\n".join(lines)


@torch.no_grad()
def report(model: nn.Module, threshold: Optional[float] = None) -> Report:
    """Sparsity of every weight layer of ``model``.

    Sparse-VD layers count the weights with log α < threshold (their own ``threshold`` unless one
    is given); nn.Linear / nn.Conv2d count their nonzero weights; deployed sparse layers
    (anything with ``num_weights`` and ``num_nonzero``) count what they store. Biases are not
    counted.

    Returns:
        A :class:`Report` (rows, totals, ``as_dict()``, printable with ``print``).
    """
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, SVDO_LAYERS):
            nonzero = int(m.mask(threshold).sum())
            rows.append(LayerReport(name, type(m).__name__, tuple(m.weight.shape), m.num_weights,
                                    nonzero))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            rows.append(LayerReport(name, type(m).__name__, tuple(m.weight.shape), m.weight.numel(),
                                    int((m.weight != 0).sum())))
        elif hasattr(m, "num_weights") and hasattr(m, "num_nonzero") and hasattr(m, "dense_shape"):
            rows.append(LayerReport(name, type(m).__name__, tuple(m.dense_shape), int(m.num_weights),
                                    int(m.num_nonzero)))
    return Report(rows)
