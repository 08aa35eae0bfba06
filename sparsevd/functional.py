"""Functional interface of sparse variational dropout, with argument checks.

Every function validates its arguments (dtype, device, shape, NaN parameters) and raises an error
that names the offending argument, then calls the ``sparsevd`` custom ops of the op families
(:mod:`sparsevd.ops.lrt_linear`, :mod:`sparsevd.ops.lrt_conv2d`, :mod:`sparsevd.ops.kl`), which run
the fused kernels or the reference math depending on the device and ``SPARSEVD_BACKEND``. The
checks are public (:func:`check_parameters`, :func:`check_linear_input`,
:func:`check_conv2d_args`, :func:`check_conv1d_args`): the layers call them too.

Source: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (arXiv:1701.05369).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._args import IntOrPair, Padding, as_pair, as_single, check_threshold
from .ops import kl as _kl
from .ops.checks import check_device_of, check_dtype_of, check_float
from .ops.conv_geometry import conv2d, conv_padding, padding_arg
from .ops.lrt_conv2d import run_lrt_conv2d
from .ops.lrt_linear import run_lrt_linear
from .ops.noise import draw_seed
from .ops import library as _library
from .ops.weights import eval_mask, masked_weight

#: Check ``log_sigma2`` and ``weight`` for NaN and ±inf at every call of the functions below (one
#: reduction per parameter, and a host sync on GPU), unless a call passes ``check_finite=False``.
#: Skipped inside ``torch.compile``. Set to False to skip it in eager mode too. The training layers
#: do not check per call: a diverging run is stopped by the training loop (sparsevd.train.fit,
#: from the loss of every step, with the layer named).
CHECK_NAN = True


def _check_finite(t: Tensor, name: str, enabled: Optional[bool]) -> None:
    enabled = CHECK_NAN if enabled is None else enabled
    if (enabled and not t.is_meta and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(t).all())):
        kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
        raise ValueError(f"{name}: contains {kind} values; the training has diverged")


def check_parameters(weight: Tensor, log_sigma2: Tensor, check_finite: Optional[bool] = None) -> None:
    """Validate a layer's θ and log σ²: floating, same shape, dtype and device, finite.

    Args:
        check_finite: look for NaN and ±inf (a reduction per tensor and a host sync on GPU);
            None: :data:`CHECK_NAN`.

    Raises:
        TypeError: a non-tensor or non-floating argument, or mismatched dtypes.
        ValueError: mismatched shapes or devices, or NaN / infinite values (the message names the
            argument).
    """
    check_float(weight, "weight")
    check_float(log_sigma2, "log_sigma2")
    if log_sigma2.shape != weight.shape:
        raise ValueError(
            f"log_sigma2: expected shape {tuple(weight.shape)} (the shape of weight), "
            f"got {tuple(log_sigma2.shape)}"
        )
    check_dtype_of(log_sigma2, "log_sigma2", weight, "weight")
    check_device_of(log_sigma2, "log_sigma2", weight, "weight")
    _check_finite(log_sigma2, "log_sigma2", check_finite)
    _check_finite(weight, "weight", check_finite)


def _prepare_input(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    check_float(x, "x")
    check_device_of(x, "x", weight, "weight")
    if bias is not None:
        check_float(bias, "bias")
        check_dtype_of(bias, "bias", weight, "weight")
        check_device_of(bias, "bias", weight, "weight")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias: expected shape ({weight.shape[0]},) (out_features), got {tuple(bias.shape)}"
            )
    device_type = x.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: shapes only
        # Low-precision activations, fp32 parameters and accumulation (mixed precision).
        return x.to(torch.get_autocast_dtype(device_type))
    check_dtype_of(x, "x", weight, "weight")
    return x


def _prepare_seed(seed: Optional[Tensor], x: Tensor) -> Tensor:
    if seed is None:
        return draw_seed(x.device)
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed: expected a one-element int64 tensor (see sparsevd.functional.draw_seed)")
    check_device_of(seed, "seed", x, "x")
    return seed.reshape(1)


def _clip_arg(clip_threshold: Optional[float]) -> Optional[float]:
    return None if clip_threshold is None else check_threshold(clip_threshold, "clip_threshold")


def _check_linear(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                  check_finite: Optional[bool] = None) -> Tensor:
    check_parameters(weight, log_sigma2, check_finite)
    if weight.dim() != 2:
        raise ValueError(
            f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}"
        )
    return check_linear_input(x, weight, bias)


def check_linear_input(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Validate the input of a linear layer with parameters ``weight`` (out_features,
    in_features) and ``bias``; returns x, cast to the autocast dtype under autocast.

    Raises:
        TypeError / ValueError as :func:`lrt_linear` (the parameters themselves are not checked).
    """
    x = _prepare_input(x, weight, bias)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: expected shape (*, in_features={weight.shape[1]}), got {tuple(x.shape)}"
        )
    return x


