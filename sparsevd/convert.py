"""Model surgery: ``convert`` dense layers to sparse-VD layers (``plan_conversion`` says what it
would do and why), and ``report`` the sparsity.

Converted: exact ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d``; Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2 family: y = x W + b with W (in, out)) as a
LinearSVDO holding Wᵀ (its origin record says so: ``save_pretrained`` writes it back as
Conv1D, :mod:`sparsevd.hf`); ``nn.MultiheadAttention`` by its split twin
:class:`~sparsevd.nn.SplitMultiheadAttention`, whose q / k / v / out projections convert. Left
dense, with the reason in the report: layers whose weight is the same Parameter as another
module's (tied weights, GPT-2's ``lm_head`` and its input embedding: converting would untie them),
embeddings, normalizations, subclasses, and the types without a twin."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import warnings
from typing import Callable, Iterable, List, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._args import check_threshold
from .functional import kept_count
from .nn import (DEFAULT_THRESHOLD, LOG_SIGMA2_INIT, SVDO_LAYERS, Conv1dSVDO, Conv2dSVDO, LinearSVDO,
                 SplitMultiheadAttention)
from .recipe import PretrainedRecipe, init_log_sigma2
from .reference import EPS_THETA
from .hf_integration import attach as attach_hf_quantizer
from .surgery import linear_equivalent, set_origin

NameFilter = Union[None, str, Callable[[str], bool], Iterable[str]]

#: Convertible layer types (exact types: a subclass may change forward, so it is left alone).
CONVERTIBLE = (nn.Linear, nn.Conv2d, nn.Conv1d)
#: The sparse-VD twin of each convertible type.
_TWINS = {nn.Conv2d: Conv2dSVDO, nn.Conv1d: Conv1dSVDO}


def _name_filter(patterns: NameFilter, default: bool) -> Callable[[str], bool]:
    """A predicate on module names: None → ``default`` for every name; a string or a collection
    of strings → glob patterns (``fnmatch``: ``"encoder.*.attn.q"``, an exact name matches
    itself); a callable is used as it is."""
    if patterns is None:
        return lambda name: default
    if callable(patterns):
        return patterns
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


#: The projections of SplitMultiheadAttention, the replacement of nn.MultiheadAttention.
_MHA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (exact type), recognised without importing transformers."""
    return type(m).__name__ == "Conv1D" and type(m).__module__ == "transformers.pytorch_utils"


def _convertible(m: nn.Module) -> bool:
    return type(m) in CONVERTIBLE or _is_hf_conv1d(m) or linear_equivalent(m)


def _is_quantized(m: nn.Module) -> bool:
    """A module of torch's quantization (``torch.ao.nn.quantized``, dynamic or static, and its
    fused forms): int8 weights in packed params, no float weight to convert."""
    return type(m).__module__.startswith(("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized."))


#: Why a module with parameters is left dense, by type (for the conversion report).
_DENSE_REASONS = (
    (nn.Embedding, "a lookup table: no matrix product to sparsify"),
    (nn.EmbeddingBag, "a lookup table: no matrix product to sparsify"),
    ((nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm, nn.GroupNorm),
     "a normalization: per-feature scales, no weight matrix"),
    (nn.modules.batchnorm._BatchNorm, "a normalization: per-feature scales, no weight matrix"),
    (nn.Conv3d, "no sparse-VD twin of this convolution yet"),
    (nn.modules.conv._ConvTransposeNd, "no sparse-VD twin of transposed convolutions"),
    ((nn.RNNBase,), "recurrent weights are not converted"),
)


@dataclasses.dataclass
class ConversionEntry:
    """One module of :func:`plan_conversion`: ``action`` "convert", "sparse VD" (already) or
    "dense" (left as it is, with the ``reason``)."""

    name: str
    kind: str
    action: str
    reason: str = ""


