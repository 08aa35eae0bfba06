"""Training layers of sparse variational dropout: drop-in replacements of nn.Linear / nn.Conv2d /
nn.Conv1d.

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369): sec. 4 (additive reparameterization, LRT), eq. 14 (KL).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import functional as SF
from .._args import IntOrPair, Padding, as_pair, as_single, check_groups, check_threshold
from ..ops.conv_geometry import conv_padding
from ..ops.weights import eval_mask

#: True when autocast is on for any device (a private torch helper, 5x cheaper than asking per
#: device type; the public per-device check where it is missing).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))

#: log σ² at initialisation: σ ≈ 0.0067, so a converted layer starts close to its deterministic
#: twin; weights with |θ| ≲ e^-6.5 ≈ 1.5e-3 already have log α ≥ 3 and are dropped at evaluation.
LOG_SIGMA2_INIT = -10.0
#: Default pruning threshold on log α (α = e³ ≈ 20, dropout rate p ≈ 0.95).
DEFAULT_THRESHOLD = 3.0


#: Counts optimizer steps of every torch.optim optimizer (a global post-step hook, registered once
#: at import). Part of the eval cache's key: fused optimizers (``Adam(fused=True)``, what
#: sparsevd.train.adam uses) update the parameters without bumping their version counters, so the
#: counters alone would serve a stale masked weight after a step.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _version(t: Tensor) -> int:
    """The version counter of ``t``; -1 for an inference tensor (it has none, and cannot change
    outside inference mode: a layer built under torch.inference_mode())."""
    return -1 if t.is_inference() else t._version


#: The attribute holding the record of the module a layer replaced (:mod:`sparsevd.surgery`).
ORIGIN_ATTR = "sparsevd_origin"
#: The key under which a transformers checkpoint of a converted model (``save_pretrained``,
#: :mod:`sparsevd.hf_integration`) stores θ of the dropped weights beside ``weight`` = θ ⊙ mask.
PRUNED_KEY = "sparsevd_pruned_weight"


class _SVDOMixin:
    """What LinearSVDO and Conv2dSVDO share: log α, the KL, the mask and the sparsity."""

    weight: nn.Parameter
    log_sigma2: nn.Parameter

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A transformers checkpoint of the converted model (weight = θ ⊙ mask, θ of the dropped
        # weights under PRUNED_KEY, a transformers Conv1D's tensors as (in, out)) loads by plain
        # load_state_dict too, as the HF Trainer resumes: θ = weight + pruned (one of the two is
        # ±0 at every position). (state_dict is load_state_dict's own copy.)
        pruned = state_dict.pop(prefix + PRUNED_KEY, None)
        if pruned is not None:
            names = [prefix + k for k in ("weight", "log_sigma2")]
            if (getattr(self, ORIGIN_ATTR, None) or {}).get("type") == "Conv1D":
                for k in names:
                    if k in state_dict:
                        state_dict[k] = state_dict[k].t()
                pruned = pruned.t()
            w = state_dict.get(names[0])
            if w is not None and w.shape == pruned.shape:
                state_dict[names[0]] = w + pruned
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _init_svdo(self, threshold: float, train_clip: bool) -> None:
        self.threshold = threshold
        if not isinstance(train_clip, bool):
            raise TypeError(f"train_clip: expected a bool, got {train_clip!r}")
        #: Train-time clipping: in training mode the weights with log α ≥ ``threshold`` are
        #: dropped from the LRT's mean and variance and get no LRT gradient (the KL still sees
        #: them), as in the authors' code; applied inside the fused kernels.
        self.train_clip = train_clip

    @property
    def _clip_threshold(self) -> Optional[float]:
        """The ``clip_threshold`` of the training forward: ``threshold`` with train_clip, else None."""
        return self._threshold if self.train_clip else None

    @property
    def threshold(self) -> float:
        """log α above which a weight is dropped at evaluation (a finite float; setting NaN, inf
        or a non-number raises)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)

    @property
    def log_alpha(self) -> Tensor:
        """log α = clamp(log σ² − log(θ² + 1e-8), −10, 10), shape of ``weight`` (eq. 8)."""
        return SF.log_alpha(self.weight, self.log_sigma2)

    def kl(self) -> Tensor:
        """KL(q‖p) of this layer, a 0-dim fp32 tensor in nats (eq. 14)."""
        return SF.kl_sparse_vd(self.weight, self.log_sigma2)

    @torch.no_grad()
    def mask(self, threshold: Optional[float] = None) -> Tensor:
        """Boolean mask of the weights kept at evaluation, log α < threshold (the layer's own
        ``threshold`` unless one is given), shape of ``weight``."""
        SF.check_parameters(self.weight, self.log_sigma2)
        t = self.threshold if threshold is None else threshold
        return eval_mask(self.weight, self.log_sigma2, t)

    def _eval_params(self, dtype: torch.dtype):
        """(θ ⊙ [log α < threshold], b) detached, in ``dtype``, cached until a parameter changes
        (its version counter or its storage; moving or casting the module drops the cache), a
        torch.optim optimizer steps (fused ones do not bump the version counters; see
        ``_optimizer_steps``), the module switches between train and eval mode, the threshold
        changes or another dtype is asked for (autocast); the parameters are checked for NaN / inf
        when the cache is (re)built, once per change. An update that none of these sees (a custom
        kernel writing the parameters in place without bumping their versions) needs
        ``module.train(); module.eval()`` or ``del module._eval_cache`` afterwards.

        The cache is never an inference tensor: built during a call under
        ``torch.inference_mode()``, it is made outside that mode, so that a later call with an
        input that requires grad can save it for the backward (as nn.Linear's weight can be)."""
        p = self._parameters  # (not self.weight: nn.Module.__getattr__ costs a microsecond)
        w, s, b = p["weight"], p["log_sigma2"], p.get("bias")
        key = (_version(w), _version(s), w.data_ptr(), s.data_ptr(), self._threshold, dtype,
               None if b is None else (_version(b), b.data_ptr()), _optimizer_steps[0])
        cache = self.__dict__.get("_eval_cache")
        if cache is None or cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                wm = (w.detach() * self.mask().to(w.dtype)).to(dtype)
                bm = None if b is None else b.detach().to(dtype)
            cache = (key, wm, bm)
            self.__dict__["_eval_cache"] = cache
        return cache[1], cache[2]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_eval_cache", None)  # .to(), .half(), .cuda(): new parameters
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self.__dict__.pop("_eval_cache", None)  # model.eval() after training: always rebuilt
        return super().train(mode)

    def _eval_uncached(self) -> bool:
        """The eval forward takes the functional path (no cache): gradients to compute (grad
        mode on and a parameter requiring them; they reach the kept weights only) or tracing
        by torch.compile."""
        if torch.is_grad_enabled():
            p = self._parameters
            b = p.get("bias")
            if p["weight"].requires_grad or (b is not None and b.requires_grad):
                return True
        return torch.compiler.is_compiling()

    @property
    def num_weights(self) -> int:
        """Number of weights (the bias excluded)."""
        return self.weight.numel()

    @property
    def num_nonzero(self) -> int:
        """Number of weights kept at ``threshold``."""
        return int(self.mask().sum())

    @property
    def sparsity(self) -> float:
        """Fraction of weights dropped at ``threshold``, in [0, 1]."""
        return 1.0 - self.num_nonzero / max(self.num_weights, 1)

    def _reset_weight_and_bias(self, fan_in: int) -> None:
        # The initialisation of nn.Linear / nn.Conv2d (kaiming uniform with a = sqrt(5)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.log_sigma2.fill_(LOG_SIGMA2_INIT)

    def _svdo_repr(self) -> str:
        clip = ", train_clip=True" if self.train_clip else ""
        return f"threshold={self.threshold}{clip}, sparsity={100.0 * self.sparsity:.1f}%"