def check_conv2d_args(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                      stride: IntOrPair, padding: Padding, dilation: IntOrPair, groups: int,
                      check_finite: Optional[bool] = None):
    """Validate the arguments of a 2-D sparse-VD convolution as :func:`lrt_conv2d` takes them and
    return what its op takes: (x (N, C_in, H, W), cast to the autocast dtype under autocast; whether
    x came unbatched (C_in, H, W); stride [s_h, s_w]; padding, the op's list (symmetric [p_h, p_w]
    or [top, bottom, left, right], :func:`sparsevd.ops.conv_geometry.padding_arg`); dilation).

    Raises:
        TypeError / ValueError: as :func:`lrt_conv2d`, each naming the argument.
    """
    check_parameters(weight, log_sigma2, check_finite)
    if weight.dim() != 4:
        raise ValueError(
            f"weight: expected a 4-D (C_out, C_in/groups, kH, kW) tensor, got {tuple(weight.shape)}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
            or weight.shape[0] % groups:
        raise ValueError(
            f"groups: expected a positive int dividing out_channels={weight.shape[0]}, "
            f"got {groups!r}"
        )
    stride_p = list(as_pair(stride, "stride", 1))
    dilation_p = list(as_pair(dilation, "dilation", 1))
    sides = conv_padding(padding, tuple(weight.shape[2:]), stride_p, dilation_p)
    x = _prepare_input(x, weight, bias)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"x: expected shape (N, in_channels={weight.shape[1] * groups}, H, W), got {tuple(x.shape)}"
        )
    for i, (size, name) in enumerate(((x.shape[2], "H"), (x.shape[3], "W"))):
        span = dilation_p[i] * (weight.shape[2 + i] - 1) + 1
        if size + sides[2 * i] + sides[2 * i + 1] < span:
            raise ValueError(
                f"x: the padded input is smaller than the dilated kernel along {name} "
                f"({size} + padding {sides[2 * i]}+{sides[2 * i + 1]} < {span}); got shape {tuple(x.shape)}"
            )
    return x, unbatched, stride_p, padding_arg(sides), dilation_p


