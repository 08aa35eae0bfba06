"""The sparse part of any model: which submodules sparsevd made (deployed and sparse-VD layers,
split attentions, folded or sliced batch norms), and how they are put into a model that the
user's own constructor (or a Hugging Face config) built again.

A model of any classes — a Hugging Face model, a user's nn.Module — cannot be rebuilt from a
file without its code, and pickle is not an option. So :func:`sparsevd.save` stores, beside the
model's tensors, the specs of the modules sparsevd made, by module name; :func:`sparsevd.load`
with ``model=`` takes the architecture the user built (dense, converted or deployed), checks
that each of those names holds a module that the saved one replaced (same type and weight
shape), replaces them, and loads every tensor. The rest of the model is the user's code,
unchanged (its tensors come from the file).

Checks (each failure a ValueError naming the file): every name holds a compatible module, the
model's tensors and the file's match one to one (names, shapes, dtypes), nothing is left over.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .nn import SVDO_LAYERS, SparseConv1d, SparseConv2d, SparseLinear, SplitMultiheadAttention
from .surgery import linear_equivalent, origin

__all__ = ["check_into", "describe_origin", "device_of", "load_rest", "made_by_sparsevd", "put", "recorded",
           "state_tensors"]

_SPARSE = (SparseLinear, SparseConv2d, SparseConv1d)
_TWIN = {"SparseLinear": "Linear", "SparseConv2d": "Conv2d", "SparseConv1d": "Conv1d",
         "LinearSVDO": "Linear", "Conv2dSVDO": "Conv2d", "Conv1dSVDO": "Conv1d"}


def made_by_sparsevd(m: nn.Module) -> bool:
    """A module sparsevd made (and :func:`sparsevd.save` records by name)."""
    return isinstance(m, _SPARSE + SVDO_LAYERS + (SplitMultiheadAttention,)) or origin(m) is not None


def describe_origin(m: nn.Module) -> dict:
    """(type, dense_shape) of the module that ``m`` stands for: its origin record when it has
    one (completed), else what its type says (a LinearSVDO stands for an nn.Linear of its weight's
    shape, a SparseConv2d for an nn.Conv2d of its ``dense_shape``, ...). For modules sparsevd did
    not make, the module itself (nn.Linear: ("Linear", [out, in]); transformers Conv1D:
    ("Conv1D", [in, out]); nn.MultiheadAttention: ("MultiheadAttention", [embed_dim, kdim, vdim]))."""
    rec = dict(origin(m) or {})
    kind = type(m).__name__
    if "type" not in rec:
        if kind in _TWIN:
            rec["type"] = _TWIN[kind]
        elif linear_equivalent(m):  # e.g. transformers' FalconLinear: an nn.Linear
            rec["type"] = "Linear"
        elif isinstance(m, (nn.MultiheadAttention, SplitMultiheadAttention)):
            rec["type"] = "MultiheadAttention"
        else:
            rec["type"] = kind
    if "dense_shape" not in rec:
        shape = None
        if isinstance(m, _SPARSE):
            shape = list(m.dense_shape)
        elif isinstance(m, (nn.MultiheadAttention, SplitMultiheadAttention)):
            shape = [m.embed_dim, m.kdim, m.vdim]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            shape = [m.num_features]
        elif isinstance(getattr(m, "weight", None), Tensor):
            shape = list(m.weight.shape)
        if shape is not None and rec["type"] == "Conv1D" and isinstance(m, _SPARSE + SVDO_LAYERS):
            shape = shape[::-1]  # stored (out, in); Conv1D holds (in, out)
        if shape is not None:
            rec["dense_shape"] = shape
    return rec


def state_tensors(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(tensors, aliases): the model's state_dict on the CPU, contiguous, one entry per storage
    (a tied weight, e.g. GPT-2's lm_head.weight = transformer.wte.weight, is stored once:
    ``aliases`` maps the other names to it); tensors sharing part of a storage are copied."""
    tensors: Dict[str, Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    storages = set()
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
               t.device) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        shared = key is not None and key[0] in storages
        t = t.to("cpu")
        tensors[name] = t.clone().contiguous() if shared or not t.is_contiguous() else t
        if key is not None:
            seen[key] = name
            storages.add(key[0])
    return tensors, aliases


def _fail(path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def check_into(model: nn.Module, name: str, saved: dict, path) -> nn.Module:
    """The module at ``name`` of ``model``, after checking that it stands for the same module as
    the saved one (``saved``: its :func:`describe_origin`).

    Raises:
        ValueError: no module there, or another type or weight shape (the message names both).
    """
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise _fail(path, f"the model has no submodule {name!r}, which the file's model has; build "
                          "the same architecture (same config / constructor arguments)") from None
    have = describe_origin(old)
    if have.get("type") != saved.get("type") or (
            "dense_shape" in have and "dense_shape" in saved and have["dense_shape"] != saved["dense_shape"]):
        raise _fail(path, f"module {name!r} of the model is a {type(old).__name__} standing for "
                          f"{have.get('type')} {have.get('dense_shape')}, the file's stands for "
                          f"{saved.get('type')} {saved.get('dense_shape')}: build the same architecture")
    return old


def put(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule ``name`` of ``model`` (every name it is reachable under is the caller's
    business: the saved file lists each)."""
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = new


def load_rest(model: nn.Module, tensors: Dict[str, Tensor], aliases: Dict[str, str],
              done: List[str], path) -> None:
    """Copy the file's tensors into ``model`` (the modules rebuilt from the file hold theirs:
    ``done``), after checking names, shapes and dtypes one to one.

    Raises:
        ValueError: tensors missing on either side, or of another shape or dtype (named).
    """
    state = model.state_dict(keep_vars=True)
    names = set(tensors) | set(aliases)
    missing = sorted(set(state) - names)
    extra = sorted(names - set(state))
    if missing or extra:
        raise _fail(path, "the model's tensors and the file's differ: "
                          + (f"the file lacks {missing[:5]}" if missing else "")
                          + ("; " if missing and extra else "")
                          + (f"the model lacks {extra[:5]}" if extra else "")
                          + " (build the same architecture, with the same config)")
    skip = set(done)
    todo = {}
    for key, target in state.items():
        if key in skip:
            continue
        src = tensors[aliases.get(key, key)]
        if tuple(src.shape) != tuple(target.shape):
            raise _fail(path, f"tensor {key!r} has shape {tuple(src.shape)} in the file, "
                              f"{tuple(target.shape)} in the model")
        if src.dtype != target.dtype:
            raise _fail(path, f"tensor {key!r} is {src.dtype} in the file, {target.dtype} in the model: "
                              f"build the model in the file's dtype (e.g. model.to({src.dtype}))")
        todo[key] = src
    with torch.no_grad():
        model.load_state_dict(todo, strict=False)


def recorded(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every module sparsevd made, under each of its names, parents first."""
    out = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and made_by_sparsevd(m)]
    return sorted(out, key=lambda item: item[0].count("."))


def device_of(m: nn.Module) -> Optional[torch.device]:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return None
