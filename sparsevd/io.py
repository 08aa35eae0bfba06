"""``save(model, path)`` / ``load(path)`` / ``load(path, model=...)``: deployed (and converted)
models of any architecture as one safetensors file.

The file holds every tensor of the model (its state_dict: each sparse layer's stored weight, CSR
row pointers, column indices and values, or its dense weight; biases; log σ² of sparse-VD layers;
the weights of dense layers left as they are; a tied weight once) and, in the safetensors metadata,

- ``format``: ``"sparsevd.deployed"`` and ``format_version`` (:data:`FORMAT_VERSION`);
- ``config``: JSON with two parts: ``tree``, the module tree (types, sizes, hyper-parameters,
  each sparse layer's plan) when every module is of a supported type, so that :func:`load`
  rebuilds the model without pickle and without the code that built it; and ``model``, for any
  model: its class name, the spec of every module sparsevd made by module name (with what it
  stands for: the type and weight shape of the module it replaced) and the tied tensors'
  aliases, so that ``load(path, model=MyNet())`` puts them into the architecture the user's own
  constructor built (:mod:`sparsevd.overlay`);
- ``sha256``: a digest of all tensor names, dtypes, shapes and bytes and of the config, so that
  any changed byte (a weight, or the config: an activation renamed, a child renamed) is reported
  instead of silently giving other outputs.

The file is written atomically (a temporary file beside it, then a rename): a reader sees the old
file or the new one, never half of one. Files of format version 1 (whose digest did not cover the
config) still load, with a warning; files of version 1 and 2 hold the tree only.

Modules of the tree (exact types, not subclasses): nn.Sequential, SparseLinear, SparseConv2d,
SparseConv1d, LinearSVDO, Conv2dSVDO, Conv1dSVDO, nn.Linear, nn.Conv2d, nn.Conv1d, batch norm (1-D
and 2-D, with running statistics), elementwise activations, dropout, pooling (1-D and 2-D), Flatten/Unflatten,
Softmax/LogSoftmax. A loaded model gives bit-identical outputs: same tensors, same plans, same
kernels.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from . import overlay
from .hf_integration import attach as attach_hf_quantizer
from ._files import atomic_save_safetensors, digest, read_safetensors
from .checkpoint import checkpoint_owning
from .nn import SplitMultiheadAttention
from .nn.sparse import SparseConv1d, SparseConv2d, SparseLinear
from .nn.svdo import Conv1dSVDO, Conv2dSVDO, LinearSVDO
from .surgery import origin, set_origin

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save", "SUPPORTED_MODULES"]

FORMAT = "sparsevd.deployed"
#: 3: any model (a ``tree`` and a ``model`` part), uint16 column indices and dense-storage
#: sparse layers (``weight`` instead of the CSR tensors); 2: the digest covers the config;
#: 1: the first format. Older files load.
FORMAT_VERSION = 3
#: A config nested deeper than this is refused (a ValueError, not a RecursionError).
MAX_DEPTH = 64

PathLike = Union[str, Path]

# Modules rebuilt from constructor arguments read off their attributes.
_SIMPLE: Dict[str, tuple] = {
    "Identity": (nn.Identity, ()),
    "ReLU": (nn.ReLU, ("inplace",)),
    "ReLU6": (nn.ReLU6, ("inplace",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "ELU": (nn.ELU, ("alpha", "inplace")),
    "SELU": (nn.SELU, ("inplace",)),
    "CELU": (nn.CELU, ("alpha", "inplace")),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ("inplace",)),
    "Mish": (nn.Mish, ("inplace",)),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val", "inplace")),
    "Hardsigmoid": (nn.Hardsigmoid, ("inplace",)),
    "Hardswish": (nn.Hardswish, ("inplace",)),
    "Softplus": (nn.Softplus, ("beta", "threshold")),
    "Softsign": (nn.Softsign, ()),
    "Tanhshrink": (nn.Tanhshrink, ()),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "Dropout1d": (nn.Dropout1d, ("p", "inplace")),
    "Dropout2d": (nn.Dropout2d, ("p", "inplace")),
    "AlphaDropout": (nn.AlphaDropout, ("p", "inplace")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Unflatten": (nn.Unflatten, ("dim", "unflattened_size")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "return_indices",
                                 "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad", "divisor_override")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "MaxPool1d": (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "return_indices",
                                 "ceil_mode")),
    "AvgPool1d": (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveMaxPool1d": (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
}
_BATCHNORMS = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d}
_SVDO = {"LinearSVDO": LinearSVDO, "Conv2dSVDO": Conv2dSVDO, "Conv1dSVDO": Conv1dSVDO}
SUPPORTED_MODULES = ("Sequential", "SparseLinear", "SparseConv2d", "SparseConv1d", *_SVDO, "Linear",
                     "Conv2d", "Conv1d", *_BATCHNORMS, *_SIMPLE)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _json_value(v):
    if isinstance(v, (tuple, list)):
        return [_json_value(a) for a in v]
    if isinstance(v, torch.Size):
        return list(v)
    return v


def _tuples(v):
    return tuple(_tuples(a) for a in v) if isinstance(v, list) else v


def _plan_json(m) -> list:
    return [[b, mode] for b, mode in m.plan]


def _describe(m: nn.Module, prefix: str, tensors: Dict[str, Tensor]) -> dict:
    """The JSON spec of ``m``; its tensors go into ``tensors`` under ``prefix``."""
    kind = type(m).__name__
    where = prefix or "<root>"

    def put(name: str, t: Optional[Tensor]) -> None:
        if t is not None:
            tensors[_key(prefix, name)] = t.detach().to("cpu").contiguous()

    if type(m) is nn.Sequential:
        return {"type": "Sequential",
                "children": [[n, _describe(c, _key(prefix, n), tensors)] for n, c in m.named_children()]}
    if type(m) in (SparseLinear, SparseConv2d, SparseConv1d):
        stored = dict(m.named_buffers(recurse=False))  # CSR or dense (not the weight property)
        for name in ("crow_indices", "col_indices", "values", "weight", "bias"):
            put(name, stored.get(name))
        spec = {"type": kind, "dense_shape": list(m.dense_shape), "num_weights": m.num_weights,
                "plan": _plan_json(m), "bias": m.bias is not None}
        if m.plan_threads is not None:
            spec["threads"] = m.plan_threads
        if isinstance(m, SparseLinear):
            spec.update(in_features=m.in_features, out_features=m.out_features)
        else:  # SparseConv2d's pairs, SparseConv1d's 1-tuples
            spec.update(in_channels=m.in_channels, out_channels=m.out_channels,
                        kernel_size=list(m.kernel_size), stride=list(m.stride),
                        padding=list(m.padding), dilation=list(m.dilation), groups=m.groups)
        return spec
    if type(m) in _SVDO.values():
        for name in ("weight", "log_sigma2", "bias"):
            put(name, getattr(m, name))
        spec = {"type": kind, "bias": m.bias is not None, "threshold": m.threshold,
                "train_clip": m.train_clip}
        if isinstance(m, LinearSVDO):
            spec.update(in_features=m.in_features, out_features=m.out_features)
        else:
            spec.update(in_channels=m.in_channels, out_channels=m.out_channels,
                        kernel_size=list(m.kernel_size), stride=list(m.stride),
                        padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                        dilation=list(m.dilation), groups=m.groups)
        return spec
    if type(m) is nn.Linear:
        put("weight", m.weight)
        put("bias", m.bias)
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if type(m) in (nn.Conv2d, nn.Conv1d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"save: module {where} ({kind}) uses padding={m.padding!r}, "
                             f"padding_mode={m.padding_mode!r}; only zero padding given as ints is supported")
        put("weight", m.weight)
        put("bias", m.bias)
        return {"type": kind, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": list(m.padding), "dilation": list(m.dilation), "groups": m.groups,
                "bias": m.bias is not None}
    if kind in _BATCHNORMS and type(m) is _BATCHNORMS[kind]:
        if not m.track_running_stats or m.running_mean is None:
            raise ValueError(f"save: module {where} ({kind}) has no running statistics "
                             "(track_running_stats=False): its inference output depends on the batch")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            put(name, getattr(m, name))
        return {"type": kind, "num_features": m.num_features, "eps": m.eps,
                "momentum": m.momentum, "affine": m.affine}
    if kind in _SIMPLE and type(m) is _SIMPLE[kind][0]:
        return {"type": kind, "args": {a: _json_value(getattr(m, a)) for a in _SIMPLE[kind][1]}}
    raise ValueError(f"save: cannot store module {where} of type {kind}; supported types: "
                     f"{', '.join(SUPPORTED_MODULES)}")


def save(model: nn.Module, path: PathLike) -> Path:
    """Write a deployed (:func:`sparsevd.deploy`) or converted (:func:`sparsevd.convert`) model
    of any architecture to ``path`` (one .safetensors file; no pickle).

    Args:
        model: any module. A tree of the supported modules (:data:`SUPPORTED_MODULES`: an
            nn.Sequential of sparse, sparse-VD and plain layers, ...) loads back by itself
            (``load(path)``); any other model (a Hugging Face model, a user's nn.Module) loads
            into the architecture its constructor builds (``load(path, model=...)``).
        path: the file to write (parent directories are created; written atomically: a crash
            leaves the previous file whole). The same model gives the same bytes (sorted keys).

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: a module sparsevd made that this version cannot describe (named).
        FileWriteError (an OSError, errno ENOSPC for a full disk): the file cannot be written;
            the message names it, the previous file is unchanged, no temporary file is left.
        FileExistsError: ``path`` is a file of a training checkpoint (its model.safetensors, ...;
            :func:`sparsevd.checkpoint.checkpoint_owning`), which the deployed model would replace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    owner = checkpoint_owning(path)
    if owner is not None:
        raise FileExistsError(f"{path}: a file of the training checkpoint in {owner}; save the "
                              "deployed model elsewhere")
    tensors: Dict[str, Tensor] = {}
    spec = _file_config(model, tensors)
    config = json.dumps(spec, separators=(",", ":"), sort_keys=True)  # the same model, the same bytes
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config,
        "sha256": digest(tensors, FORMAT, str(FORMAT_VERSION), config),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def _file_config(model: nn.Module, tensors: Dict[str, Tensor]) -> dict:
    """The file's config (``tree`` or None, ``model``); ``tensors`` receives the model's tensors."""
    state, aliases = overlay.state_tensors(model)
    tensors.update(state)
    tree: Optional[dict] = None
    scratch: Dict[str, Tensor] = {}
    try:
        tree = _describe(model, "", scratch)
    except ValueError as e:
        reason = str(e).removeprefix("save: ")
    else:
        reason = ""
        if aliases or set(scratch) != set(state):  # (tied or extra tensors: not a plain tree)
            tree, reason = None, "its tensors are not those of a plain module tree"
    modules: Dict[str, dict] = {}
    first: Dict[int, str] = {}
    for name, m in overlay.recorded(model):
        if id(m) in first:  # the same module under another name
            modules[name] = {"same_as": first[id(m)]}
            continue
        first[id(m)] = name
        modules[name] = _module_spec(m, name)
    cls = type(model)
    return {"tree": tree, "model": {"class": f"{cls.__module__}.{cls.__qualname__}", "modules": modules,
                                    "aliases": aliases, "not_a_tree": reason}}


def _module_spec(m: nn.Module, name: str) -> dict:
    """The spec of one module sparsevd made (its children not included), with ``stands_for``
    (what it replaced) and its ``origin`` record."""
    if isinstance(m, SplitMultiheadAttention):
        spec = {"type": "SplitMultiheadAttention", "embed_dim": m.embed_dim, "num_heads": m.num_heads,
                "dropout": m.dropout, "bias": m.q_proj.bias is not None,
                "add_bias_kv": m.bias_k is not None, "add_zero_attn": m.add_zero_attn,
                "kdim": m.kdim, "vdim": m.vdim, "batch_first": m.batch_first}
    else:
        spec = _describe(m, name, {})
    spec["stands_for"] = overlay.describe_origin(m)
    if origin(m) is not None:
        spec["origin"] = origin(m)
    return spec


def _load_order(model: nn.Module, modules: dict) -> List[str]:
    """The names of the file's modules in the order they are put into ``model``: parents before
    children, then in the model's own module order (so an error names the first module that
    differs, as the model lists them); aliases (``same_as``) last, after what they name."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}

    def key(name):
        alias = isinstance(modules[name], dict) and "same_as" in modules[name]
        return alias, name.count("."), order.get(name, len(order)), name
    return sorted(modules, key=key)


def _load_into(model: nn.Module, part: dict, tensors: Dict[str, Tensor], path: Path) -> nn.Module:
    """Put the modules of the file's ``model`` part into ``model`` and load every tensor."""
    modules, aliases = part.get("modules"), part.get("aliases", {})
    if not isinstance(modules, dict) or not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v in tensors for k, v in aliases.items()):
        raise ValueError(f"{path}: corrupted config: 'model' needs 'modules' and 'aliases' objects")
    builder = _Builder(tensors, path)
    built: Dict[str, nn.Module] = {}
    deployed = False
    for name in _load_order(model, modules):
        spec = modules[name]
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: corrupted config: module {name!r} is not an object")
        if "same_as" in spec:
            if spec["same_as"] not in built:
                raise ValueError(f"{path}: corrupted config: {name!r} is the same as an unknown module")
            overlay.put(model, name, built[spec["same_as"]])
            continue
        old = overlay.check_into(model, name, spec.get("stands_for", {}), path)
        new = builder.build({k: v for k, v in spec.items() if k not in ("stands_for", "origin")}, name)
        if "origin" in spec:
            set_origin(new, spec["origin"])
        device = overlay.device_of(old)
        new = new.to(device) if device is not None else new
        deployed = deployed or isinstance(new, (SparseLinear, SparseConv2d))
        new.train(old.training and not deployed)
        overlay.put(model, name, new)
        built[name] = new
    overlay.load_rest(model, tensors, aliases, builder.used, path)
    if deployed:  # an inference model, as deploy returns it
        model.eval().requires_grad_(False)
    attach_hf_quantizer(model)
    return model


