"""``deploy(model)``: turn a model trained with sparse VD into a sparse inference model.

Steps (docs/design.md, "Deployment"):

1. Every LinearSVDO / Conv2dSVDO keeps the weights with log α < threshold (its eval-mode weight).
2. Batch norms right after a convolution (its only user) are folded into it
   (:mod:`sparsevd.surgery`).
3. Chains. Consecutive SVD layers joined only by channel-wise modules (elementwise activations,
   dropout, batch norm with running statistics (its per-channel tensors are sliced with the kept
   channels), max/avg pooling, one ``Flatten`` between a convolution and a linear layer) form a
   chain: inside an ``nn.Sequential``, and inside any module whose code torch.fx traces (the MLP
   of a BERT layer or of GPT-2, a user's ``fc2(act(fc1(x)))``; :mod:`sparsevd.surgery`). Between
   two layers of a chain, a neuron (a feature, or a channel) is removed when
   - its column in the next layer is all zero (nobody reads it), or
   - its row in this layer is all zero (a *dead* neuron): its output is the constant act(b), which
     is folded into the next layer's bias, b' = b + Σ W_next[:, neuron] · act(b) (summed over the
     spatial positions for conv → flatten → linear, and over the kernel for conv → conv without
     padding). A constant that cannot be folded exactly (conv → conv with zero padding, average
     pooling that counts the padding) keeps its neuron unless act(b) = 0.
   Removal repeats until nothing changes (a removed neuron can leave another one dead or unread).
   The activations between the layers of a chain stay compact; the chain's input and output keep
   their sizes, so the model's interface is unchanged. SVD layers outside chains are converted
   one by one, dead rows kept as empty CSR rows (their output is the bias).
4. What remains becomes a :class:`~sparsevd.nn.SparseLinear` / :class:`~sparsevd.nn.SparseConv2d`.
5. A cost model (see :func:`plan_layer`) picks per layer, on the thread count the model will run
   on, one format for every batch size: CSR (values in the layer's dtype, int32 row pointers,
   uint16 column indices when a layer has at most 65536 input columns, else int32) where it is
   smaller than the dense weight and measures faster than the dense product at every batch
   bucket, else the zero-filled dense weight and the dense model's own product. A deployed layer
   is so never bigger and never measured slower than the dense one.

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369): weights with log α > 3 are dropped at test time (sec. 5).
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .compare import dense_bytes, dense_twin, deployed_bytes, latency  # re-exported (their old home)
from .hf_integration import attach as attach_hf_quantizer
from .nn.sparse import CONV_MODES, LINEAR_MODES, SPARSE_LAYERS, SparseConv2d
from .nn.svdo import SVDO_LAYERS
from .ops import library
from .ops.library import kernel_available
from .planner import (BATCH_BUCKETS, check_example_input, check_threads,  # some re-exported too
                      csr_bytes, dense_weight_bytes, plan_layer, plan_model, rule_mode)
from .surgery import deployed_layer, replace_layers

__all__ = [
    "BATCH_BUCKETS",
    "csr_bytes",
    "deploy",
    "dense_weight_bytes",
    "dense_bytes",
    "dense_twin",
    "deployed_bytes",
    "latency",
    "plan_layer",
    "plan_model",
    "rule_mode",
    "SPARSE_LAYERS",
]


# ------------------------------------------------------------------------------------ deploy
@torch.no_grad()
def deploy(
    model: nn.Module,
    example_input: Union[Tensor, tuple, list, dict, None] = None,
    *,
    cost_model: str = "measure",
    threshold: Optional[float] = None,
    buckets: Sequence[int] = BATCH_BUCKETS,
    trace: bool = True,
    threads: Optional[int] = None,
) -> nn.Module:
    """A new inference model in which every LinearSVDO / Conv2dSVDO becomes a SparseLinear /
    SparseConv2d (batch norms folded, dead neurons removed and folded, see the module docstring
    and :mod:`sparsevd.surgery`), its weight stored as CSR where that is smaller and faster than
    the dense layer, else dense (see :func:`plan_layer`).

    Args:
        model: a module with sparse-VD layers (e.g. ``sparsevd.models.LeNet300()`` after
            training); left unchanged. Other modules are copied as they are.
        example_input: a batch of inputs of the model (any batch size, batch first, e.g.
            (1, 1, 28, 28) images or (1, T) token ids): a Tensor (``model(x)``), a tuple of
            positional arguments (``model(*args)``) or a dict of keyword arguments
            (``model(**kwargs)``: an encoder-decoder's ``{"input_ids": ..., "decoder_input_ids":
            ...}``); used to measure the convolutions at their real input size and the linear
            layers at their rows per sample (T tokens). Optional (without it a linear layer's
            bucket is that many rows).
        cost_model: ``"measure"`` (time CSR against the dense product on this machine at each
            batch bucket, on ``threads`` threads; see :func:`plan_layer`), ``"rule"``
            (:func:`rule_mode`, no timing), or a mode ("csr", "dense", "masked") forced on every
            layer that has it (convolutions fall back to "dense" when the mode is "masked").
        threshold: log α pruning threshold for every layer; default: each layer's own.
        buckets: batch sizes the plan distinguishes.
        trace: also fold batch norms and remove dead neurons inside modules other than
            nn.Sequential, found by torch.fx traces of their code (BERT / GPT-2 MLP blocks, a
            user's ``fc2(act(fc1(x)))``; :mod:`sparsevd.surgery`); False: Sequential chains only.
        threads: intra-op threads the deployed model will run on, which the cost model measures
            with (default: ``torch.get_num_threads()`` at the call); recorded on each measured
            layer as ``plan_threads``.

    Returns:
        The deployed model, in eval mode, on the device and in the dtype of ``model``. Its outputs
        equal the eval-mode outputs of ``model`` up to floating-point rounding. A Hugging Face
        model (or one inside it) gets the sparsevd quantizer: its ``save_pretrained`` writes a
        checkpoint that ``from_pretrained`` reloads exactly (:mod:`sparsevd.hf_integration`).

    Raises:
        TypeError: ``model`` not an nn.Module, ``example_input`` of another type.
        ValueError: the model raised on ``example_input`` (its message inside), an invalid
            ``threads``.

    Warns:
        RuntimeWarning when the compiled kernels (sparsevd._C) are missing: the deployed layers
        then use torch's dense / sparse kernels; the message says how to build them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    run_threads = check_threads(threads)
    check_example_input(example_input)
    # One intra-op thread while deploying (restored after): the build is many small tensor ops
    # (masks, nonzero, CSR, checks), and on shared cores each OpenMP region of a multi-threaded
    # op waits for its descheduled threads: the 37 layers of a 6-layer transformer deployed in
    # 19 s on 2 loaded cores vs 1.3 s on one (benchmarks/NOTES.md, "Deployed overhead"). The
    # cost model sets the model's thread count while it times.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _deploy(model, example_input, cost_model, threshold, buckets, trace, run_threads)
    finally:
        torch.set_num_threads(old)


def _deploy(model, example_input, cost_model, threshold, buckets, trace, threads) -> nn.Module:
    if isinstance(model, SVDO_LAYERS):
        new = deployed_layer(model, threshold)
        built = [new]
    else:
        new = copy.deepcopy(model)
        built = replace_layers(new, threshold, trace)
    if not built:
        warnings.warn("deploy: the model has no LinearSVDO / Conv2dSVDO layers; nothing to deploy",
                      RuntimeWarning, stacklevel=4)
    devices = {m.stored_weight.device for m in built}
    for d in devices:
        if not kernel_available(d):
            warnings.warn(
                f"deploy: the compiled sparsevd._C kernels are not available for {d.type} "
                f"({library.unavailable_reason() or 'built without CUDA'}); the deployed layers fall "
                f"back to torch's dense kernels. To get the sparse kernels, {library.BUILD_HINT}.",
                RuntimeWarning, stacklevel=4,
            )
    new.eval().requires_grad_(False)  # an inference model (csr_linear has no autograd formula)
    if cost_model in ("measure", "rule"):
        plan_model(new, example_input, cost_model, buckets, threads)
    else:
        for m in built:
            mode = cost_model
            if isinstance(m, SparseConv2d) and mode not in CONV_MODES:
                mode = "dense"
            if mode not in LINEAR_MODES:
                raise ValueError(
                    f"cost_model: expected 'measure', 'rule' or one of {LINEAR_MODES}, got {cost_model!r}"
                )
            if mode == "csr" and isinstance(m, SparseConv2d) and m.groups != 1:
                mode = "dense"
            m.set_plan(mode)
    attach_hf_quantizer(new)  # save_pretrained writes a model from_pretrained rebuilds
    return new