class ConversionReport(list):
    """The modules :func:`convert` converted and every module with parameters it left dense, and
    why; ``str(report)`` is a table."""

    def converted(self) -> List[str]:
        return [e.name for e in self if e.action == "convert"]

    def dense(self) -> List[ConversionEntry]:
        return [e for e in self if e.action == "dense"]

    def __str__(self) -> str:
        rows = [(e.name or "<model>", e.kind, e.action, e.reason) for e in self]
        w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("module", "type", "action"))]
        lines = [f"{'module':<{w[0]}}  {'type':<{w[1]}}  {'action':<{w[2]}}  reason"]
        lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
        return "\n".join(lines)


def _dense_reason(m: nn.Module) -> str:
    for types, why in _DENSE_REASONS:
        if isinstance(m, types):
            return why
    if parametrize.is_parametrized(m):
        names = ", ".join(m.parametrizations.keys())
        return (f"its {names} is reparametrized (torch.nn.utils.parametrize, e.g. weight norm); "
                f"parametrize.remove_parametrizations(module, {next(iter(m.parametrizations))!r}) "
                "makes it a plain layer that converts")
    if isinstance(m, CONVERTIBLE):
        base = next(t for t in CONVERTIBLE if isinstance(m, t))
        return f"a subclass of nn.{base.__name__} (its forward may differ): left as it is"
    if "norm" in type(m).__name__.lower():
        return "a normalization (by its name): per-feature scales, no weight matrix"
    own = ", ".join(n for n, _ in m.named_parameters(recurse=False))
    return f"no sparse-VD twin of this module type: its own parameters ({own}) stay dense"


def _unsupported(m: nn.Module) -> Optional[str]:
    """Why an nn.Conv2d / nn.Conv1d cannot be converted (None when it can)."""
    if isinstance(m, (nn.Conv2d, nn.Conv1d)) and m.padding_mode != "zeros":
        return (f"uses padding_mode={m.padding_mode!r}; {_TWINS[type(m)].__name__} supports zero "
                "padding (ints, 'same', 'valid')")
    return None


def plan_conversion(model: nn.Module, include: NameFilter = None,
                    exclude: NameFilter = None) -> ConversionReport:
    """What :func:`convert` does to ``model``, module by module, without changing it.

    Args:
        model: any module.
        include: which convertible layers to convert: None (all), a glob pattern or a collection
            of patterns on the names of ``named_modules`` (``"blocks.*.mlp.*"``), or a predicate.
        exclude: patterns (or a predicate) of layers to leave dense even when included.

    Returns:
        A :class:`ConversionReport`: every exact nn.Linear / nn.Conv2d / nn.Conv1d and
        transformers ``Conv1D`` ("convert", or "dense" with the pattern that kept it dense, or
        the module its weight is tied to), every nn.MultiheadAttention ("convert": replaced by
        :class:`~sparsevd.nn.SplitMultiheadAttention`, followed by its four projections
        ``<name>.q_proj``, ``.k_proj``, ``.v_proj``, ``.out_proj`` as layers of their own; "dense"
        when include / exclude keep all four dense), every sparse-VD layer already there, and
        every other module holding parameters of its own ("dense", with the reason: an
        embedding, a normalization, ...; the layers inside it are listed on their own, e.g.
        the patch-embedding convolution of a ViT's embeddings module, which also holds the
        position embeddings). A quantized module (torch.ao) is "dense" with what is inside it.
    """
    keep = _name_filter(include, True)
    drop = _name_filter(exclude, False)
    tied = _tied(model)
    report = ConversionReport()
    skip_under: List[str] = []

    def layer(name: str, kind: str, why_converted: str = "", m: Optional[nn.Module] = None) -> ConversionEntry:
        if not keep(name):
            return ConversionEntry(name, kind, "dense", "not matched by include")
        if drop(name):
            return ConversionEntry(name, kind, "dense", "matched by exclude")
        if m is not None and id(m) in tied:
            return ConversionEntry(name, kind, "dense", tied[id(m)])
        return ConversionEntry(name, kind, "convert", why_converted)

    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_under):
            continue
        kind = type(m).__name__
        if isinstance(m, SVDO_LAYERS):
            report.append(ConversionEntry(name, kind, "sparse VD", "already a sparse-VD layer"))
        elif _convertible(m):
            why = ("transformers Conv1D (weight (in, out)): a LinearSVDO holding the transposed "
                   "weight" if _is_hf_conv1d(m) else
                   "computes nn.Linear's x Wᵀ + b: converted as an nn.Linear" if linear_equivalent(m) else "")
            report.append(layer(name, kind, why, m))
        elif type(m) is nn.MultiheadAttention:
            skip_under.append(name)
            projections = [layer(f"{name}.{p}", "Linear") for p in _MHA_PROJECTIONS]
            if any(e.action == "convert" for e in projections):
                report.append(ConversionEntry(name, kind, "convert", "replaced by "
                              "sparsevd.nn.SplitMultiheadAttention: the packed in_proj_weight "
                              "as q_proj, k_proj, v_proj layers (same outputs)"))
                report.extend(projections)
            else:
                report.append(ConversionEntry(name, kind, "dense", "none of its projections "
                              f"({', '.join(_MHA_PROJECTIONS)}) is included"))
        elif parametrize.is_parametrized(m):  # (its parametrizations are its own business)
            report.append(ConversionEntry(name, kind, "dense", _dense_reason(m)))
            skip_under.append(name)
        elif _is_quantized(m):
            report.append(ConversionEntry(name, kind, "dense", "a quantized module (torch.ao."
                          "quantization): its weight is packed int8; convert the float model"))
            skip_under.append(name)
        elif any(True for _ in m.parameters(recurse=False)):  # its own; its submodules follow
            report.append(ConversionEntry(name, kind, "dense", _dense_reason(m)))
    return report