class _Builder:
    def __init__(self, tensors: Dict[str, Tensor], path: Path) -> None:
        self.tensors = tensors
        self.used: List[str] = []
        self.path = path

    def take(self, prefix: str, name: str, required: bool = True) -> Optional[Tensor]:
        key = _key(prefix, name)
        if key not in self.tensors:
            if required:
                raise ValueError(f"{self.path}: corrupted file: tensor {key!r} is missing")
            return None
        self.used.append(key)
        return self.tensors[key]

    def build(self, spec: dict, prefix: str, depth: int = 0) -> nn.Module:
        where = prefix or "<root>"
        if depth > MAX_DEPTH:
            raise ValueError(f"{self.path}: corrupted config: modules nested deeper than {MAX_DEPTH}")
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise ValueError(f"{self.path}: corrupted config: module {where} is not an object with a "
                             f"'type' (got {type(spec).__name__})")
        kind = spec["type"]
        if kind == "Sequential":
            seq = nn.Sequential()
            for item in spec["children"]:
                name, child = item
                if not isinstance(name, str) or name in seq._modules:
                    raise ValueError(f"{self.path}: corrupted config: child name {name!r} of {where} "
                                     "is repeated or not a string")
                seq.add_module(name, self.build(child, _key(prefix, name), depth + 1))
            return seq
        if kind in ("SparseLinear", "SparseConv2d", "SparseConv1d"):
            weight = self.take(prefix, "weight", required=False)  # dense storage (version 3)
            csr = [self.take(prefix, name, required=weight is None)
                   for name in ("crow_indices", "col_indices", "values")]
            bias = self.take(prefix, "bias") if spec["bias"] else None
            plan = [(b, m) for b, m in spec["plan"]]
            common = dict(weight=weight, dense_shape=tuple(spec["dense_shape"]),
                          num_weights=spec["num_weights"], plan=plan)
            if kind == "SparseLinear":
                m = SparseLinear(spec["in_features"], spec["out_features"], *csr, bias, **common)
            else:
                conv = SparseConv1d if kind == "SparseConv1d" else SparseConv2d
                m = conv(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                         tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]),
                         spec["groups"], *csr, bias, **common)
            m.plan_threads = spec.get("threads")
            return m
        if kind in _SVDO:
            w = self.take(prefix, "weight")
            names = ["weight", "log_sigma2"] + (["bias"] if spec["bias"] else [])
            state = {n: w if n == "weight" else self.take(prefix, n) for n in names}
            common = dict(bias=spec["bias"], threshold=spec["threshold"], train_clip=spec["train_clip"],
                          device="meta", dtype=w.dtype)
            if kind == "LinearSVDO":
                m = LinearSVDO(spec["in_features"], spec["out_features"], **common)
            else:
                padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
                m = _SVDO[kind](spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                                tuple(spec["stride"]), padding, tuple(spec["dilation"]), spec["groups"],
                                **common)
            m.load_state_dict(state, strict=True, assign=True)
            return m
        if kind == "SplitMultiheadAttention":
            args = {k: spec[k] for k in ("embed_dim", "num_heads", "dropout", "bias", "add_bias_kv",
                                         "add_zero_attn", "kdim", "vdim", "batch_first")}
            return SplitMultiheadAttention(**args)
        if kind in ("Linear", "Conv2d", "Conv1d"):
            w = self.take(prefix, "weight")
            b = self.take(prefix, "bias") if spec["bias"] else None
            if kind == "Linear":
                m = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                              device="meta", dtype=w.dtype)
            else:
                m = getattr(nn, kind)(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                              tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]),
                              spec["groups"], bias=spec["bias"], device="meta", dtype=w.dtype)
            state = {"weight": w} if b is None else {"weight": w, "bias": b}
            m.load_state_dict(state, strict=True, assign=True)
            return m
        if kind in _BATCHNORMS:
            m = _BATCHNORMS[kind](spec["num_features"], eps=spec["eps"], momentum=spec["momentum"],
                                  affine=spec["affine"], device="meta")
            names = ["running_mean", "running_var", "num_batches_tracked"]
            names += ["weight", "bias"] if spec["affine"] else []
            m.load_state_dict({n: self.take(prefix, n) for n in names}, strict=True, assign=True)
            return m
        if kind in _SIMPLE:
            cls, names = _SIMPLE[kind]
            args = {k: _tuples(v) for k, v in spec.get("args", {}).items()}
            unknown = set(args) - set(names)
            if unknown:
                raise ValueError(f"{self.path}: corrupted config: unknown arguments {sorted(unknown)} "
                                 f"of {kind}")
            return cls(**args)
        raise ValueError(f"{self.path}: corrupted or newer config: unknown module type {kind!r}")