def check_conv1d_args(x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor],
                      stride: IntOrPair, padding: Padding, dilation: IntOrPair, groups: int,
                      check_finite: Optional[bool] = None):
    """A 1-D convolution as the 2-D one over (N, C, 1, L) with a (1, k) kernel: checks the 1-D
    shapes and returns the arguments of the 2-D convolution, (x4 (N, C_in, 1, L) or (C_in, 1, L),
    weight4 and log_sigma2_4 (C_out, C_in / groups, 1, k), stride (1, s), padding (0, p) or the
    string, dilation (1, d), whether x came unbatched), the tensors as views; the 2-D checks
    (:func:`check_conv2d_args`) come after.

    Raises:
        TypeError / ValueError: as :func:`lrt_conv1d`, each naming the argument.
    """
    check_parameters(weight, log_sigma2, check_finite)
    if weight.dim() != 3:
        raise ValueError(
            f"weight: expected a 3-D (C_out, C_in/groups, k) tensor, got {tuple(weight.shape)}"
        )
    check_float(x, "x")
    if x.dim() not in (2, 3):
        raise ValueError(
            f"x: expected shape (N, in_channels, L) or (in_channels, L), got {tuple(x.shape)}")
    stride2 = (1, as_single(stride, "stride", 1))
    dilation2 = (1, as_single(dilation, "dilation", 1))
    padding2 = padding if isinstance(padding, str) else (0, as_single(padding, "padding", 0))
    return (x.unsqueeze(-2), weight.unsqueeze(-2), log_sigma2.unsqueeze(-2), stride2, padding2,
            dilation2, x.dim() == 2)


def lrt_linear(
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    bias: Optional[Tensor] = None,
    *,
    seed: Optional[Tensor] = None,
    check_finite: Optional[bool] = None,
    clip_threshold: Optional[float] = None,
) -> Tensor:
    """Linear layer with the local reparameterization trick (training forward of sparse VD).

    y = x θᵀ + b + sqrt((x ⊙ x)(σ²)ᵀ + 1e-8) ⊙ ξ, ξ ~ N(0, 1) drawn per output element from
    ``seed`` (paper, sec. 4.2; docs/design.md, "The math").

    Args:
        x: (*, in_features), floating; under ``torch.autocast`` cast to the autocast dtype.
        weight: θ, (out_features, in_features).
        log_sigma2: log σ², (out_features, in_features), same dtype as ``weight``.
        bias: (out_features,) or None.
        seed: one-element int64 tensor on x's device; None draws one from torch's generator.
        check_finite: raise on NaN / ±inf in ``weight`` or ``log_sigma2`` (a reduction each and a
            host sync on GPU); None: :data:`CHECK_NAN`. The layers pass False.
        clip_threshold: train-time clipping (the authors' code): the weights with
            log α ≥ ``clip_threshold`` enter neither the mean nor the variance, and their LRT
            gradients are zero (the KL still sees them); applied inside the kernels. None: off.

    Returns:
        y, (*, out_features), dtype of ``x`` (the autocast dtype under autocast). An empty batch
        gives an empty output.

    Raises:
        TypeError: non-floating or mismatched dtypes, a malformed ``seed``, a non-real
            ``clip_threshold``.
        ValueError: mismatched shapes (``x``'s last dim ≠ in_features) or devices, NaN in
            ``weight`` or ``log_sigma2``, a weight that is not 2-D, a NaN / infinite
            ``clip_threshold``.
    """
    x = _check_linear(x, weight, log_sigma2, bias, check_finite)
    seed = _prepare_seed(seed, x)
    clip = _clip_arg(clip_threshold)
    return run_lrt_linear(x, weight, log_sigma2, bias, seed, clip)


def lrt_conv2d(
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    seed: Optional[Tensor] = None,
    check_finite: Optional[bool] = None,
    clip_threshold: Optional[float] = None,
) -> Tensor:
    """2-D convolution with the local reparameterization trick.

    y = conv(x, θ) + b + sqrt(conv(x ⊙ x, σ²) + 1e-8) ⊙ ξ; the bias never enters the variance.

    Args:
        x: (N, C_in, H, W) or unbatched (C_in, H, W), floating.
        weight: θ, (C_out, C_in / groups, kH, kW).
        log_sigma2: log σ², same shape and dtype as ``weight``.
        bias: (C_out,) or None.
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d``: padding an int,
            a pair of ints, "valid" (none) or "same" (stride 1 only; the output keeps the input's
            size, an even kernel pads one more at the bottom / right, as torch does).
        seed: one-element int64 tensor on x's device; None draws one.
        check_finite, clip_threshold: as :func:`lrt_linear`.

    Returns:
        y, (N, C_out, H_out, W_out) (or unbatched), dtype of ``x``.

    Raises:
        TypeError / ValueError as :func:`lrt_linear`; ValueError when the channels do not match,
            when the padded input is smaller than the dilated kernel, for a stride, padding,
            dilation or groups that is not a (pair of) int(s) in range, an unknown padding string,
            or padding="same" with a stride (each message names the argument).
    """
    x, unbatched, stride, padding, dilation = check_conv2d_args(
        x, weight, log_sigma2, bias, stride, padding, dilation, groups, check_finite
    )
    seed = _prepare_seed(seed, x)
    clip = _clip_arg(clip_threshold)
    y = run_lrt_conv2d(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip)
    return y.squeeze(0) if unbatched else y


