"""argparse types of the command line (sparsevd.cli and its commands), all made by one helper,
:func:`arg_type`: each rejects a bad value with a message argparse prints as
"argument --name: expected ..., got ..." (exit status 2).

Paths are not checked here: the commands check them before a long run
(:func:`sparsevd._files.check_writable`), where the error can name the file and why.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional, TypeVar

__all__ = ["arg_type", "finite_float", "nonneg_float", "nonneg_int", "positive_float", "positive_int",
           "seed"]

T = TypeVar("T", int, float)


def arg_type(parse: Callable[[str], T], valid: Callable[[T], bool], expected: str,
             expected_value: Optional[str] = None, name: Optional[str] = None) -> Callable[[str], T]:
    """An argparse ``type=``: ``parse`` the text (``int`` or ``float``), then accept the value when
    ``valid``. Raises argparse.ArgumentTypeError "expected <expected>, got '<text>'" for text that
    does not parse, "expected <expected_value or expected>, got <value>" for a value out of range
    (an int as parsed, a float as written)."""

    def convert(text: str) -> T:
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(v):
            shown = v if parse is int else text
            raise argparse.ArgumentTypeError(f"expected {expected_value or expected}, got {shown}")
        return v

    convert.__name__ = name or f"{parse.__name__} ({expected})"  # argparse's "invalid <name> value"
    return convert


positive_int = arg_type(int, lambda v: v > 0, "a positive integer", name="positive_int")
nonneg_int = arg_type(int, lambda v: v >= 0, "an integer >= 0", name="nonneg_int")
positive_float = arg_type(float, lambda v: math.isfinite(v) and v > 0, "a positive number",
                          "a positive finite number", name="positive_float")
nonneg_float = arg_type(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0", "a finite number >= 0",
                        name="nonneg_float")
finite_float = arg_type(float, math.isfinite, "a number", "a finite number", name="finite_float")

#: Seeds are 63-bit: torch.manual_seed and torch.Generator take them, and so do the noise keys.
SEED_MAX = 2**63 - 1
seed = arg_type(int, lambda v: 0 <= v <= SEED_MAX, "an integer seed", "a seed in [0, 2**63 - 1]", name="seed")
