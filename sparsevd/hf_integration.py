"""What a Hugging Face model's own ``save_pretrained`` / ``from_pretrained`` do with a model that
sparsevd converted, deployed or loaded: a quantizer entry of transformers, ``"sparsevd"``.

transformers lets a quantizer attached to a model (``model.hf_quantizer``) give the state dict
``save_pretrained`` writes, and records its config in ``config.json``
(``quantization_config``); ``from_pretrained`` hands the config back to the quantizer registered
under its ``quant_method``. sparsevd attaches one to every ``PreTrainedModel`` (the model, or one
inside it: a SentenceTransformer's) holding a module sparsevd made, after :func:`sparsevd.convert`,
:func:`sparsevd.deploy` and :func:`sparsevd.load`. Then ``model.save_pretrained(dir)`` writes

- ``model.safetensors``: the **dense-equivalent** state dict: every sparse module as the module it
  replaced, holding what it computes (:func:`sparsevd.surgery.dense_state`: deployed layers
  zero-filled and uncompacted, transformers Conv1D weights (in, out) again, a folded batch norm as
  an identity one, sparse-VD layers with their eval-mode weight θ ⊙ [log α < threshold]); plus,
  for sparse-VD layers, ``log_sigma2`` and ``sparsevd_pruned_weight`` (θ of the dropped weights)
  so that training can go on;
- ``config.json`` with ``quantization_config = {"quant_method": "sparsevd", "modules": {...}}``:
  each sparse module's kind, origin record, plan, index dtype, threshold.

So the directory loads everywhere: ``from_pretrained`` of a transformers without sparsevd logs
"Unknown quantization type, got sparsevd" and gives the dense model with the pruned weights (the
same outputs, up to rounding; the two sparse-VD extras are reported as unexpected keys); with
sparsevd registered (``import sparsevd.hf``, or any sparsevd call that built such a model in the
process) it rebuilds the sparse model exactly: the same CSR tensors, plans, log σ² and θ. The
rebuild checks that the dense weights are still zero wherever the sparse model had nothing
(weights edited in between are refused, naming the module, instead of silently dropped).

Refused with a ValueError (naming the module): a layer whose deployed bias its original did not
have (dead neurons folded into a layer without bias), sparse-VD projections inside a split
attention, a model without any floating-point parameter left (every layer deployed, e.g. a
ResNet whose batch norms were all folded: transformers reads the dtype from a parameter);
:func:`sparsevd.hf.save_pretrained` stores those.
"""
from __future__ import annotations

import functools
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import overlay
from .nn import (SVDO_LAYERS, Conv1dSVDO, Conv2dSVDO, LinearSVDO, SparseConv1d, SparseConv2d, SparseLinear,
                 SplitMultiheadAttention)
from .nn.svdo import PRUNED_KEY
from .surgery import FOLDED_BIAS, dense_state, identity_bn_state, mask_from_runs, origin, set_origin

__all__ = ["QUANT_METHOD", "attach", "dense_state_dict", "pretrained_models", "rebuild", "records",
           "register"]

QUANT_METHOD = "sparsevd"
#: Version of the ``modules`` records in ``quantization_config``.
RECORD_VERSION = 1
_SPARSE = (SparseLinear, SparseConv2d)


def pretrained_models(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every transformers PreTrainedModel in ``model`` (itself included);
    empty when transformers' models were never imported."""
    mu = sys.modules.get("transformers.modeling_utils")
    if mu is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, mu.PreTrainedModel)]


def attach(model: nn.Module) -> None:
    """Attach the sparsevd quantizer to every PreTrainedModel in ``model`` that holds a module
    sparsevd made (see the module docstring); nothing without transformers."""
    for _, pm in pretrained_models(model):
        if any(overlay.made_by_sparsevd(m) for m in pm.modules()):
            config_cls, quantizer_cls = register()
            pm.hf_quantizer = quantizer_cls(config_cls(), pre_quantized=True)