def lrt_conv1d(
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    seed: Optional[Tensor] = None,
    check_finite: Optional[bool] = None,
    clip_threshold: Optional[float] = None,
) -> Tensor:
    """1-D convolution with the local reparameterization trick, on the 2-D kernels.

    y = conv1d(x, θ) + b + sqrt(conv1d(x ⊙ x, σ²) + 1e-8) ⊙ ξ, computed as :func:`lrt_conv2d`
    over (N, C_in, 1, L) with a (1, k) kernel (views, no copies); ξ is indexed as in the 2-D
    output (N, C_out, 1, L_out), so the same seed gives the same noise on every backend.

    Args:
        x: (N, C_in, L) or unbatched (C_in, L), floating.
        weight: θ, (C_out, C_in / groups, k). log_sigma2: same shape and dtype. bias: (C_out,)
            or None.
        stride, dilation: an int (or a sequence of one int, as nn.Conv1d stores them).
        padding: an int (or a sequence of one), "valid" or "same" (stride 1).
        groups, seed, check_finite, clip_threshold: as :func:`lrt_conv2d`.

    Returns:
        y, (N, C_out, L_out) (or unbatched), dtype of ``x``.

    Raises:
        TypeError / ValueError as :func:`lrt_conv2d`, each naming the argument.
    """
    x4, w4, s4, stride, padding, dilation, unbatched = check_conv1d_args(
        x, weight, log_sigma2, bias, stride, padding, dilation, groups, check_finite)
    y = lrt_conv2d(x4, w4, s4, bias, stride, padding, dilation, groups, seed=seed,
                   check_finite=False, clip_threshold=clip_threshold)
    return y.squeeze(-2)


def masked_linear(
    x: Tensor, weight: Tensor, log_sigma2: Tensor, bias: Optional[Tensor], threshold: float
) -> Tensor:
    """Evaluation forward of sparse VD: y = x (θ ⊙ [log α < threshold])ᵀ + b, deterministic.

    Args:
        x: (*, in_features). weight, log_sigma2: (out_features, in_features). bias: (out_features,)
            or None. threshold: on log α (eq. 8), 3.0 by default in the layers.

    Returns:
        y, (*, out_features), dtype of ``x``.

    Raises:
        TypeError / ValueError as :func:`lrt_linear`.
    """
    x = _check_linear(x, weight, log_sigma2, bias)
    w = masked_weight(weight, log_sigma2, threshold)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    bias: Optional[Tensor],
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    threshold: float,
) -> Tensor:
    """Evaluation forward of a sparse-VD convolution: conv(x, θ ⊙ [log α < threshold]) + b.

    Shapes and errors as :func:`lrt_conv2d`.
    """
    x, unbatched, stride, padding, dilation = check_conv2d_args(
        x, weight, log_sigma2, bias, stride, padding, dilation, groups
    )
    w = masked_weight(weight, log_sigma2, threshold).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = conv2d(x, w, b, stride, padding, dilation, groups)
    return y.squeeze(0) if unbatched else y