def _tied(model: nn.Module) -> dict:
    """id(layer) → the reason a convertible layer stays dense: one of its parameters is also a
    parameter of another module (tied weights)."""
    owners: dict = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, f"{name}.{pname}" if name else pname))
    out = {}
    for name, m in model.named_modules():
        if not _convertible(m):
            continue
        for pname, p in m._parameters.items():
            others = [full for mod, full in owners.get(id(p), []) if mod is not m] if p is not None else []
            if others:
                out[id(m)] = (f"its {pname} is the same Parameter as {others[0]} (tied weights): "
                              "converting would untie them; untie them first to convert it (e.g. "
                              "tie_word_embeddings=False in a Hugging Face config)")
                break
    return out


def _init_log_sigma2(new: nn.Module, threshold: float) -> None:
    """log σ² = −10 (the paper's initialisation), lowered for the weights it would drop at once
    (log α ≥ threshold where θ² + 1e-8 ≤ e^(−10 − threshold)) to log α = threshold − 1: the
    converted model in eval mode is then exactly the dense one, and those tiny weights are pruned
    after the first steps instead of at the conversion."""
    with torch.no_grad():
        log_w2 = torch.log(new.weight * new.weight + EPS_THETA)
        dropped = LOG_SIGMA2_INIT - log_w2 >= threshold
        new.log_sigma2.copy_(torch.where(dropped, log_w2 + (threshold - 1.0),
                                         torch.full_like(log_w2, LOG_SIGMA2_INIT)))


def _convert_one(name: str, m: nn.Module, threshold: float, train_clip: bool) -> nn.Module:
    if type(m) is nn.MultiheadAttention:
        return set_origin(SplitMultiheadAttention.from_module(m), {"type": "MultiheadAttention"})
    factory = {"device": m.weight.device, "dtype": m.weight.dtype, "train_clip": train_clip}
    if _is_hf_conv1d(m):  # y = x W + b, W (in, out): a LinearSVDO with Wᵀ
        new = LinearSVDO(m.weight.shape[0], m.weight.shape[1], m.bias is not None, threshold, **factory)
        with torch.no_grad():
            new.weight.copy_(m.weight.t())
            if m.bias is not None:
                new.bias.copy_(m.bias)
        _init_log_sigma2(new, threshold)
        return set_origin(new.train(m.training), {"type": "Conv1D"})
    if isinstance(m, nn.Linear):
        new = LinearSVDO(m.in_features, m.out_features, m.bias is not None, threshold, **factory)
    else:
        why = _unsupported(m)
        if why:
            raise ValueError(f"model: {name} {why}; exclude it to leave it dense")
        new = _TWINS[type(m)](
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups, m.bias is not None, threshold, **factory,
        )
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    _init_log_sigma2(new, threshold)
    new.train(m.training)
    return new