# ----------------------------------------------------------------------------------- saving
def records(model: nn.Module) -> Dict[str, dict]:
    """name → record (JSON-able) of every module sparsevd made in ``model``: what
    :func:`rebuild` needs besides the dense-equivalent weights (see the module docstring).

    Raises:
        ValueError: a module without a dense equivalent (named).
    """
    out: Dict[str, dict] = {}
    first: Dict[int, str] = {}
    for name, m in overlay.recorded(model):
        if id(m) in first:
            out[name] = {"same_as": first[id(m)]}
            continue
        first[id(m)] = name
        rec = {"origin": overlay.describe_origin(m)}
        if isinstance(m, _SPARSE):
            rec.update(kind="deployed", layer=type(m).__name__, dense_shape=list(m.dense_shape),
                       num_weights=m.num_weights, plan=[[b, mode] for b, mode in m.plan],
                       index_dtype=None if m.col_indices is None  # dense storage (its plan)
                       else str(m.col_indices.dtype).replace("torch.", ""))
            if isinstance(m, SparseConv2d):
                rec.update(stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation),
                           groups=m.groups)
        elif isinstance(m, SVDO_LAYERS):
            rec.update(kind="sparse_vd", threshold=m.threshold, train_clip=m.train_clip)
        elif isinstance(m, SplitMultiheadAttention):
            if any(isinstance(c, SVDO_LAYERS) for c in m.children()):
                raise ValueError(f"{name}: a split attention with sparse-VD projections has no "
                                 "nn.MultiheadAttention state; save it with sparsevd.hf.save_pretrained")
            rec.update(kind="split_attention")
        elif isinstance(m, nn.Identity):
            rec.update(kind="folded_batch_norm")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            rec.update(kind="batch_norm")
        else:
            raise ValueError(f"{name}: no dense equivalent of a {type(m).__name__}")
        out[name] = rec
    return out


