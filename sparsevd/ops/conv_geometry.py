"""Geometry of a 2-D convolution, in one place: what a padding argument resolves to, the output
size, the memory format of the outputs, and how asymmetric padding is run on kernels that take
symmetric padding (pad x, then crop ∂x).

A convolution's padding exists in three forms here:

- as the user gives it (an int, a pair, "same" or "valid"): :func:`conv_padding` resolves it;
- per side, (top, bottom, left, right): what :func:`conv_padding` returns;
- as the ops take it, a list of 2 ints [p_h, p_w] (symmetric) or 4 (per side):
  :func:`padding_arg` makes it, :func:`padding_sides` reads it back.

Used by the ``lrt_conv2d`` family (its op, every backend), :mod:`sparsevd.functional`, the layers
and the deployed ``SparseConv2d``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._args import IntOrPair, Padding, as_pair


def conv_padding(padding: Padding, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 dilation: IntOrPair = 1) -> Tuple[int, int, int, int]:
    """Per-side zero padding (top, bottom, left, right) of a 2-D convolution, as torch resolves it.

    - an int p or a pair (p_h, p_w): symmetric, (p_h, p_h, p_w, p_w);
    - "valid": no padding;
    - "same": the output has the input's size (stride 1 only): along each dim the total padding
      is dilation·(kernel − 1), of which ⌊total / 2⌋ goes before and the rest after (odd kernels
      pad symmetrically, even kernels one more at the bottom / right), as ``nn.Conv2d`` and
      ``F.conv2d(padding="same")`` do.

    Args:
        padding: the argument as the user gave it.
        kernel_size, stride, dilation: an int or a pair each (checked here only as far as "same"
            needs them).

    Raises:
        ValueError: an unknown string, "same" with a stride other than 1, or what
            :func:`sparsevd._args.as_pair` rejects (the message names ``padding``, or ``stride``
            for "same" with a stride).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            raise ValueError(f"padding: expected an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if as_pair(stride, "stride", 1) != (1, 1):
            raise ValueError(
                f"stride: padding='same' needs stride 1 (as in torch), got stride={stride!r}"
            )
        sides = []
        for k, d in zip(as_pair(kernel_size, "kernel_size", 1), as_pair(dilation, "dilation", 1)):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)  # type: ignore[return-value]
    ph, pw = as_pair(padding, "padding", 0)
    return ph, ph, pw, pw


def padding_arg(sides: Sequence[int]) -> list:
    """The ``padding`` list the conv ops take for per-side padding (top, bottom, left, right):
    [p_h, p_w] when symmetric, else the four sides."""
    t, b, l, r = (int(v) for v in sides)
    return [t, l] if (t, l) == (b, r) else [t, b, l, r]


def padding_sides(padding: Sequence[int]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) from an op's ``padding`` list of 2 or 4 ints (:func:`padding_arg`)."""
    if len(padding) == 2:
        return int(padding[0]), int(padding[0]), int(padding[1]), int(padding[1])
    if len(padding) == 4:
        return tuple(int(v) for v in padding)  # type: ignore[return-value]
    raise ValueError(f"padding: expected 2 or 4 ints, got {list(padding)!r}")


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                  padding_end: Optional[int] = None) -> int:
    """Output length of a convolution along one dimension (as ``torch.nn.functional.conv2d``):
    ⌊(size + p_begin + p_end − dilation·(kernel − 1) − 1) / stride⌋ + 1, with p_begin = padding
    and p_end = padding_end (default: padding, symmetric)."""
    end = padding if padding_end is None else padding_end
    return (size + padding + end - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_out_shape(x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                     dilation: List[int]) -> Tuple[int, int, int, int]:
    """(N, C_out, H_out, W_out) of a conv op: x (N, C_in, H, W), θ (C_out, C_in/groups, kH, kW),
    ``padding`` an op's list of 2 or 4 ints."""
    t, b, l, r = padding_sides(padding)
    h = conv_out_size(x.shape[2], weight.shape[2], stride[0], t, dilation[0], b)
    w = conv_out_size(x.shape[3], weight.shape[3], stride[1], l, dilation[1], r)
    return x.shape[0], weight.shape[0], h, w


def conv_memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of the conv ops' outputs y and std: channels_last when x or θ is laid
    out channels_last (and not also contiguous), as cuDNN and oneDNN convolutions choose; else
    contiguous. ∂x comes back in x's layout (torch.empty_like)."""
    cl = torch.channels_last
    for t in (x, weight):
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=cl):
            return cl
    return torch.contiguous_format


def symmetric_padding(x: Tensor, padding: Sequence[int]
                      ) -> Tuple[Tensor, List[int], Optional[Tuple[int, int, int, int]]]:
    """(x', [p_h, p_w], sides) for kernels that take symmetric padding only: x itself with the
    op's padding when it is symmetric (sides None), else x zero-padded explicitly per side
    (padding="same" with an even kernel) with [0, 0] and the sides, which :func:`crop_grad_x`
    takes to cut ∂x back out of the gradient of the padded input."""
    t, b, l, r = padding_sides(padding)
    if (t, l) == (b, r):
        return x, [t, l], None
    return F.pad(x, (l, r, t, b)), [0, 0], (t, b, l, r)


def crop_grad_x(grad_xp: Tensor, x: Tensor, sides: Optional[Sequence[int]]) -> Tensor:
    """∂x in x's layout (torch.empty_like) from the gradient of the input the kernels saw: the
    window of x in the padded input (:func:`symmetric_padding`'s ``sides``), or all of it (None)."""
    if sides is not None:
        t, _, l, _ = sides
        grad_xp = grad_xp[:, :, t:t + x.shape[2], l:l + x.shape[3]]
    return torch.empty_like(x).copy_(grad_xp)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``F.conv2d`` with an op's ``padding`` list: symmetric padding goes to F.conv2d, per-side
    padding pads x first, as torch does for "same"."""
    xp, pad, _ = symmetric_padding(x, padding)
    return F.conv2d(xp, weight, bias, stride, pad, dilation, groups)