def masked_conv1d(
    x: Tensor,
    weight: Tensor,
    log_sigma2: Tensor,
    bias: Optional[Tensor],
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    threshold: float,
) -> Tensor:
    """Evaluation forward of a sparse-VD 1-D convolution: conv1d(x, θ ⊙ [log α < threshold]) + b.

    Shapes and errors as :func:`lrt_conv1d`.
    """
    x4, w4, s4, stride, padding, dilation, _ = check_conv1d_args(
        x, weight, log_sigma2, bias, stride, padding, dilation, groups, check_finite=False)
    return masked_conv2d(x4, w4, s4, bias, stride, padding, dilation, groups,
                         threshold=threshold).squeeze(-2)


def kl_sparse_vd(weight: Tensor, log_sigma2: Tensor) -> Tensor:
    """KL(q‖p) of one layer, summed over its weights (eq. 14 approximation), ≥ 0.

    Args:
        weight: θ, any shape, floating.
        log_sigma2: log σ², same shape and dtype.

    Returns:
        0-dim tensor, fp32 (fp64 for fp64 parameters), in nats.

    Raises:
        TypeError / ValueError: see :func:`check_parameters`.
    """
    return kl_sparse_vd_many([weight], [log_sigma2])


def kl_sparse_vd_many(weights: Sequence[Tensor], log_sigma2s: Sequence[Tensor], *,
                      check_finite: Optional[bool] = None) -> Tensor:
    """Σ over layers of :func:`kl_sparse_vd`, in as few kernel launches as the backend allows.

    Args:
        weights: θ of each layer.
        log_sigma2s: log σ² of each layer, matching ``weights`` one to one.
        check_finite: as :func:`lrt_linear` (``sparsevd.kl_divergence``, the training loss's KL,
            passes False).

    Returns:
        0-dim tensor, fp32 (fp64 for fp64 parameters); 0 when the lists are empty.
    """
    weights, log_sigma2s = _checked_kl_args(weights, log_sigma2s, check_finite)
    if not weights:
        return torch.zeros(())
    return _kl.run_kl_sparse_vd(weights, log_sigma2s)


def _checked_kl_args(weights, log_sigma2s, check_finite):
    """The lists of θ and log σ² of the KL functions, checked (see :func:`kl_sparse_vd_many`)."""
    weights, log_sigma2s = list(weights), list(log_sigma2s)
    if len(weights) != len(log_sigma2s):
        raise ValueError(
            f"log_sigma2s: expected {len(weights)} tensors (one per weight), got {len(log_sigma2s)}"
        )
    for w, s in zip(weights, log_sigma2s):
        check_parameters(w, s, check_finite)
        check_device_of(w, "weights", weights[0], "weights[0]")
    return weights, log_sigma2s


