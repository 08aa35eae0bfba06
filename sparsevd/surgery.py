"""The model surgery of :func:`sparsevd.deploy`: every sparse-VD layer becomes a deployed sparse layer;
batch norms are folded into the convolutions before them; neurons that no later layer reads, or
whose output is a constant, are removed between layers (docs/design.md, "Deployment").

**Where.** Pairs of layers are found in two ways:

- ``nn.Sequential`` children in order: layer, channel-wise modules, layer;
- inside any other module whose ``forward`` (and, where it has one, ``feed_forward_chunk``, the
  MLP half of Hugging Face BERT-family layers) :mod:`torch.fx` can trace with its submodules as
  leaves: a layer's output that flows, through elementwise operations only and used by nothing
  else, into the input of the next layer. Submodules are looked into through summaries (their
  own traces): ``BertIntermediate`` produces ``dense``'s neurons through its activation,
  ``BertOutput`` consumes its first argument with ``dense``, so ``BertLayer.feed_forward_chunk``
  links ``intermediate.dense`` to ``output.dense``; ``GPT2MLP`` links ``c_fc`` to ``c_proj``; a
  user's ``fc2(act(fc1(x)))`` links ``fc1`` to ``fc2``. A trace runs the Python code of
  ``forward`` once with symbolic tensors (arguments with a default take it, ``*args`` /
  ``**kwargs`` are empty; a wrapper such as transformers' gradient-checkpointing one runs as it
  is, through a plain-signature trampoline): a module whose code branches on its tensor inputs
  fails to trace and is left as it is, except on the dtype of a value whose dtype the trace
  knows (a layer's output and elementwise ops of it: the dtype of the layer's parameters), so
  ``if h.dtype == torch.float16 and ...`` (BART-family layers) traces for the dtype deploy sees;
  a module that uses a layer's output elsewhere only in a branch its defaults (or another dtype)
  do not take (a flag returning hidden states, say) is outside what a trace sees —
  ``deploy(..., trace=False)`` keeps to Sequential chains. Parameter-free modules (dropout, an
  activation) may be called more than once (RoBERTa's classification head).
- **Gated pairs** in a trace: ``down(after(f(gate(x)) * g(up(x))))`` (Llama / Qwen2 / Mistral
  MLPs, T5's gated ``DenseReluDense``), ``f``, ``g``, ``after`` elementwise, each layer's output
  used by nothing else: three linear layers of one width, whose unit i is removed from ``gate``,
  ``up`` and ``down`` together when ``down`` never reads it or the product is a constant
  (:func:`_compact_group`).

**Batch norm folding.** A Conv2dSVDO (Conv1dSVDO) whose only user is a BatchNorm2d (BatchNorm1d)
with running statistics: W' = W ⊙ m · s, b' = (b − μ) · s + β per output channel,
s = γ / sqrt(σ²_running + ε) (computed in float64, rounded once to the layer's dtype); the batch
norm becomes ``nn.Identity``. Exact up to that rounding.

**Dead neurons.** As documented in :mod:`sparsevd.deploy` (between the layers of a chain: columns
nobody reads are dropped; a neuron whose row is all zero outputs the constant act(b), folded into
the next layer's bias). In a gated pair, a unit whose gate or up row is all zero with f(b) = 0
(no bias, or act(b) = 0: SiLU / ReLU / GELU of 0) has the product 0; both rows all zero, the
constant f(b)·g(b'), whose after(·) times the consumer's column is folded into its bias.

**Origins.** Every module this surgery creates, and every layer :func:`sparsevd.convert` creates
from a module other than the plain torch one, carries ``sparsevd_origin``: a JSON-able dict
(``type`` of the module it replaces, its ``dense_shape``, whether it had a ``bias``, the kept
output ``rows`` and input channels ``cols`` as index runs, ``col_block`` columns per input
channel, ``folded_bn``, ...). :mod:`sparsevd.io` stores it, and :func:`dense_state` uses it to
write a deployed module back as the state of the module it replaced (the dense-equivalent
weights of ``save_pretrained``, :mod:`sparsevd.hf_integration`).

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369), sec. 5 (weights with log α > 3 are dropped at test time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.conv_geometry import conv_padding
from .nn.sparse import SparseConv1d, SparseConv2d, SparseLinear
from .nn.svdo import ORIGIN_ATTR, SVDO_LAYERS, Conv1dSVDO, Conv2dSVDO, LinearSVDO

__all__ = ["FOLDED_BIAS", "ORIGIN_ATTR", "dense_state", "identity_bn_state", "deployed_layer", "mask_from_runs", "origin",
           "replace_layers", "runs", "set_origin", "sparse_layer"]

#: The key of :func:`dense_state` for a folded batch norm's shift kept by a convolution without bias.
FOLDED_BIAS = "folded_bias"

# Modules that act on every channel (feature) separately and map a per-channel constant to a
# per-channel constant. Dropout is the identity at inference.
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
_IDENTITY_AT_EVAL = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
# Batch norm at inference is a per-channel affine map (running statistics): it passes a chain,
# and its per-channel tensors are sliced with the channels the compaction keeps.
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

# Functions a traced graph may apply between two layers: elementwise, the other arguments
# constants (numbers, flags). Dropout passes only with training=False (the identity).
_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.tanhshrink, F.tanh, F.sigmoid,
    torch.relu, torch.tanh, torch.sigmoid, F.dropout, operator.mul, torch.mul, operator.add,
    operator.sub, operator.truediv, operator.neg,
}
# The products of two layers' neurons (gated MLPs: down(act(gate(x)) * up(x))).
_PRODUCTS = (operator.mul, torch.mul)
_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}


# --------------------------------------------------------------------------------- origins
#: Subclasses of nn.Linear known to compute nn.Linear's x Wᵀ + b with only its weight and bias, by
#: (module, class name): converted, deployed and stored as nn.Linear (they stand for one).
LINEAR_EQUIVALENTS = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def linear_equivalent(m: nn.Module) -> bool:
    """``m`` is one of :data:`LINEAR_EQUIVALENTS` (recognised without importing transformers)."""
    return (type(m).__module__, type(m).__name__) in LINEAR_EQUIVALENTS


def origin(m: nn.Module) -> Optional[dict]:
    """The origin record of ``m`` (see the module docstring), or None."""
    return getattr(m, ORIGIN_ATTR, None)


def set_origin(m: nn.Module, record: dict) -> nn.Module:
    """Attach ``record`` as ``m``'s origin; returns ``m``."""
    setattr(m, ORIGIN_ATTR, record)
    return m