def _packed_attention(m: SplitMultiheadAttention, name: str) -> Dict[str, Tensor]:
    """The nn.MultiheadAttention state of a split attention (projections dense-equivalent)."""
    def dense(child, cname):
        if overlay.made_by_sparsevd(child):
            return dense_state(child, f"{name}.{cname}")
        return {k: v.detach() for k, v in child.state_dict().items()}

    q, k, v, o = (dense(getattr(m, c), c) for c in ("q_proj", "k_proj", "v_proj", "out_proj"))
    state = {}
    if m._qkv_same_embed_dim:
        state["in_proj_weight"] = torch.cat([q["weight"], k["weight"], v["weight"]])
    else:
        state.update(q_proj_weight=q["weight"], k_proj_weight=k["weight"], v_proj_weight=v["weight"])
    if "bias" in q:
        state["in_proj_bias"] = torch.cat([q["bias"], k["bias"], v["bias"]])
    state.update({f"out_proj.{key}": t for key, t in o.items()})
    if m.bias_k is not None:
        state.update(bias_k=m.bias_k.detach(), bias_v=m.bias_v.detach())
    return state


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The dense-equivalent state dict of ``model`` (see the module docstring).

    Raises:
        ValueError: a module without a dense equivalent (named).
    """
    recorded = [(n, m) for n, m in overlay.recorded(model)]
    names = [n for n, _ in recorded]

    def under(key: str) -> bool:
        return any(key.startswith(n + ".") for n in names)

    state = {k: v for k, v in model.state_dict().items() if not under(k)}
    folded_bias: Dict[str, Tensor] = {}
    done = set()
    for name, m in recorded:
        if any(name.startswith(n + ".") for n in done):  # inside a split attention: packed there
            continue
        if isinstance(m, SplitMultiheadAttention):
            part = _packed_attention(m, name)
            done.add(name)
        else:
            part = dense_state(m, name)
            if FOLDED_BIAS in part:
                folded_bias[origin(m)["folded_bn"]] = part.pop(FOLDED_BIAS)
            if isinstance(m, SVDO_LAYERS):
                theta, log_sigma2 = m.weight.detach(), m.log_sigma2.detach()
                pruned = theta * ~m.mask()
                if overlay.describe_origin(m)["type"] == "Conv1D":
                    pruned, log_sigma2 = pruned.t(), log_sigma2.t()
                part.update({"log_sigma2": log_sigma2.contiguous(), PRUNED_KEY: pruned.contiguous()})
        state.update({f"{name}.{k}": v for k, v in part.items()})
    for bn_name, bias in folded_bias.items():
        state[f"{bn_name}.bias"] = bias.to(state[f"{bn_name}.bias"].dtype)
    return state


# --------------------------------------------------------------------------------- loading
def _fail(name: str, msg: str) -> ValueError:
    return ValueError(f"sparsevd: module {name!r} of this checkpoint: {msg}; the weights changed "
                      "after sparsevd saved them (remove quantization_config from config.json to "
                      "load the dense model as it is)")


def _compact(w: Tensor, rec: dict, name: str) -> Tensor:
    """The deployed layer's weight inside the dense-equivalent ``w`` (out, ...) at the kept rows
    and input channels; everything outside must be zero."""
    out = w.shape[0]
    rows = mask_from_runs(rec["rows"], out).to(w.device) if "rows" in rec else None
    flat = w.reshape(out, -1)
    if "cols" in rec:
        block = int(rec["col_block"])
        cols = mask_from_runs(rec["cols"], flat.shape[1] // block).to(w.device)
        grouped = flat.view(out, -1, block)
        if bool((grouped[:, ~cols] != 0).any()):
            raise _fail(name, "nonzero weights in input channels the deployed layer had removed")
        flat = grouped[:, cols].reshape(out, -1)
    if rows is not None:
        if bool((flat[~rows] != 0).any()):
            raise _fail(name, "nonzero weights in output rows the deployed layer had removed")
        flat = flat[rows]
    return flat.reshape(flat.shape[0], *w.shape[1:]).contiguous() if w.dim() > 2 else flat.contiguous()


#: The column-index dtypes a record may name (None: a dense-stored layer, no CSR).
_INDEX_DTYPES = {None: None, "uint16": torch.uint16, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64}


def _rebuild_deployed(model: nn.Module, name: str, rec: dict) -> nn.Module:
    dense = model.get_submodule(name)
    orig = rec["origin"]
    w = dense.weight.detach()
    if orig["type"] == "Conv1D":
        w = w.t()
    b = dense.bias.detach() if getattr(dense, "bias", None) is not None else None
    if "folded_bn" in orig and not orig.get("bias", True):
        b = model.get_submodule(orig["folded_bn"]).bias.detach()  # the shift kept by the batch norm
    w = _compact(w, orig, name)
    if b is not None and "rows" in orig:
        keep = mask_from_runs(orig["rows"], b.numel()).to(b.device)
        if bool((b[~keep] != 0).any()):
            raise _fail(name, "nonzero biases of output rows the deployed layer had removed")
        b = b[keep]
    index_dtype = rec.get("index_dtype")
    if index_dtype not in _INDEX_DTYPES:
        raise ValueError(f"sparsevd: module {name!r} of this checkpoint: index_dtype {index_dtype!r} "
                         f"in quantization_config is none of {sorted(k for k in _INDEX_DTYPES if k)}")
    kwargs = dict(dense_shape=tuple(rec["dense_shape"]), num_weights=rec["num_weights"],
                  plan=[tuple(p) for p in rec["plan"]], index_dtype=_INDEX_DTYPES[index_dtype])
    if rec["layer"] == "SparseLinear":
        new = SparseLinear.from_dense(w.reshape(w.shape[0], -1), b, **kwargs)
    elif rec["layer"] == "SparseConv1d":
        # the last of each: earlier files recorded SparseConv1d's 2-D pairs, (1, s) etc.
        new = SparseConv1d.from_dense(w.reshape(w.shape[0], w.shape[1], -1), b, rec["stride"][-1],
                                      rec["padding"][-1], rec["dilation"][-1], rec["groups"], **kwargs)
    else:
        new = SparseConv2d.from_dense(w, b, tuple(rec["stride"]), tuple(rec["padding"]),
                                      tuple(rec["dilation"]), rec["groups"], **kwargs)
    return set_origin(new.eval(), orig)


def _rebuild_sparse_vd(model: nn.Module, name: str, rec: dict) -> nn.Module:
    dense = model.get_submodule(name)
    orig = rec["origin"]
    weight, pruned, log_sigma2 = dense.weight.detach(), dense._buffers.pop(PRUNED_KEY), dense._buffers.pop("log_sigma2")
    theta = weight + pruned  # one of the two is ±0 at every position
    if orig["type"] == "Conv1D":
        theta, log_sigma2 = theta.t(), log_sigma2.t()
    common = dict(threshold=rec["threshold"], train_clip=rec["train_clip"], device=theta.device,
                  dtype=theta.dtype, bias=getattr(dense, "bias", None) is not None)
    if orig["type"] in ("Linear", "Conv1D"):
        new = LinearSVDO(theta.shape[1], theta.shape[0], **common)
    else:
        twin = Conv2dSVDO if orig["type"] == "Conv2d" else Conv1dSVDO
        new = twin(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding,
                   dense.dilation, dense.groups, **common)
    with torch.no_grad():
        new.weight.copy_(theta)
        new.log_sigma2.copy_(log_sigma2)
        if new.bias is not None:
            new.bias.copy_(dense.bias)
    if orig["type"] == "Conv1D":
        set_origin(new, {"type": "Conv1D"})
    return new.train(dense.training)


def _rebuild_batch_norm(model: nn.Module, name: str, rec: dict) -> nn.Module:
    bn = model.get_submodule(name)
    orig = rec["origin"]
    if rec["kind"] == "folded_batch_norm":
        want = identity_bn_state(orig)
        got = bn.state_dict()
        for key in ("weight", "running_mean", "running_var"):
            if not torch.equal(got[key].cpu(), want[key].to(got[key].dtype)):
                raise _fail(name, f"the batch norm folded into {orig['folded_into']!r} is not the identity")
        return set_origin(nn.Identity(), orig)
    keep = mask_from_runs(orig["rows"], bn.num_features).to(bn.running_mean.device)
    new = type(bn)(int(keep.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        for key in ("running_mean", "running_var") + (("weight", "bias") if bn.affine else ()):
            getattr(new, key).copy_(getattr(bn, key)[keep])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return set_origin(new.eval(), orig)


@torch.no_grad()
def rebuild(model: nn.Module, recs: Dict[str, dict]) -> None:
    """Turn the dense modules of ``model`` (which hold a :func:`dense_state_dict`) back into the
    modules sparsevd made, as :func:`records` describes them (in place).

    Raises:
        ValueError: dense weights that are not zero where the sparse module had nothing, a folded
            batch norm that is not the identity, an unknown kind of record (named).
    """
    built: Dict[str, nn.Module] = {}
    order = sorted(recs, key=lambda n: (recs[n].get("kind") in ("batch_norm", "folded_batch_norm"),
                                        n.count(".")))
    for name in order:
        rec = recs[name]
        if "same_as" in rec:
            continue
        kind = rec.get("kind")
        if kind == "deployed":
            new = _rebuild_deployed(model, name, rec)
        elif kind == "sparse_vd":
            new = _rebuild_sparse_vd(model, name, rec)
        elif kind == "split_attention":
            new = set_origin(SplitMultiheadAttention.from_module(model.get_submodule(name)),
                             {"type": "MultiheadAttention"})
        elif kind in ("batch_norm", "folded_batch_norm"):
            new = _rebuild_batch_norm(model, name, rec)
        else:
            raise ValueError(f"sparsevd: module {name!r}: unknown kind {kind!r} in quantization_config "
                             "(written by a newer sparsevd?)")
        overlay.put(model, name, new)
        built[name] = new
    for name, rec in recs.items():
        if "same_as" in rec:
            overlay.put(model, name, built[rec["same_as"]])
    if any(isinstance(m, _SPARSE) for m in built.values()):
        model.eval().requires_grad_(False)


def _check_modules(model: nn.Module, recs: Dict[str, dict]) -> None:
    """Every module a record names stands, in the model transformers built from the config, for
    the module the record's sparsevd module replaced (type and weight shape), so no sparse module
    is rebuilt from weights that were not saved for it.

    Raises:
        ValueError: a module missing, or of another type or shape (e.g. a weight norm removed
            from the saved model but not from the one the config builds), naming both.
    """
    for name, rec in recs.items():
        if "origin" in rec:
            overlay.check_into(model, name, rec["origin"], f"sparsevd: module {name!r} of this checkpoint")


def _prepare(model: nn.Module, recs: Dict[str, dict]) -> None:
    """Before the weights load: the modules are the records' (:func:`_check_modules`); the dense
    modules of sparse-VD layers get buffers for their log σ² and pruned θ (loaded by name with
    the rest)."""
    _check_modules(model, recs)
    for name, rec in recs.items():
        if rec.get("kind") != "sparse_vd":
            continue
        dense = model.get_submodule(name)
        w = dense.weight
        dense.register_buffer("log_sigma2", torch.empty(w.shape, dtype=w.dtype, device=w.device))
        dense.register_buffer(PRUNED_KEY, torch.empty(w.shape, dtype=w.dtype, device=w.device))


# ---------------------------------------------------------------------- transformers classes
def _new_config(modules: dict, format_version: int):
    """A SparseVDConfig (its class is made by :func:`register`): how a pickle rebuilds one."""
    return register()[0](modules, format_version)


def _new_quantizer(config, pre_quantized: bool):
    """A SparseVDQuantizer of ``config``: how a pickle of a model (``torch.save``) rebuilds one."""
    return register()[1](config, pre_quantized=pre_quantized)


@functools.lru_cache(maxsize=None)
def register():
    """Define and register the ``"sparsevd"`` quantization config and quantizer with
    transformers (once); returns (config class, quantizer class)."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class SparseVDConfig(QuantizationConfigMixin):
        """``quantization_config`` of a sparsevd model: the records of its sparse modules."""

        def __init__(self, modules: Optional[dict] = None, format_version: int = RECORD_VERSION,
                     **kwargs) -> None:
            self.quant_method = QUANT_METHOD
            self.modules = dict(modules or {})
            self.format_version = format_version

        def to_dict(self) -> dict:
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                    "modules": self.modules}

        def to_diff_dict(self) -> dict:
            return self.to_dict()

        def __reduce__(self):  # the class is made here: pickles (torch.save(model)) rebuild it
            return _new_config, (self.modules, self.format_version)

    class SparseVDQuantizer(HfQuantizer):
        """Writes the dense-equivalent state (``save_pretrained``) and rebuilds the sparse modules
        after ``from_pretrained`` loaded it (see sparsevd/hf_integration.py)."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs) -> None:
            super().__init__(quantization_config, **kwargs)
            version = getattr(quantization_config, "format_version", RECORD_VERSION)
            if version > RECORD_VERSION:
                raise ValueError(f"sparsevd: quantization_config format_version {version} is newer than "
                                 f"this sparsevd reads ({RECORD_VERSION}); upgrade sparsevd")

        def validate_environment(self, *args, **kwargs) -> None:
            return None

        def __reduce__(self):
            return _new_quantizer, (self.quantization_config, self.pre_quantized)

        def _process_model_before_weight_loading(self, model, **kwargs):
            _prepare(model, self.quantization_config.modules)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            rebuild(model, self.quantization_config.modules)
            model.is_quantized = False  # plain dtype casts (.half(), .float()) stay allowed
            return model

        def get_state_dict_and_metadata(self, model):
            if not any(p.is_floating_point() for p in model.parameters()):
                raise ValueError(
                    "sparsevd: every floating-point tensor of this model is a buffer of a deployed "
                    "layer, and transformers' save_pretrained reads the model's dtype from a "
                    "parameter; save it with sparsevd.hf.save_pretrained(model, directory)")
            model.config.quantization_config = SparseVDConfig(records(model))
            return dense_state_dict(model), {}

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparseVDConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparseVDQuantizer)
    return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD], AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
