"""Checks of scalar arguments shared by the layers, the functional API, deployment and the CLI.

Each rule lives here once; every error names the argument. What a convolution's padding resolves
to is :mod:`sparsevd.ops.conv_geometry`; the checks of tensor arguments are
:mod:`sparsevd.functional`'s.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

IntOrPair = Union[int, Sequence[int]]
#: A convolution's padding: an int, a pair of ints (H, W), or the string "same" or "valid".
Padding = Union[int, Sequence[int], str]

__all__ = ["IntOrPair", "Padding", "as_pair", "as_single", "check_groups", "check_threshold"]


def as_pair(value: IntOrPair, name: str, minimum: Optional[int] = None) -> Tuple[int, int]:
    """``value`` as a pair of ints: an int v gives (v, v), a sequence of two ints is kept.

    Args:
        value: an int or a sequence of two ints (bools are not ints here).
        name: the argument's name, for the message.
        minimum: the smallest value allowed, or None.

    Raises:
        ValueError: a string (convolution padding strings go through
            :func:`sparsevd.ops.conv_geometry.conv_padding`), a sequence that is not two ints, or a value
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


def check_real(value, name: str) -> float:
    """A finite real number (a hyper-parameter: a learning rate, a log α, a β) as a float.

    Raises:
        TypeError: not a real number (a string, a bool, None), naming ``name``.
        ValueError: NaN or ±inf, naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


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
