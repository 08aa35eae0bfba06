"""Checks of scalar arguments shared by the layers, the functional API, deployment and the CLI.

Each rule lives here once; every error names the argument.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

IntOrPair = Union[int, Sequence[int]]
#: A convolution's padding: an int, a pair of ints (H, W), or the string "same" or "valid".
Padding = Union[int, Sequence[int], str]

__all__ = ["IntOrPair", "Padding", "as_pair", "as_single", "check_groups", "check_threshold", "conv_padding", "padding_arg", "padding_sides"]


def as_pair(value: IntOrPair, name: str, minimum: Optional[int] = None) -> Tuple[int, int]:
    """``value`` as a pair of ints: an int v gives (v, v), a sequence of two ints is kept.

    Args:
        value: an int or a sequence of two ints (bools are not ints here).
        name: the argument's name, for the message.
        minimum: the smallest value allowed, or None.

    Raises:
        ValueError: a string (convolution padding strings go through :func:`conv_padding`), a sequence that is not two ints, or a value
            below ``minimum``.
    """
    if isinstance(value, str):
        raise ValueError(f"{name}: string values such as {value!r} are not supported; give ints")
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        pair = list(pair)
    except TypeError:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name}: expected values ≥ {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def as_single(value: IntOrPair, name: str, minimum: Optional[int] = None) -> int:
    """``value`` of a 1-D convolution argument as an int: an int, or a sequence of one int (as
    ``nn.Conv1d`` stores it, e.g. ``(3,)``).

    Raises:
        ValueError: anything else (strings, bools, sequences of another length), or a value
            below ``minimum``; the message names ``name``.
    """
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int or a sequence of one int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a value ≥ {minimum}, got {value!r}")
    return int(value)


def check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """A convolution's ``groups``: a positive int dividing both channel counts.

    Raises:
        ValueError: otherwise, naming ``groups`` and the channel counts.
    """
    if groups <= 0 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups: in_channels={in_channels} and out_channels={out_channels} must be "
            f"divisible by groups={groups}"
        )


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
        ValueError: an unknown string, "same" with a stride other than 1, or what :func:`as_pair`
            rejects (the message names ``padding``, or ``stride`` for "same" with a stride).
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


def check_threshold(value, name: str = "threshold") -> float:
    """A log α pruning threshold as a finite float.

    Raises:
        TypeError: not a real number (a string such as "3", a bool, None).
        ValueError: NaN or ±inf.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    return value