def convert(
    model: nn.Module, include: NameFilter = None, threshold: float = DEFAULT_THRESHOLD,
    exclude: NameFilter = None, *, train_clip: bool = False, return_report: bool = False,
    init: Union[str, float] = "paper",
):
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` layers of ``model`` by their sparse-VD twins, in
    place (exact types only: subclasses may change forward and are left alone, except those
    known to compute nn.Linear, transformers' ``FalconLinear``); also
    transformers ``Conv1D`` (a LinearSVDO with the transposed weight) and the projections of
    ``nn.MultiheadAttention`` (replaced by :class:`~sparsevd.nn.SplitMultiheadAttention`). Layers
    whose weight is tied to another module's stay dense (see :func:`plan_conversion`).

    θ and b are copied; log σ² starts at −10 (paper, sec. 5), lowered for the tiny weights that
    −10 would drop at once (|θ| ≲ e^(−(10 + threshold)/2) ≈ 1.5e-3) to log α = threshold − 1. So
    in eval mode the converted model computes exactly what the dense one did, and in training mode
    the same up to LRT noise of std ≤ e⁻⁵·sqrt(Σ x²) per output.

    Args:
        model: any module (a bare nn.Linear / nn.Conv2d / nn.Conv1d / Conv1D is converted and
            returned; a bare nn.MultiheadAttention becomes a converted SplitMultiheadAttention).
        include: which layers: None (all), a module-name glob pattern or a collection of patterns
            (names as in ``named_modules``, e.g. ``"encoder.*.ffn.*"``; an exact name matches
            itself), or a predicate on the name.
        threshold: the layers' log α pruning threshold.
        exclude: patterns (or a predicate) of layers to leave dense.
        train_clip: the layers' train-time clipping (:attr:`sparsevd.nn.LinearSVDO.train_clip`):
            in training mode the weights with log α ≥ ``threshold`` leave the LRT forward and
            backward, as in the authors' code.
        return_report: also return the :class:`ConversionReport` of :func:`plan_conversion`:
            what was converted, and every module left dense and why.
        init: the converted layers' log σ²: ``"paper"`` (the default: −10, as above, for training
            from scratch or from a trained model with the paper's recipe), ``"pretrained"``
            (:class:`sparsevd.recipe.PretrainedRecipe`'s: one log σ² for every weight with the
            median weight at log α = ``log_alpha_init``, capped at log α = ``threshold`` − 1,
            :func:`sparsevd.recipe.init_log_sigma2` with ``shared=True``), or a float: that log α
            for every weight (below ``threshold``).

    Returns:
        ``model`` (or the new layer when ``model`` itself is a convertible layer), and the report
        when ``return_report``.

    Raises:
        ValueError: an included Conv2d / Conv1d with a padding mode other than zeros (exclude it to leave
            it dense; padding='same' and 'valid' convert, resolved as torch resolves them); an
            invalid ``threshold``.
        TypeError: ``train_clip`` is not a bool; ``init`` neither a string nor a real number.
        ValueError: ``init`` an unknown string, or a log α not below ``threshold``.
        ValueError: ``include`` patterns (not a predicate) that match none of the model's
            convertible layers.

    Warns:
        UserWarning: nothing was converted and the model has no sparse-VD layer (e.g. every
            layer excluded, or a model quantized with torch.ao.quantization: convert the float
            model).
    """
    threshold = check_threshold(threshold)
    if not isinstance(train_clip, bool):
        raise TypeError(f"train_clip: expected a bool, got {train_clip!r}")
    log_alpha0 = _init_log_alpha(init, threshold)
    out = _convert(model, include, threshold, exclude, train_clip)
    _check_converted(out[1], out[0], include)
    if log_alpha0 is not None and _has_svdo(out[0]):
        shared = init == "pretrained" and PretrainedRecipe().shared_init
        init_log_sigma2(out[0], log_alpha0, shared=shared)
    return out if return_report else out[0]


def _init_log_alpha(init, threshold: float) -> Optional[float]:
    """The log α of ``convert``'s ``init`` (None for the paper's log σ² = −10)."""
    if isinstance(init, str):
        if init == "paper":
            return None
        if init == "pretrained":
            init = PretrainedRecipe().log_alpha_init
        else:
            raise ValueError(f"init: expected 'paper', 'pretrained' or a log α, got {init!r}")
    if isinstance(init, bool) or not isinstance(init, numbers.Real):
        raise TypeError(f"init: expected 'paper', 'pretrained' or a real log α, got {init!r}")
    if not math.isfinite(init) or init >= threshold:
        raise ValueError(f"init: a log α must be finite and below the threshold {threshold}, got {init}")
    return float(init)


def _check_converted(report: ConversionReport, model: nn.Module, include: NameFilter) -> None:
    """Say when ``convert`` left the model without a sparse-VD layer: an error when ``include``
    patterns matched none of its layers (a typo trains a dense model), a warning otherwise."""
    if report.converted() or _has_svdo(model):
        return
    unmatched = [e.name for e in report if e.reason == "not matched by include"]
    if unmatched and not callable(include):
        raise ValueError(f"include: {include!r} matches none of the model's convertible layers "
                         f"(names as in named_modules(), e.g. {', '.join(map(repr, unmatched[:3]))})")
    why = "; ".join(f"{e.name or '<model>'}: {e.reason}" for e in report.dense()[:3])
    warnings.warn("convert: no layer of the model was converted, it has no sparse-VD layer"
                  + (f" ({why}{'; ...' if len(report.dense()) > 3 else ''})" if why else
                     " (no nn.Linear, nn.Conv2d, nn.Conv1d, transformers Conv1D or "
                     "nn.MultiheadAttention)")
                  + "; plan_conversion(model) lists every module left dense and why", stacklevel=3)


def _has_svdo(model: nn.Module) -> bool:
    return any(isinstance(m, SVDO_LAYERS) for m in model.modules())


def _convert(model: nn.Module, include: NameFilter, threshold: float, exclude: NameFilter,
             train_clip: bool):
    """convert with the paper's init: (model or new layer, report)."""
    if type(model) is nn.MultiheadAttention:  # its split twin, whose projections convert
        return _convert(_convert_one("", model, threshold, train_clip), include, threshold, exclude,
                        train_clip)
    if _convertible(model):
        keep = _name_filter(include, True)("") and not _name_filter(exclude, False)("")
        out = _convert_one("", model, threshold, train_clip) if keep else model
        rep = ConversionReport([ConversionEntry("", type(model).__name__, "convert" if keep else "dense",
                                                "" if keep else "excluded")])
        return out, rep
    rep = plan_conversion(model, include, exclude)
    todo = set(rep.converted())
    _replace_named(model, todo, lambda full, child: type(child) is nn.MultiheadAttention,
                   threshold, train_clip)
    _replace_named(model, todo, lambda full, child: _convertible(child), threshold, train_clip)
    for m in model.modules():  # their nested-tensor fast path calls the layers' packed weights
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(s, SVDO_LAYERS) for s in m.modules()):
            m.use_nested_tensor = False
    attach_hf_quantizer(model)  # save_pretrained writes a model from_pretrained rebuilds
    return model, rep


def _replace_named(model: nn.Module, todo: set, which, threshold: float, train_clip: bool) -> None:
    """Convert the modules named in ``todo`` that ``which(name, module)`` selects, in place; a
    module reachable under several names becomes one new module at all of them."""
    new: dict = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):  # (named_children skips repeats)
            if child is None:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if id(child) in new:
                setattr(module, child_name, new[id(child)])
            elif full in todo and which(full, child):
                new[id(child)] = _convert_one(full, child, threshold, train_clip)
                setattr(module, child_name, new[id(child)])


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
    #: Parameters of the model outside the rows' weights (embeddings, biases, norms, ...), all
    #: counted as kept by the whole-model figures; each shared tensor once; log σ² not counted.
    other_params: int = 0

    @property
    def model_params(self) -> int:
        """Every parameter of the model: the rows' weights plus :attr:`other_params`."""
        return self.params + self.other_params

    @property
    def model_compression(self) -> float:
        """Whole-model compression: model_params / (nonzero + other_params); an embedding counts
        as kept (issue 23: MiniLM's 11.9M embedding parameters outnumber its linear weights)."""
        kept = self.nonzero + self.other_params
        return self.model_params / kept if kept else float("inf")

    def model_line(self) -> str:
        """The whole-model figures in one line (printed after the table by ``sparsevd train``)."""
        return (f"whole model: {self.model_params} params ({self.other_params} outside these layers, "
                f"counted as kept), compression {self.model_compression:.2f}x")

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
            "model_params": self.model_params,
            "model_compression": self.model_compression,
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
    """Sparsity of every weight layer of ``model``, and of the whole model.

    Sparse-VD layers count the weights with log α < threshold (their own ``threshold`` unless one
    is given) in one pass each (:func:`sparsevd.functional.kept_count`: tens of milliseconds on
    all-MiniLM-L6-v2's 11M linear weights, cheap enough to call per epoch); nn.Linear / nn.Conv2d /
    nn.Conv1d count their nonzero weights; deployed sparse layers (anything with ``num_weights`` and
    ``num_nonzero``) count what they store. Biases are not counted in the rows; they and every other
    parameter (embeddings, norms) are :attr:`Report.other_params`, kept in the whole-model figures.

    Returns:
        A :class:`Report` (rows, totals, ``model_compression``, ``as_dict()``, printable;
        :meth:`Report.model_line` says the whole-model figures in one line).

    Raises:
        ValueError: a non-finite ``threshold``, or NaN / ±inf in a sparse-VD layer's parameters.
    """
    rows, counted = [], set()
    for name, m in model.named_modules():
        row = _layer_row(name, m, threshold)
        if row is not None:
            rows.append(row)
            counted.update(id(t) for t in _layer_tensors(m))
    other = 0
    for p in model.parameters():  # each shared tensor once
        if id(p) not in counted:
            counted.add(id(p))
            other += p.numel()
    return Report(rows, other_params=other)


def _layer_row(name: str, m: nn.Module, threshold: Optional[float]) -> Optional[LayerReport]:
    if isinstance(m, SVDO_LAYERS):
        t = m.threshold if threshold is None else threshold
        return LayerReport(name, type(m).__name__, tuple(m.weight.shape), m.num_weights,
                           kept_count(m.weight, m.log_sigma2, t))
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
        return LayerReport(name, type(m).__name__, tuple(m.weight.shape), m.weight.numel(),
                           int(torch.count_nonzero(m.weight)))
    if hasattr(m, "num_weights") and hasattr(m, "num_nonzero") and hasattr(m, "dense_shape"):
        return LayerReport(name, type(m).__name__, tuple(m.dense_shape), int(m.num_weights),
                           int(m.num_nonzero))
    return None


def _layer_tensors(m: nn.Module) -> List[torch.Tensor]:
    """The parameters of a reported layer that its row counts (the weight, log σ², a deployed
    layer's stored values), i.e. every direct parameter but the bias."""
    return [p for n, p in m.named_parameters(recurse=False) if n != "bias"]