def kl_sparse_vd_kept(weights: Sequence[Tensor], log_sigma2s: Sequence[Tensor], thresholds: Sequence[float], *,
                      check_finite: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """:func:`kl_sparse_vd_many`'s KL (the same value and gradients) and, from the same pass over
    θ and log σ², the number of weights of each layer kept at evaluation (issue 23 item 7).

    A weight is kept when log α < its layer's threshold (:func:`sparsevd.ops.weights.eval_mask`),
    or when θ or e^{log σ²} is not finite (NaN, ±inf, log σ² above the log of the largest float):
    not known to be dropped, the rule of :func:`kept_count`. Near a threshold, within a rounding of
    log α, the kernels' log and torch's can decide a weight differently.

    Args:
        weights, log_sigma2s: as :func:`kl_sparse_vd_many`.
        thresholds: one finite log α threshold per layer (3 in the paper).
        check_finite: as :func:`kl_sparse_vd_many`.

    Returns:
        (KL: 0-dim fp32 / fp64, differentiable; kept: int64 (num_layers,) on the parameters'
        device, not differentiable).

    Raises:
        TypeError / ValueError: as :func:`kl_sparse_vd_many`; ``thresholds`` of another length or
            not finite.
    """
    weights, log_sigma2s = _checked_kl_args(weights, log_sigma2s, check_finite)
    thresholds = list(thresholds)
    if len(thresholds) != len(weights):
        raise ValueError(f"thresholds: expected {len(weights)} values (one per weight), got {len(thresholds)}")
    thresholds = [check_threshold(t, "thresholds") for t in thresholds]
    if not weights:
        return torch.zeros(()), torch.zeros(0, dtype=torch.int64)
    return _kl.run_kl_sparse_vd_kept(weights, log_sigma2s, thresholds)


def log_alpha(weight: Tensor, log_sigma2: Tensor) -> Tensor:
    """log α = clamp(log σ² − log(θ² + 1e-8), −10, 10), same shape and dtype as ``weight`` (eq. 8).

    Raises:
        TypeError / ValueError: see :func:`check_parameters`.
    """
    check_parameters(weight, log_sigma2)
    return _kl.log_alpha(weight, log_sigma2)


@torch.no_grad()
def kept_count(weight: Tensor, log_sigma2: Tensor, threshold: float, check_finite: bool = False) -> int:
    """The number of weights kept at evaluation, log α < ``threshold`` (paper, sec. 5), counted in
    one pass over θ and log σ²: the compiled CPU kernel's σ² pass (``native_clip_occupancy``, the
    pass that train-time clipping runs in every training step) for fp32 / fp64 CPU tensors of 2 to
    4 dimensions, else the same rule in torch (``eval_mask``). Cheap enough to call every step or epoch on a
    transformer (issue 23, item 7; ``report`` and :class:`sparsevd.target.CompressionTarget`).

    Args:
        weight, log_sigma2: θ and log σ², the same shape, dtype and device.
        threshold: finite, in log α units (3 in the paper).
        check_finite: also look for NaN / ±inf (a second pass over both tensors). Without it a
            weight whose θ or log σ² is not finite counts as kept (it is not known to be dropped).

    Returns:
        An int between 0 and ``weight.numel()``.

    Raises:
        TypeError / ValueError: bad shapes, dtypes or devices, a non-finite ``threshold``, or
            (``check_finite``) NaN / ±inf in ``weight`` or ``log_sigma2``.
    """
    check_parameters(weight, log_sigma2, check_finite=check_finite)
    threshold = check_threshold(threshold)
    if (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and 2 <= weight.dim() <= 4 and _library.has_op("native_clip_occupancy")):
        if weight.dim() == 3:  # Conv1d (R, S, k): the 4-D conv layout with kW = 1
            weight, log_sigma2 = weight.unsqueeze(-1), log_sigma2.unsqueeze(-1)
        rows, _ = torch.ops.sparsevd.native_clip_occupancy(weight.contiguous(), log_sigma2.contiguous(),
                                                            threshold)
        return int(rows.sum())
    # the kernel's rule: a weight whose θ·0 or σ²·0 is NaN (θ or σ² = e^{log σ²} not finite) is kept;
    # σ² in at least fp32, as the KL kernels count (in fp16 e^{log σ²} overflows at log σ² ≈ 11.1)
    wide = torch.promote_types(log_sigma2.dtype, torch.float32)
    nonfinite = ~torch.isfinite(weight) | ~torch.isfinite(torch.exp(log_sigma2.to(wide)))
    return int((eval_mask(weight, log_sigma2, threshold) | nonfinite).sum())


__all__ = [
    "CHECK_NAN",
    "check_conv1d_args",
    "check_conv2d_args",
    "check_linear_input",
    "check_parameters",
    "draw_seed",
    "kl_sparse_vd",
    "kl_sparse_vd_kept",
    "kl_sparse_vd_many",
    "kept_count",
    "log_alpha",
    "lrt_conv1d",
    "lrt_conv2d",
    "lrt_linear",
    "masked_conv1d",
    "masked_conv2d",
    "masked_linear",
]