def load(path: PathLike, device: Union[str, torch.device] = "cpu", *,
         model: Optional[nn.Module] = None) -> nn.Module:
    """Read a model written by :func:`save`.

    Args:
        path: the .safetensors file.
        device: where to put the tensors (without ``model``).
        model: the architecture to load into, built by the user's own constructor (e.g.
            ``BertForSequenceClassification(config)``, ``MyNet()``), dense, converted or deployed:
            the modules sparsevd made are put at their names (each checked to replace a module of
            the same type and weight shape) and every tensor is loaded (names, shapes and dtypes
            checked one to one). Tensors go to the devices of the modules they land in. Needed
            for models that are not a tree of supported modules.

    Returns:
        The model (``model`` itself, changed in place, when given); a model with deployed
        layers is in eval mode without gradients, as :func:`sparsevd.deploy` returns it; outputs
        identical to the saved model's (same device, dtype and thread count).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file that is not a safetensors file (a pickle, say: never unpickled), is
            corrupted (checksum of tensors and config, truncation, invalid indices, a config
            nested deeper than :data:`MAX_DEPTH`, a repeated child name), comes from elsewhere (a
            training checkpoint, another library: no sparsevd metadata), or has a newer format
            version; a file of a model that is not a tree without ``model``; a ``model`` that is
            not the saved architecture (a module missing or of another type or shape, tensors
            that differ). The message names the file and says which.
    """
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a sparsevd deployed model (safetensors metadata format="
            f"{meta.get('format')!r}, expected {FORMAT!r}); a training checkpoint loads with "
            "sparsevd.checkpoint.load_checkpoint and becomes a deployed model with sparsevd.deploy"
        )
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise ValueError(f"{path}: corrupted metadata: format_version={meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version} is newer than this sparsevd reads "
                         f"({FORMAT_VERSION}); upgrade sparsevd")
    config = meta.get("config")
    if not isinstance(config, str):
        raise ValueError(f"{path}: corrupted metadata: no config")
    if version >= 2:
        expected = digest(tensors, FORMAT, str(version), config)
        what = "the tensors or the config changed after the file was written"
    else:
        expected = digest(tensors)
        what = "the tensor data changed after the file was written"
        warnings.warn(f"{path}: written by an older sparsevd (format version {version}): its "
                      "checksum does not cover the config; save it again to protect it",
                      RuntimeWarning, stacklevel=2)
    if meta.get("sha256") != expected:
        raise ValueError(f"{path}: corrupted file: the checksum (sha256) does not match ({what})")
    try:
        spec = json.loads(config)
    except RecursionError:
        raise ValueError(f"{path}: corrupted config: modules nested deeper than {MAX_DEPTH}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupted config ({type(e).__name__}: {e})") from e
    part = None
    if version >= 3:
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise ValueError(f"{path}: corrupted config: expected an object with 'tree' and 'model'")
        spec, part = spec.get("tree"), spec["model"]
    if model is not None:
        if part is None:
            raise ValueError(f"{path}: written by an older sparsevd (format version {version}) that "
                             "did not record its modules by name; load it with sparsevd.load(path)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        try:
            return _load_into(model, part, tensors, path)
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: corrupted file: {e}") from e
        except (KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise ValueError(f"{path}: corrupted config ({type(e).__name__}: {e})") from e
    if spec is None:
        raise ValueError(f"{path}: the saved model, a {part.get('class')}, is not a tree of the modules "
                         f"sparsevd rebuilds by itself ({part.get('not_a_tree')}); build its "
                         "architecture and load into it: sparsevd.load(path, model=...)")
    try:
        builder = _Builder(tensors, path)
        model = builder.build(spec, "")
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: corrupted file: {e}") from e
    except (KeyError, TypeError, RuntimeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: corrupted config ({type(e).__name__}: {e})") from e
    extra = set(tensors) - set(builder.used)
    if extra:
        raise ValueError(f"{path}: corrupted file: tensors {sorted(extra)[:5]} are not used by the config")
    return model.to(device).eval()