class LinearSVDO(_SVDOMixin, nn.Module):
    """Linear layer with sparse variational dropout; drop-in replacement of ``nn.Linear``.

    Parameters: ``weight`` θ (out_features, in_features) and ``bias`` (out_features,), initialised
    as nn.Linear; ``log_sigma2`` log σ² (out_features, in_features), initialised to −10. An
    nn.Linear state_dict loads into it with only ``log_sigma2`` missing.

    Training mode: the LRT forward with fresh noise, y = xθᵀ + b + sqrt((x⊙x)(σ²)ᵀ + 1e-8)⊙ξ;
    non-finite parameters are not looked for at every call (that would cost a pass and a sync per
    layer): they give a non-finite output, and :func:`sparsevd.train.fit` stops a diverging run
    naming the layer. Eval mode: y = x(θ ⊙ [log α < threshold])ᵀ + b, deterministic; NaN / inf
    parameters raise.

    Args:
        in_features, out_features: sizes; input (*, in_features), output (*, out_features).
        bias: learn an additive bias.
        threshold: log α above which a weight is dropped at evaluation (3.0: α ≈ 20).
        train_clip: also drop those weights in training mode (train-time clipping, see
            :attr:`train_clip`).
        device, dtype: of the parameters.

    Raises (at forward): TypeError / ValueError naming the argument for a wrong dtype, device or
    shape of the input, or (eval mode) NaN / inf parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        train_clip: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if in_features < 0 or out_features < 0:
            raise ValueError(
                f"in_features, out_features: expected non-negative sizes, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.log_sigma2 = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._init_svdo(threshold, train_clip)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise θ and b as nn.Linear does, and log σ² to −10."""
        self._reset_weight_and_bias(self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return SF.lrt_linear(x, self.weight, self.log_sigma2, self.bias, check_finite=False,
                                 clip_threshold=self._clip_threshold)
        if self._eval_uncached():
            return SF.masked_linear(x, self.weight, self.log_sigma2, self.bias, self.threshold)
        w = self._parameters["weight"]
        if not (isinstance(x, Tensor) and x.dtype == w.dtype and x.device == w.device and x.dim()
                and x.shape[-1] == self.in_features and not _any_autocast()):
            x = SF.check_linear_input(x, w, self.bias)  # the messages, or the autocast cast
        return F.linear(x, *self._eval_params(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._svdo_repr()}"
        )


def conv_repr(m: nn.Module) -> str:
    """The nn.Conv2d-style part of a convolution layer's repr (channels, kernel, non-defaults)."""
    s = f"{m.in_channels}, {m.out_channels}, kernel_size={m.kernel_size}, stride={m.stride}"
    ones = (1,) * len(m.kernel_size)
    if m.padding != (0,) * len(m.kernel_size):
        s += f", padding={m.padding}"
    if m.dilation != ones:
        s += f", dilation={m.dilation}"
    if m.groups != 1:
        s += f", groups={m.groups}"
    return s


class Conv2dSVDO(_SVDOMixin, nn.Module):
    """2-D convolution with sparse variational dropout; drop-in replacement of ``nn.Conv2d``.

    Parameters: ``weight`` θ (out_channels, in_channels/groups, kH, kW) and ``bias``
    (out_channels,), initialised as nn.Conv2d; ``log_sigma2`` of θ's shape, initialised to −10.

    Training mode: LRT, y = conv(x, θ) + b + sqrt(conv(x⊙x, σ²) + 1e-8)⊙ξ (the bias never enters
    the variance). Eval mode: conv with θ ⊙ [log α < threshold], deterministic.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in
            nn.Conv2d (zero padding: ints, a pair, "valid", or "same" with stride 1; an even
            kernel pads one more at the bottom / right, as torch does). Input (N, C_in, H, W) or
            (C_in, H, W).
        threshold: log α above which a weight is dropped at evaluation.
        train_clip: as in :class:`LinearSVDO`.
        device, dtype: of the parameters.

    Raises: ValueError for channels not divisible by ``groups``, an unknown padding string or
    padding="same" with a stride; at forward as :class:`LinearSVDO`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        train_clip: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        check_groups(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.dilation = as_pair(dilation, "dilation")
        #: (top, bottom, left, right), what ``padding`` resolves to (docs: sparsevd.ops.conv_geometry.conv_padding)
        self.padding_sides = conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        #: as given: a pair of ints, or the string "same" / "valid" (as nn.Conv2d keeps it)
        self.padding = padding if isinstance(padding, str) else as_pair(padding, "padding")
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.log_sigma2 = nn.Parameter(torch.empty(shape, **factory))
        self._init_svdo(threshold, train_clip)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise θ and b as nn.Conv2d does, and log σ² to −10."""
        self._reset_weight_and_bias(self.weight[0].numel())

    def forward(self, x: Tensor) -> Tensor:
        args = (self.stride, self.padding, self.dilation, self.groups)
        if self.training:
            return SF.lrt_conv2d(x, self.weight, self.log_sigma2, self.bias, *args,
                                 check_finite=False, clip_threshold=self._clip_threshold)

        if self._eval_uncached():
            return SF.masked_conv2d(x, self.weight, self.log_sigma2, self.bias, *args,
                                    threshold=self.threshold)
        x, unbatched, *_ = SF.check_conv2d_args(x, self.weight, self.log_sigma2, self.bias, *args,
                                            check_finite=False)
        y = F.conv2d(x, *self._eval_params(x.dtype), *args)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return conv_repr(self) + f", bias={self.bias is not None}, {self._svdo_repr()}"


class Conv1dSVDO(_SVDOMixin, nn.Module):
    """1-D convolution with sparse variational dropout; drop-in replacement of ``nn.Conv1d``
    (its state_dict loads: ``weight`` keeps nn.Conv1d's 3-D shape).

    Parameters: ``weight`` θ (out_channels, in_channels/groups, k) and ``bias`` (out_channels,),
    initialised as nn.Conv1d; ``log_sigma2`` of θ's shape, initialised to −10.

    Training mode: LRT on the fused 2-D kernels (:func:`sparsevd.functional.lrt_conv1d`: the
    input viewed as (N, C_in, 1, L), the kernel as (1, k)), y = conv1d(x, θ) + b +
    sqrt(conv1d(x⊙x, σ²) + 1e-8)⊙ξ. Eval mode: conv1d with θ ⊙ [log α < threshold].

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in
            nn.Conv1d (zero padding: an int, "valid", or "same" with stride 1). Input
            (N, C_in, L) or (C_in, L).
        threshold, train_clip: as in :class:`LinearSVDO`.
        device, dtype: of the parameters.

    Raises: ValueError for channels not divisible by ``groups``, an unknown padding string,
    padding="same" with a stride, or a kernel_size / stride / padding / dilation that is not an
    int (or a sequence of one); at forward as :class:`LinearSVDO`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        train_clip: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        check_groups(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        # 1-tuples, as nn.Conv1d keeps them
        self.kernel_size = (as_single(kernel_size, "kernel_size", 1),)
        self.stride = (as_single(stride, "stride", 1),)
        self.dilation = (as_single(dilation, "dilation", 1),)
        conv_padding(padding if isinstance(padding, str) else (0, as_single(padding, "padding", 0)),
                     (1, self.kernel_size[0]), (1, self.stride[0]), (1, self.dilation[0]))
        self.padding = padding if isinstance(padding, str) else (as_single(padding, "padding", 0),)
        self.groups = groups
        shape = (out_channels, in_channels // groups, self.kernel_size[0])
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.log_sigma2 = nn.Parameter(torch.empty(shape, **factory))
        self._init_svdo(threshold, train_clip)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise θ and b as nn.Conv1d does, and log σ² to −10."""
        self._reset_weight_and_bias(self.weight[0].numel())

    def forward(self, x: Tensor) -> Tensor:
        args = (self.stride, self.padding, self.dilation, self.groups)
        if self.training:
            return SF.lrt_conv1d(x, self.weight, self.log_sigma2, self.bias, *args,
                                 check_finite=False, clip_threshold=self._clip_threshold)
        if self._eval_uncached():
            return SF.masked_conv1d(x, self.weight, self.log_sigma2, self.bias, *args,
                                    threshold=self.threshold)
        x4, w4, s4, stride, padding, dilation, unbatched = SF.check_conv1d_args(
            x, self.weight, self.log_sigma2, self.bias, *args, check_finite=False)
        # channels, length vs kernel, dtype and autocast, as the 2-D layer checks them
        x4 = SF.check_conv2d_args(x4, w4, s4, self.bias, stride, padding, dilation, self.groups,
                              check_finite=False)[0]
        y = F.conv1d(x4.squeeze(-2), *self._eval_params(x4.dtype), *args)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return conv_repr(self) + f", bias={self.bias is not None}, {self._svdo_repr()}"


SVDO_LAYERS = (LinearSVDO, Conv2dSVDO, Conv1dSVDO)
