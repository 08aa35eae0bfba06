"""Checks of scalar arguments shared by the layers, the functional API, deployment and the CLI.

Each rule lives here once; every error names the argument.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

IntOrPair = Union[int, Sequence[int]]

__all__ = ["IntOrPair", "as_pair", "check_threshold"]


def as_pair(value: IntOrPair, name: str, minimum: Optional[int] = None) -> Tuple[int, int]:
    """``value`` as a pair of ints: an int v gives (v, v), a sequence of two ints is kept.

    Args:
        value: an int or a sequence of two ints (bools are not ints here).
        name: the argument's name, for the message.
        minimum: the smallest value allowed, or None.

    Raises:
        ValueError: a string (such as padding="same"), a sequence that is not two ints, or a value
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