def runs(mask: Tensor) -> List[List[int]]:
    """The True positions of a 1-D bool mask as [start, stop) runs (compact in JSON)."""
    idx = mask.nonzero().flatten().tolist()
    out: List[List[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def mask_from_runs(spans, n: int, what: str = "runs") -> Tensor:
    """The (n,) bool mask of [start, stop) runs (inverse of :func:`runs`).

    Raises:
        ValueError: a run that is not a pair of ints within [0, n] in increasing order (named ``what``).
    """
    mask = torch.zeros(n, dtype=torch.bool)
    last = 0
    for span in spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                or not last <= span[0] < span[1] <= n):
            raise ValueError(f"{what}: expected increasing [start, stop) runs within [0, {n}], got {span!r}")
        mask[span[0]:span[1]] = True
        last = span[1]
    return mask


def _kind(m: nn.Module) -> str:
    """The type name of the module a training layer stands for (its origin's, else the torch twin)."""
    rec = origin(m)
    if rec is not None:
        return rec["type"]
    return {LinearSVDO: "Linear", Conv2dSVDO: "Conv2d", Conv1dSVDO: "Conv1d"}[type(m)]


# ------------------------------------------------------------------------------ elementwise
class _Fn(nn.Module):
    """One elementwise call of a traced graph (a function or a tensor method) with its constant
    arguments, applied to another tensor: how a chain's constant act(b) passes it."""

    def __init__(self, fn, args: tuple, kwargs: dict, pos: int, method: bool) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs, self.pos, self.method = fn, args, kwargs, pos, method

    def forward(self, h: Tensor) -> Tensor:
        args = list(self.args)
        args[self.pos] = h
        if self.method:
            return getattr(args[0], self.fn)(*args[1:], **self.kwargs)
        return self.fn(*args, **self.kwargs)


def _hf_activation(m: nn.Module) -> bool:
    """An activation module of transformers.activations without tensors of its own (GELU,
    NewGELU, QuickGELU, SiLU, ...): elementwise."""
    return (type(m).__module__ == "transformers.activations"
            and next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None)


def _is_elementwise(m: nn.Module) -> bool:
    return isinstance(m, _ELEMENTWISE + (_Fn,)) or _hf_activation(m)


def _bn_eval(bn: nn.Module, h: Tensor) -> Tensor:
    """Batch norm in eval mode on a per-channel vector h (C,)."""
    rm, rv = bn.running_mean.to(h.dtype), bn.running_var.to(h.dtype)
    out = (h - rm) / torch.sqrt(rv + bn.eps)
    if bn.affine:
        out = out * bn.weight.detach().to(h.dtype) + bn.bias.detach().to(h.dtype)
    return out


def _has_stats(bn: nn.Module) -> bool:
    return bool(bn.track_running_stats) and bn.running_mean is not None


def _slice_bn(bn: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of ``bn`` over the kept channels only."""
    new = type(bn)(int(keep.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=True, device=bn.running_mean.device,
                   dtype=bn.running_mean.dtype)
    with torch.no_grad():
        new.running_mean.copy_(bn.running_mean[keep])
        new.running_var.copy_(bn.running_var[keep])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
    return set_origin(new.eval(), {"type": type(bn).__name__, "dense_shape": [bn.num_features],
                                   "rows": runs(keep.cpu()), "eps": bn.eps})


# ------------------------------------------------------------------------------------ links
@dataclasses.dataclass
class _Link:
    """What joins one layer of a chain to the next."""

    ops: List[nn.Module]  # the modules in between (elementwise, batch norm, pools, flatten)
    kind: str  # "ll" linear→linear, "cc" conv→conv, "cl" conv→(pool)→flatten→linear
    const_ok: bool  # a dead channel's constant reaches the next layer as a uniform constant
    names: List[str] = dataclasses.field(default_factory=list)  # the ops' full names ("" for calls)

    def act(self, b: Tensor) -> Tensor:
        """The constant output of dead channels with bias ``b`` after the elementwise modules and
        batch norms (``b`` is not modified)."""
        h = b.clone()
        for op in self.ops:
            if isinstance(op, _IDENTITY_AT_EVAL):
                continue
            if isinstance(op, _BATCHNORMS):
                h = _bn_eval(op, h)
            elif _is_elementwise(op):
                h = op(h)
        return h


def _stateless(m: nn.Module) -> bool:
    """No parameters and no buffers (dropout, an activation, a pool): the surgery never changes
    it, so it may be called more than once or reachable under several names."""
    return next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None


def _passable(m: nn.Module) -> bool:
    if isinstance(m, _BATCHNORMS):
        return _has_stats(m)
    return _is_elementwise(m) or isinstance(m, _POOLS + (nn.Flatten,))


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, LinearSVDO) else m.out_channels


def _make_link(prev: nn.Module, ops: List[nn.Module], nxt: nn.Module) -> Optional[_Link]:
    """The link prev → ops → nxt, or None when the neurons of prev cannot be compacted through it."""
    conv_prev = isinstance(prev, Conv2dSVDO)
    if isinstance(prev, Conv1dSVDO) or isinstance(nxt, Conv1dSVDO):
        return None
    if conv_prev and prev.groups != 1:
        return None
    const_ok, flatten = True, False
    for op in ops:
        if isinstance(op, _BATCHNORMS):  # per channel of prev's output, before any flatten
            if flatten or not _has_stats(op) or op.num_features != _out_channels(prev) or \
                    isinstance(op, nn.BatchNorm2d) != conv_prev:
                return None
            continue
        if _is_elementwise(op):
            continue
        if isinstance(op, _POOLS):
            if not conv_prev or flatten:
                return None
            if isinstance(op, nn.AvgPool2d) and op.count_include_pad and op.padding not in (0, (0, 0)):
                const_ok = False
            continue
        if isinstance(op, nn.Flatten):
            if flatten or op.start_dim != 1 or op.end_dim != -1:
                return None
            flatten = True
            continue
        return None
    if isinstance(prev, LinearSVDO) and isinstance(nxt, LinearSVDO):
        return _Link(ops, "ll", const_ok) if nxt.in_features == prev.out_features else None
    if conv_prev and isinstance(nxt, Conv2dSVDO) and not flatten:
        if nxt.groups != 1 or nxt.in_channels != prev.out_channels:
            return None
        return _Link(ops, "cc", const_ok and tuple(nxt.padding_sides) == (0, 0, 0, 0))
    if conv_prev and isinstance(nxt, LinearSVDO) and flatten:
        c = prev.out_channels
        if c == 0 or nxt.in_features % c:
            return None
        return _Link(ops, "cl", const_ok)
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class _Finder:
    """Finds the batch-norm folds and the links between layers of a model (see the module
    docstring), by full module names. Layers reachable under more than one name are left out."""

    def __init__(self, model: nn.Module, trace: bool) -> None:
        self.model = model
        self.trace = trace
        counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.shared = {i for i, c in counts.items() if c > 1}
        self.has_layers = {id(m) for m in model.modules()
                           if any(isinstance(s, SVDO_LAYERS) for s in m.modules())}
        self.summaries: Dict[int, Optional[dict]] = {}
        self.folds: List[Tuple[str, str]] = []  # (conv name, batch norm name)
        # (layer name, next layer name, [(name, module) of the ops between]); checked by _make_link
        self.links: List[Tuple[str, str, List[Tuple[str, nn.Module]]]] = []
        # gated pairs: ((layer name, ops) of each factor, (consumer name, ops after the product))
        self.groups: List[Tuple[Tuple[str, list], Tuple[str, list], Tuple[str, list]]] = []
        # modules holding a convolution and a batch norm whose forward does not trace: "Type 'name'"
        self.untraced: List[str] = []
        # layers and batch norms whose parameters or attributes traced code reads besides calling
        # them (y + fc1.bias, F.linear(z, enc.weight.t()), fc1.out_features): never changed
        self.exposed: Set[str] = set()

    def _trace(self, prefix: str, module: nn.Module, method: str) -> Optional[torch.fx.Graph]:
        """:func:`_trace`, the modules its code reads (:attr:`exposed`) recorded by full name."""
        exposed: Set[str] = set()
        graph = _trace(module, method, exposed)
        self.exposed |= {_join(prefix, n) for n in exposed}
        return graph

    def _single(self, m: nn.Module) -> bool:
        return id(m) not in self.shared

    # -- nn.Sequential
    def sequential(self, prefix: str, seq: nn.Sequential) -> None:
        items = [(_join(prefix, n), m) for n, m in seq.named_children()]
        for (n1, a), (n2, b) in zip(items, items[1:]):
            if isinstance(a, (Conv2dSVDO, Conv1dSVDO)) and self._foldable(a, b):
                self.folds.append((n1, n2))
        prev: Optional[str] = None
        ops: List[Tuple[str, nn.Module]] = []
        for full, m in items:
            if isinstance(m, SVDO_LAYERS) and self._single(m):
                if prev is not None:
                    self.links.append((prev, full, ops))
                prev, ops = full, []
            elif prev is not None and _passable(m) and self._single(m):
                ops = ops + [(full, m)]
            else:
                prev, ops = None, []

    def _foldable(self, conv: nn.Module, bn: nn.Module) -> bool:
        want = nn.BatchNorm2d if isinstance(conv, Conv2dSVDO) else nn.BatchNorm1d
        return (type(bn) is want and _has_stats(bn) and bn.num_features == conv.out_channels
                and self._single(conv) and self._single(bn))

    # -- traced modules
    def traced(self, prefix: str, module: nn.Module) -> None:
        methods = ["forward"] + [m for m in _FEED_FORWARD_METHODS if hasattr(module, m)]
        for method in methods:
            graph = self._trace(prefix, module, method)
            if graph is None:
                if method == "forward" and _holds_fold(module):
                    self.untraced.append(f"{type(module).__name__} {prefix!r}")
                continue
            calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
            ctx = (prefix, module, calls)
            for node in graph.nodes:
                group = self._gated(ctx, node)
                if group is not None:
                    self.groups.append(group)
                produced = self._producer(ctx, node)
                if produced is None:
                    continue
                m = self._target(ctx, node)
                users = list(node.users)
                if (isinstance(m, (Conv2dSVDO, Conv1dSVDO)) and len(users) == 1
                        and users[0].args == (node,) and not users[0].kwargs):
                    bn = self._target(ctx, users[0])
                    if bn is not None and calls[users[0].target] == 1 and self._foldable(m, bn):
                        self.folds.append((produced[0], _join(prefix, users[0].target)))
                found = self._follow(ctx, node, produced[1])
                if found is not None:
                    self.links.append((produced[0], found[0], found[1]))

    @staticmethod
    def _target(ctx, node) -> Optional[nn.Module]:
        if node.op != "call_module":
            return None
        try:
            return ctx[1].get_submodule(node.target)
        except AttributeError:
            return None

    def _elementwise(self, ctx, u, cur) -> Optional[Tuple[str, nn.Module]]:
        """(name, module) of node u when it applies an elementwise op to ``cur`` alone."""
        nodes = [a for a in list(u.args) + list(u.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if nodes != [cur] or any(isinstance(a, (list, tuple, dict)) for a in u.args):
            return None
        if u.op == "call_module":
            m = self._target(ctx, u)
            if m is None or u.args != (cur,) or u.kwargs:
                return None
            if not _stateless(m) and (ctx[2][u.target] != 1 or not self._single(m)):
                return None
            return (_join(ctx[0], u.target), m) if _passable(m) else None
        if u.op == "call_function" and u.target in _FUNCTIONS:
            if u.target is F.dropout and u.kwargs.get("training", u.args[2] if len(u.args) > 2 else True):
                return None
            return "", _Fn(u.target, tuple(u.args), dict(u.kwargs), list(u.args).index(cur), False)
        if u.op == "call_method" and u.target in _METHODS and u.args[0] is cur:
            return "", _Fn(u.target, tuple(u.args), dict(u.kwargs), 0, True)
        return None

    def _follow(self, ctx, start, ops) -> Optional[Tuple[str, List[Tuple[str, nn.Module]]]]:
        """From a node producing a layer's neurons, through single-user elementwise nodes, to the
        layer that reads them: (its name, the ops in between), or None."""
        cur = start
        while True:
            users = list(cur.users)
            if len(users) != 1:
                return None
            u = users[0]
            op = self._elementwise(ctx, u, cur)
            if op is not None:
                ops = ops + [op]
                cur = u
                continue
            return self._consumer(ctx, u, cur, ops)

    def _consumer(self, ctx, u, cur, ops):
        m = self._target(ctx, u)
        if m is None or ctx[2][u.target] != 1 or not self._single(m):
            return None
        values = list(u.args) + list(u.kwargs.values())
        if sum(v is cur for v in values) != 1 or any(isinstance(v, (list, tuple, dict)) for v in values):
            return None
        if isinstance(m, SVDO_LAYERS):
            return (_join(ctx[0], u.target), ops) if u.args[:1] == (cur,) else None
        summary = self._summary(_join(ctx[0], u.target), m)
        if summary is None:
            return None
        try:
            bound = inspect.signature(m.forward).bind(*u.args, **u.kwargs).arguments
        except (TypeError, ValueError):
            return None
        param = next((k for k, v in bound.items() if v is cur), None)
        found = summary["consumers"].get(param)
        return None if found is None else (found[0], ops + found[1])

    def _producer(self, ctx, node):
        """(layer name, ops after it) when ``node`` outputs a layer's neurons."""
        m = self._target(ctx, node)
        if m is None or ctx[2][node.target] != 1 or not self._single(m):
            return None
        if isinstance(m, SVDO_LAYERS):
            return _join(ctx[0], node.target), []
        summary = self._summary(_join(ctx[0], node.target), m)
        return None if summary is None else summary["producer"]

    def _produced(self, ctx, cur) -> Optional[Tuple[str, List[Tuple[str, nn.Module]]]]:
        """(layer name, ops in order) when the value ``cur`` is a layer's neurons through
        elementwise ops, each value on the way used once (by the next op, or by ``cur``'s user)."""
        rev: List[Tuple[str, nn.Module]] = []
        while isinstance(cur, torch.fx.Node) and len(cur.users) == 1:
            found = self._producer(ctx, cur)
            if found is not None:
                return found[0], found[1] + rev[::-1]
            inputs = list(cur.all_input_nodes)
            if len(inputs) != 1:
                return None
            op = self._elementwise(ctx, cur, inputs[0])
            if op is None:
                return None
            rev.append(op)
            cur = inputs[0]
        return None

    def _gated(self, ctx, node):
        """When ``node`` multiplies the neurons of two layers (each through elementwise ops, used
        by nothing else) and the product reaches a third layer through elementwise ops only:
        ((gate, its ops), (up, its ops), (consumer, the ops after the product)), else None."""
        if node.op != "call_function" or node.target not in _PRODUCTS or node.kwargs or len(node.args) != 2:
            return None
        a, b = node.args
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or a is b:
            return None
        fa, fb = self._produced(ctx, a), self._produced(ctx, b)
        if fa is None or fb is None or fa[0] == fb[0]:
            return None
        found = self._follow(ctx, node, [])
        return None if found is None else (fa, fb, found)

    def _summary(self, name: str, m: nn.Module) -> Optional[dict]:
        """What a submodule's own trace says: ``producer`` (its output is a layer's neurons through
        elementwise ops) and ``consumers`` (argument name → the layer reading it first)."""
        if id(m) in self.summaries:
            return self.summaries[id(m)]
        self.summaries[id(m)] = None  # (recursion guard)
        if id(m) not in self.has_layers or isinstance(m, SVDO_LAYERS):
            return None
        graph = self._trace(name, m, "forward")
        if graph is None:
            return None
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        ctx = (name, m, calls)
        consumers = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                found = self._follow(ctx, node, [])
                if found is not None:
                    consumers[node.target] = found
        out = next(n for n in graph.nodes if n.op == "output")
        summary = {"producer": self._produced(ctx, out.args[0]), "consumers": consumers}
        self.summaries[id(m)] = summary
        return summary

    def run(self) -> None:
        for name, m in self.model.named_modules():
            if isinstance(m, SVDO_LAYERS) or id(m) not in self.has_layers:
                continue
            if type(m) is nn.Sequential:
                self.sequential(name, m)
            elif self.trace and not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                self.traced(name, m)


def _holds_fold(m: nn.Module) -> bool:
    """``m`` has a sparse-VD convolution and a batch norm with running statistics among its
    children: a fold its trace would look for."""
    children = list(m.children())
    return (any(isinstance(c, (Conv2dSVDO, Conv1dSVDO)) for c in children)
            and any(isinstance(c, _BATCHNORMS) and _has_stats(c) for c in children))


def _float_dtype(m: nn.Module) -> Optional[torch.dtype]:
    """The one floating dtype of ``m``'s parameters, or None (none, or several)."""
    dtypes = {p.dtype for p in m.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _value_dtype(tracer: "_LeafTracer", node: torch.fx.Node) -> Optional[torch.dtype]:
    """:func:`_known_dtype`, memoized per trace."""
    if node not in tracer.dtypes:
        tracer.dtypes[node] = _known_dtype(tracer, node)
    return tracer.dtypes[node]


def _known_dtype(tracer: "_LeafTracer", node: torch.fx.Node) -> Optional[torch.dtype]:
    """The dtype a traced value has when the model runs in the dtype of its parameters: a leaf
    with floating parameters outputs theirs (its tuple's items too); a parameter-free leaf and an
    elementwise function keep their tensor inputs' one known dtype (:func:`_inputs_dtype`);
    anything else (inputs of the traced method, casts, other ops) is unknown (None)."""
    if node.op == "get_attr":  # a parameter or buffer (``self.fc.weight.dtype``: no graph node)
        value = _own_tensor(tracer.root, node.target)
        return value.dtype if value is not None else None
    if node.op == "call_module":
        leaf = tracer.root.get_submodule(node.target)
        if _stateless(leaf):
            return _inputs_dtype(tracer, node)
        return _float_dtype(leaf)
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        return _value_dtype(tracer, src) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
    if (node.op == "call_function" and node.target in _FUNCTIONS) or \
            (node.op == "call_method" and node.target in _METHODS):
        return _inputs_dtype(tracer, node)
    return None


def _own_tensor(root: nn.Module, target: str) -> Optional[Tensor]:
    """The parameter or buffer ``target`` ("fc.weight") of ``root``, read from the modules' own
    dicts (attribute reads on modules are traced while fx runs)."""
    *path, leaf = target.split(".")
    m = root
    for part in path:
        m = m._modules.get(part)
        if m is None:
            return None
    value = m._parameters.get(leaf, m._buffers.get(leaf))
    return value if isinstance(value, Tensor) else None


def _inputs_dtype(tracer: "_LeafTracer", node: torch.fx.Node) -> Optional[torch.dtype]:
    """The one known dtype of the tensor inputs of an elementwise op (an input of unknown dtype,
    ``residual + h`` with the traced method's input as ``residual``, is taken to be of that dtype
    or not floating: the model runs in its parameters' dtype, and either way the result has it)."""
    dtypes = {_value_dtype(tracer, a) for a in node.all_input_nodes} - {None}
    return dtypes.pop() if len(dtypes) == 1 else None


class _Proxy(torch.fx.Proxy):
    """A traced value whose ``dtype`` is concrete where :func:`_value_dtype` knows it, so code that
    tests it (``if h.dtype == torch.float16 and ...``, BART-family layers) traces for the dtype
    deploy sees; elsewhere ``dtype`` is a traced attribute as in torch.fx."""

    @property
    def dtype(self):
        known = _value_dtype(self.tracer, self.node)
        if known is None:
            raise AttributeError("dtype")  # torch.fx's own __getattr__: a traced attribute
        return known


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's own code: every submodule call is a leaf; values are :class:`_Proxy`."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: Dict[torch.fx.Node, Optional[torch.dtype]] = {}  # (see _value_dtype)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)


def _traced_inputs(fn) -> Optional[List[str]]:
    """The arguments of ``fn`` (after ``self``) a trace makes placeholders of: those without a
    default (the others take it; ``*args`` / ``**kwargs`` stay empty). None when the signature
    cannot be read or a keyword-only argument has no default."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.KEYWORD_ONLY and p.default is inspect.Parameter.empty for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is inspect.Parameter.empty]


_TRAMPOLINE_FN = "_sparsevd_traced_method"


def _trampoline(fn, names: List[str]):
    """``forward(self, <names>)`` calling ``fn(self, <names>)``: a plain signature for torch.fx
    whatever wraps ``fn`` (transformers' ``GradientCheckpointingLayer`` wraps each layer's forward
    in ``(self, *args, **kwargs)``, ``deprecate_kwarg`` too: their code runs as it is, in eval
    mode the call itself)."""
    args = "".join(", " + n for n in names)
    scope = {_TRAMPOLINE_FN: fn}
    exec(f"def forward(self{args}):\n    return {_TRAMPOLINE_FN}(self{args})\n",
         scope)  # noqa: S102 — names are the identifiers of fn's own signature
    return scope["forward"]


def _view(module: nn.Module, forward) -> nn.Module:
    """``module`` seen through a subclass whose forward is ``forward`` (set after the class is
    made: a subclass hook may wrap it), sharing its attributes."""
    view_cls = type("_Traced", (type(module),), {"__module__": __name__})
    view_cls.forward = forward
    root = object.__new__(view_cls)
    root.__dict__ = module.__dict__
    return root


def _plain(fn) -> bool:
    """``fn`` is not a wrapper and takes no ``*args`` / ``**kwargs``: torch.fx traces it as it is."""
    try:
        params = inspect.signature(fn, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):
        return False
    return not hasattr(fn, "__wrapped__") and all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                                  for p in params)


def _trace(module: nn.Module, method: str, exposed: Optional[Set[str]] = None) -> Optional[torch.fx.Graph]:
    """The fx graph of ``module.<method>`` (submodules as leaves; arguments with a default take
    it, ``*args`` / ``**kwargs`` are empty), or None when it does not trace. A plain ``forward`` is
    traced as it is; another method, or a forward behind a wrapper or with ``*args`` /
    ``**kwargs``, through :func:`_trampoline` on a view. The module's attributes are restored
    afterwards. ``exposed`` receives the names (relative to ``module``) of the sparse-VD layers
    and batch norms whose parameters the code computes with or whose other attributes it reads
    (:func:`_recording_reads`, :func:`_used_parameters`)."""
    fn = getattr(type(module), method, None)
    names = _traced_inputs(fn) if callable(fn) else None
    if names is None or not all(n.isidentifier() and n != _TRAMPOLINE_FN for n in names):
        return None
    saved = {k: (dict(v) if k in ("_modules", "_parameters", "_buffers") else v)
             for k, v in module.__dict__.items()}
    reads: Set[str] = set()
    try:
        with warnings.catch_warnings(), _recording_reads(module, reads):
            warnings.simplefilter("ignore")
            if method == "forward" and _plain(fn):
                concrete = {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[1:]
                            if p.default is not inspect.Parameter.empty
                            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
                graph = _LeafTracer().trace(module, concrete_args=concrete or None)
            else:
                graph = _LeafTracer().trace(_view(module, _trampoline(fn, names)))
        if exposed is not None:
            exposed |= reads | _used_parameters(module, graph)
        return graph
    except Exception:  # noqa: BLE001 — any failure of user code under tracing: not traceable
        return None
    finally:
        module.__dict__.clear()
        module.__dict__.update(saved)


#: Methods traced besides ``forward``, where a module keeps its MLP in one (BERT-family layers'
#: ``feed_forward_chunk``; nn.TransformerEncoderLayer's / DecoderLayer's ``_ff_block``, whose
#: ``forward`` branches on tensors and does not trace).
_FEED_FORWARD_METHODS = ("feed_forward_chunk", "_ff_block")
_CHANGED = SVDO_LAYERS + _BATCHNORMS  # the modules the surgery changes (weights, biases, shapes)


@contextlib.contextmanager
def _recording_reads(module: nn.Module, reads: Set[str]):
    """While it lasts, the sparse-VD layers and batch norms below ``module`` (leaves of a trace,
    whose own code does not run) add their name to ``reads`` when the traced code reads one of
    their attributes other than a parameter or buffer (those are graph nodes) or nn.Module's own
    (what fx reads to call them): ``fc1.out_features``, ``bn.eps``."""
    swapped = []
    for name, m in module.named_modules():
        if name and isinstance(m, _CHANGED):
            cls, own = type(m), set(m._parameters) | set(m._buffers)

            def getattribute(self, key, _name=name, _own=own):
                if not (key.startswith("_") or key in _own or key == "training" or hasattr(nn.Module, key)):
                    reads.add(_name)
                return object.__getattribute__(self, key)

            m.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute,
                                                      "__module__": cls.__module__})
            swapped.append((m, cls))
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def _used_parameters(module: nn.Module, graph: torch.fx.Graph) -> Set[str]:
    """The sparse-VD layers and batch norms of ``module`` one of whose parameters or buffers the
    graph computes with (a ``get_attr`` node with users; ``.dtype`` reads leave none)."""
    out = set()
    for node in graph.nodes:
        if node.op == "get_attr" and node.users:
            owner = node.target.rpartition(".")[0]
            try:
                if isinstance(module.get_submodule(owner), _CHANGED):
                    out.add(owner)
            except AttributeError:
                continue
    return out


# ------------------------------------------------------------------------------ compaction
@dataclasses.dataclass
class _Pending:
    """One sparse-VD layer on its way to a deployed layer."""

    module: nn.Module
    w: Tensor  # its eval-mode weight θ ⊙ [log α < threshold] (then folded, compacted)
    b: Tensor  # float64 bias (zeros when it has none)
    has_bias: bool
    record: dict  # its origin record


@torch.no_grad()
def _pending(m: nn.Module, threshold: Optional[float]) -> _Pending:
    w = (m.weight.detach() * m.mask(threshold)).contiguous()  # θ ⊙ mask: the eval-mode weight
    has_bias = m.bias is not None
    b = m.bias.detach().double() if has_bias else torch.zeros(w.shape[0], dtype=torch.float64,
                                                              device=w.device)
    rec = dict(origin(m) or {})
    rec.setdefault("type", _kind(m))
    rec.setdefault("dense_shape", list(m.weight.shape) if rec["type"] != "Conv1D"
                   else [m.in_features, m.out_features])
    rec.setdefault("bias", has_bias)
    return _Pending(m, w, b, has_bias, rec)


@torch.no_grad()
def _fold_bn(p: _Pending, bn: nn.Module, bn_name: str) -> bool:
    """Fold ``bn`` into the convolution ``p``; False (nothing changed) when a scale
    γ / sqrt(σ² + ε) or a shift is not finite (the batch norm then stays as it is)."""
    s = bn.weight.detach().double() if bn.affine else torch.ones_like(p.b)
    s = s / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(p.b)
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(bn.running_mean).all())
            and bool(torch.isfinite(shift).all())):
        return False
    shape = (-1,) + (1,) * (p.w.dim() - 1)
    p.w = (p.w.double() * s.view(shape)).to(p.w.dtype).contiguous()
    p.b = (p.b - bn.running_mean.double()) * s + shift
    p.has_bias = True
    p.record["folded_bn"] = bn_name
    return True


@torch.no_grad()
def _compact_chain(layers: List[_Pending], links: List[_Link]) -> None:
    """Remove the dead and unread neurons between the layers of a chain (in place: weights,
    biases, the kept rows and input channels of each layer's record; the chain's batch norms
    are sliced in ``links[i].ops``)."""
    ws = [p.w for p in layers]
    bs = [p.b for p in layers]
    keep = [torch.ones(_out_channels(p.module), dtype=torch.bool, device=ws[0].device) for p in layers[:-1]]

    def consumer_view(i: int) -> Tensor:  # (out, channels of link i, positions) view of W[i+1]
        w = ws[i + 1]
        return w.view(w.shape[0], keep[i].numel(), -1)

    changed = True
    while changed:
        changed = False
        # forward: dead rows of layer i fold into the bias of layer i+1, or are dropped
        for i, link in enumerate(links):
            rows = ws[i].view(ws[i].shape[0], -1)
            dead = keep[i] & ~(rows != 0).any(1)
            if not bool(dead.any()):
                continue
            cv = consumer_view(i)
            const = link.act(bs[i].to(ws[i].dtype)).double()
            foldable = dead & ((const == 0) | ~(cv != 0).any(dim=(0, 2)) | link.const_ok)
            if not bool(foldable.any()):
                continue
            idx = foldable.nonzero(as_tuple=True)[0]
            colsum = cv[:, idx, :].double().sum(-1)  # (out, dead channels)
            contrib = colsum * const[idx]
            if bool((contrib != 0).any()):
                bs[i + 1] += contrib.sum(1)
                layers[i + 1].has_bias = True
            cv[:, idx, :] = 0
            keep[i][idx] = False
            changed = True
        # backward: neurons nobody reads are dropped with their rows
        for i in reversed(range(len(links))):
            cv = consumer_view(i)
            unread = keep[i] & ~(cv != 0).any(dim=(0, 2))
            if bool(unread.any()):
                ws[i].view(ws[i].shape[0], -1)[unread] = 0
                keep[i][unread] = False
                changed = True
    for k in keep:  # never leave a zero-size activation: one (zero-weight) neuron stays
        if not bool(k.any()):
            k[0] = True

    for link, k in zip(links, keep):  # the batch norms between the layers keep their channels
        for j, op in enumerate(link.ops):
            if isinstance(op, _BATCHNORMS) and not bool(k.all()):
                link.ops[j] = _slice_bn(op, k)

    for i, p in enumerate(layers):
        w, b = ws[i], bs[i]
        if i < len(layers) - 1:
            w, b = w[keep[i]], b[keep[i]]
            if not bool(keep[i].all()):
                p.record["rows"] = runs(keep[i].cpu())
        if i > 0:
            c = keep[i - 1].numel()
            block = torch.Size(ws[i].shape[1:]).numel() // c
            w = w.view(w.shape[0], c, -1)[:, keep[i - 1]].reshape(w.shape[0], -1, *w.shape[2:])
            if isinstance(p.module, LinearSVDO):
                w = w.reshape(w.shape[0], -1)
            if not bool(keep[i - 1].all()):
                p.record["cols"] = runs(keep[i - 1].cpu())
                p.record["col_block"] = int(block)
        p.w, p.b = w.contiguous(), b


@dataclasses.dataclass
class _Group:
    """A gated pair: consumer(after(f_gate(gate(x)) * f_up(up(y)))), the f's and ``after``
    elementwise; each _Link holds the ops of one branch (for the constants they map)."""

    factors: Tuple[_Link, _Link]  # the ops from each factor layer to the product
    after: _Link  # the ops from the product to the consumer


def _make_group(gate: nn.Module, up: nn.Module, consumer: nn.Module,
                ops: Tuple[list, list, list]) -> Optional[_Group]:
    """The group of three linear layers whose product has the consumer's input width, every op
    elementwise (no batch norm, pool or flatten), or None."""
    if not all(isinstance(m, LinearSVDO) for m in (gate, up, consumer)):
        return None
    if not gate.out_features == up.out_features == consumer.in_features:
        return None
    if not all(_is_elementwise(op) for branch in ops for op in branch):
        return None
    return _Group((_Link(list(ops[0]), "ll", True), _Link(list(ops[1]), "ll", True)),
                  _Link(list(ops[2]), "ll", True))


def _product_constant(factors: Sequence[_Pending], group: _Group) -> Tuple[Tensor, Tensor]:
    """(known, value): the units whose product is a constant, and that constant (float64, computed
    in the layers' dtype as the model does). A factor whose row is all dropped outputs the
    constant f(b) (b = 0 without bias); the product is 0 where one such constant is 0 (the other
    factor finite), f_gate(b) · f_up(b') where both factors are constant and finite."""
    dead, const = [], []
    for p, link in zip(factors, group.factors):
        dead.append(~(p.w != 0).any(1))
        const.append(link.act(p.b.to(p.w.dtype)))
    zero = (dead[0] & (const[0] == 0)) | (dead[1] & (const[1] == 0))
    both = dead[0] & dead[1] & torch.isfinite(const[0]) & torch.isfinite(const[1])
    value = torch.where(zero, torch.zeros_like(const[0]), const[0] * const[1])
    return zero | both, value.double()


@torch.no_grad()
def _compact_group(factors: Sequence[_Pending], consumer: _Pending, group: _Group) -> None:
    """Remove the units of a gated pair that the consumer never reads (its column is all
    dropped) or whose product is a constant c (:func:`_product_constant`): rows of both factor
    layers and the consumer's columns (in place, with the records). Exact: an unread unit adds
    0 to the consumer; a constant one adds W[:, i] · after(c) to every output, which is folded
    into the consumer's bias (float64, rounded once; a consumer without bias gets one when that
    is nonzero, as along chains)."""
    known, value = _product_constant(factors, group)
    cols = consumer.w
    unread = ~(cols != 0).any(0)
    fold = known & ~unread
    if bool(fold.any()):
        const = group.after.act(value.to(cols.dtype)).double()
        contrib = (cols[:, fold].double() * const[fold]).sum(1)
        if bool((contrib != 0).any()):
            consumer.b = consumer.b + contrib
            consumer.has_bias = True
    keep = ~(unread | known)
    if not bool(keep.any()):  # never a zero-size activation: one unit stays, read by nothing
        keep[0] = True
        cols[:, 0] = 0
    if bool(keep.all()):
        return
    for p in factors:
        p.w, p.b = p.w[keep].contiguous(), p.b[keep]
        p.record["rows"] = runs(keep.cpu())
    consumer.w = cols[:, keep].contiguous()
    consumer.record["cols"] = runs(keep.cpu())
    consumer.record["col_block"] = 1


def _compact_groups(pending: Dict[str, _Pending], found) -> None:
    """Compact every gated pair the finder saw (once each; see :func:`_compact_group`)."""
    seen = set()
    for (g, g_ops), (u, u_ops), (c, c_ops) in found:
        if (g, u, c) in seen or not {g, u, c} <= pending.keys():
            continue
        seen.add((g, u, c))
        ops = ([o for _, o in g_ops], [o for _, o in u_ops], [o for _, o in c_ops])
        group = _make_group(pending[g].module, pending[u].module, pending[c].module, ops)
        if group is not None:
            _compact_group((pending[g], pending[u]), pending[c], group)


def sparse_layer(m: nn.Module, w: Tensor, b: Optional[Tensor]) -> nn.Module:
    """The deployed layer of the sparse-VD layer ``m`` holding weight ``w`` (its shape, or
    compacted) and bias ``b`` (or None).

    Raises:
        ValueError: a convolution with asymmetric padding (named).
    """
    common = dict(dense_shape=tuple(m.weight.shape), num_weights=m.weight.numel())
    if isinstance(m, LinearSVDO):
        return SparseLinear.from_dense(w, b, **common)
    if isinstance(m, Conv1dSVDO):
        pad = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
        _, _, left, right = conv_padding(pad, (1, m.kernel_size[0]), (1, m.stride[0]),
                                         (1, m.dilation[0]))
        if left != right:
            raise ValueError(
                f"model: a Conv1dSVDO uses padding={m.padding!r} with kernel_size={m.kernel_size} "
                f"(asymmetric padding {left}+{right}); SparseConv1d supports symmetric padding")
        return SparseConv1d.from_dense(w, b, m.stride, left, m.dilation, m.groups, **common)
    t, bottom, left, right = m.padding_sides
    if (t, left) != (bottom, right):
        raise ValueError(
            f"model: a Conv2dSVDO uses padding={m.padding!r} with kernel_size={m.kernel_size} "
            f"(asymmetric padding {m.padding_sides}); SparseConv2d supports symmetric padding"
        )
    return SparseConv2d.from_dense(w, b, m.stride, (t, left), m.dilation, m.groups, **common)


def _build(p: _Pending) -> nn.Module:
    b = p.b.to(p.w.dtype) if p.has_bias else None
    return set_origin(sparse_layer(p.module, p.w, b), p.record)


def deployed_layer(m: nn.Module, threshold: Optional[float]) -> nn.Module:
    """The deployed layer of one sparse-VD layer (no neighbours: nothing compacted or folded)."""
    return _build(_pending(m, threshold))


def _chains(links: List[Tuple[str, str, _Link]]) -> List[Tuple[List[str], List[_Link]]]:
    """Chains of layer names from pairwise links; a layer with two successors or two
    predecessors (ambiguous) keeps none."""
    out_n = Counter(a for a, _, _ in links)
    in_n = Counter(b for _, b, _ in links)
    nxt = {a: (b, link) for a, b, link in links if out_n[a] == 1 and in_n[b] == 1}
    heads = [a for a in nxt if a not in {b for b, _ in nxt.values()}]
    chains = []
    for head in heads:
        names, chain_links = [head], []
        while names[-1] in nxt and len(names) <= len(nxt):
            b, link = nxt[names[-1]]
            names.append(b)
            chain_links.append(link)
        chains.append((names, chain_links))
    return chains


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = new


@torch.no_grad()
def replace_layers(model: nn.Module, threshold: Optional[float], trace: bool = True) -> List[nn.Module]:
    """Replace every LinearSVDO / Conv2dSVDO / Conv1dSVDO of ``model`` (in place) by its deployed
    layer: batch norms folded, chains compacted (see the module docstring). The model is put in
    eval mode first (traces see eval-mode code).

    Args:
        model: any module (not itself a sparse-VD layer: see :func:`sparse_layer`).
        threshold: log α pruning threshold; None: each layer's own.
        trace: also look inside non-Sequential modules with torch.fx (else Sequential chains only).

    Returns:
        The deployed layers built, one per sparse-VD layer (a layer reachable under several
        names is replaced at every one of them by the same deployed layer).
    """
    model.eval()
    finder = _Finder(model, trace)
    finder.run()
    if finder.untraced:
        warnings.warn(
            f"deploy: the batch norms inside {len(finder.untraced)} module(s) stay unfolded: their "
            f"forward does not trace with torch.fx (e.g. {finder.untraced[0]}: code that reads a "
            "tensor's size or value, such as int(x.shape[-1])); the deployed model is exact, its "
            "batch norms run as they are", RuntimeWarning, stacklevel=5)
    names: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, SVDO_LAYERS):
            names.setdefault(id(m), []).append(name)
    pending = {ns[0]: _pending(model.get_submodule(ns[0]), threshold) for ns in names.values()}
    folded, exposed = set(), finder.exposed
    for conv, bn_name in finder.folds:
        if conv in exposed or bn_name in exposed:  # read by code besides the call: kept as it is
            continue
        if conv in pending and bn_name not in folded and "folded_bn" not in pending[conv].record:
            bn = model.get_submodule(bn_name)
            if not _fold_bn(pending[conv], bn, bn_name):
                continue
            folded.add(bn_name)
            _set(model, bn_name, set_origin(nn.Identity(), {
                "type": type(bn).__name__, "dense_shape": [bn.num_features], "folded_into": conv,
                "eps": bn.eps, "dtype": str(bn.running_var.dtype).replace("torch.", "")}))
    links, seen = [], set()
    for a, b, ops in finder.links:  # a folded batch norm is the identity in its chain now
        if (a, b) in seen or a in exposed or b in exposed:  # (seen by two traces: forward and
            continue  # feed_forward_chunk; exposed: read by code besides the call)
        seen.add((a, b))
        ops = [(n, model.get_submodule(n) if n in folded else o) for n, o in ops]
        link = _make_link(pending[a].module, [o for _, o in ops], pending[b].module)
        if link is not None:
            link.names = [n for n, _ in ops]
            links.append((a, b, link))
    groups = [g for g in finder.groups if not {g[0][0], g[1][0], g[2][0]} & exposed]
    _compact_groups(pending, groups)  # (before the chains: their layers' other side)
    for chain, chain_links in _chains(links):
        before = [list(link.ops) for link in chain_links]
        _compact_chain([pending[n] for n in chain], chain_links)
        for link, ops in zip(chain_links, before):  # sliced batch norms
            for n, old, new in zip(link.names, ops, link.ops):
                if new is not old and n:
                    _set(model, n, new)
    built = []
    for ns in names.values():
        new = _build(pending[ns[0]])
        for n in ns:
            _set(model, n, new)
        built.append(new)
    return built


# ------------------------------------------------------------------------- dense equivalent
def _expand(t: Tensor, rows: Optional[Tensor], cols: Optional[Tensor], block: int,
            shape: Sequence[int]) -> Tensor:
    """The (shape) tensor holding ``t`` at the kept rows / input channels, zeros elsewhere."""
    full = torch.zeros(tuple(shape), dtype=t.dtype, device=t.device)
    out = full.view(shape[0], -1)
    if cols is not None:
        out = out.view(shape[0], cols.numel(), block)
    src = t.reshape(t.shape[0], -1)
    if cols is not None:
        src = src.view(t.shape[0], int(cols.sum()), block)
    r = torch.arange(shape[0], device=t.device) if rows is None else rows.nonzero().flatten().to(t.device)
    if cols is None:
        out[r] = src
    else:
        c = cols.nonzero().flatten().to(t.device)
        out[r[:, None], c[None, :]] = src
    return full


def dense_state(m: nn.Module, name: str = "module") -> Dict[str, Tensor]:
    """The state (``state_dict`` entries, without prefix) of the module that ``m`` replaced,
    computing what ``m`` computes: a deployed or sparse-VD layer as its dense layer with the
    zero-filled eval-mode weight θ ⊙ [log α < threshold] (``Conv1D`` weights (in, out), the
    compacted rows and columns back at their places, zeros elsewhere); a sliced batch norm with
    neutral statistics on the removed channels (their next layer reads nothing from them); a
    batch norm folded into its convolution as an exact identity (μ = 0, γ = 1, β = 0, σ² with
    σ² + ε = 1 in its dtype).

    A convolution without bias that a batch norm was folded into returns its folded shift
    under :data:`FOLDED_BIAS`: it belongs to the identity batch norm's β.

    Raises:
        ValueError: ``m`` has a bias its original did not have (dead neurons of a layer without
            bias folded into it): no state of the original computes it (``name`` in the message).
    """
    rec = origin(m) or {}
    kind = rec.get("type")
    if isinstance(m, nn.Identity) and "folded_into" in rec:
        return identity_bn_state(rec)
    if isinstance(m, _BATCHNORMS):
        return _expanded_bn(m, rec)
    if isinstance(m, (SparseLinear, SparseConv2d)):
        w = m.to_dense()
        if isinstance(m, SparseConv2d):
            w = w.view(m.out_channels, -1)
        b = m.bias
    elif isinstance(m, SVDO_LAYERS):
        w = (m.weight.detach() * m.mask()).reshape(m.weight.shape[0], -1)
        b = None if m.bias is None else m.bias.detach()
    else:
        raise ValueError(f"{name}: {type(m).__name__} is not a sparsevd module")
    if rec.get("dense_shape"):  # recorded as the replaced module holds it: Conv1D's (in, out)
        shape = list(rec["dense_shape"])
        if kind == "Conv1D":
            shape = [shape[1], shape[0]]
    else:  # the layer's own (out, in, ...), a converted Conv1D's too
        shape = list(m.dense_shape if hasattr(m, "dense_shape") else m.weight.shape)
    rows = mask_from_runs(rec["rows"], shape[0]) if "rows" in rec else None
    cols = None
    block = 1
    if "cols" in rec:
        block = int(rec["col_block"])
        cols = mask_from_runs(rec["cols"], (torch.Size(shape[1:]).numel()) // block)
    full = _expand(w, rows, cols, block, shape)
    state = {"weight": full.t().contiguous() if kind == "Conv1D" else full}
    had_bias = rec.get("bias", b is not None)
    if b is not None:
        bias = _expand(b.reshape(-1, 1), rows, None, 1, [shape[0], 1]).flatten()
        if had_bias:
            state["bias"] = bias
        elif "folded_bn" in rec:  # the folded shift: the identity batch norm's β (the caller's)
            state[FOLDED_BIAS] = bias
        elif bool((bias != 0).any()):
            raise ValueError(
                f"{name}: deploy gave this layer a bias (the folded constants of dead neurons) that "
                f"its original {kind} does not have; no dense state of the original computes the "
                "deployed model: save it with sparsevd.save / sparsevd.hf.save_pretrained instead")
    elif had_bias:
        state["bias"] = torch.zeros(shape[0], dtype=full.dtype, device=full.device)
    return state


def _expanded_bn(bn: nn.Module, rec: dict) -> Dict[str, Tensor]:
    n = rec.get("dense_shape", [bn.num_features])[0]
    keep = mask_from_runs(rec["rows"], n).to(bn.running_mean.device) if "rows" in rec else None
    state = {}
    for key, neutral in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        t = getattr(bn, key)
        if t is None:
            continue
        t = t.detach()
        if keep is not None:
            full = torch.full((n,), neutral, dtype=t.dtype, device=t.device)
            full[keep] = t
            t = full
        state[key] = t
    state["num_batches_tracked"] = bn.num_batches_tracked.detach()
    return state


def identity_bn_state(rec: dict) -> Dict[str, Tensor]:
    """Batch-norm statistics under which eval-mode batch norm is the identity: (x − 0) /
    sqrt(v + ε) · 1 + 0 with fl(v + ε) = 1 in float32 (exact for float32 batch norms, whose
    kernels add ε in float32; float16 / bfloat16 ones, which store v rounded, within a relative
    1e-5 before their own rounding)."""
    n, eps = rec["dense_shape"][0], rec["eps"]
    dtype = getattr(torch, rec.get("dtype", "float32"))
    one = torch.tensor(1.0, dtype=torch.float32)
    v = one - torch.tensor(eps, dtype=torch.float32)
    for _ in range(64):  # move v by ulps until v + ε rounds to exactly 1
        s = v + torch.tensor(eps, dtype=torch.float32)
        if s == one:
            break
        v = torch.nextafter(v, -torch.inf * torch.sign(s - one))
    return {"weight": torch.ones(n, dtype=dtype), "bias": torch.zeros(n, dtype=dtype),
            "running_mean": torch.zeros(n, dtype=dtype), "running_var": v.to(dtype).expand(n).clone(),
            "num_batches_tracked": torch.tensor(0)}
