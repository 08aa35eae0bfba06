"""Where a model's prediction is in its output: a tensor, a dict, a Hugging Face ``ModelOutput``
(an OrderedDict) or a tuple. Used by :class:`sparsevd.SGVLB` and :func:`sparsevd.predict`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from torch import Tensor

__all__ = ["find_logits"]


def find_logits(out, key: Union[None, str, int] = None) -> Tensor:
    """The logits (or any prediction) in a model's output ``out``.

    Args:
        out: a tensor (returned as is when ``key`` is None), a dict or ``transformers``
            ``ModelOutput`` (the entry ``key``, default ``"logits"``), or a tuple / list (the
            element ``key``, default 0: where transformers puts the logits when no labels are
            given).
        key: the entry or index of the prediction; None for the defaults above.

    Returns:
        The tensor found (any shape and dtype: callers check what they need).

    Raises:
        ValueError: a dict / ModelOutput without the entry (the message lists its keys), an index
            outside a tuple, an output of another type, or a ``key`` given for a bare tensor.
    """
    if isinstance(out, Tensor) and key is None:
        return out
    if isinstance(out, Mapping):  # dicts and transformers' ModelOutput (an OrderedDict)
        name = "logits" if key is None else key
        if name not in out:
            raise ValueError(f"model: its output ({type(out).__name__}) has no {name!r} entry; its "
                             f"entries are {list(out.keys())}: pass logits=<the key of the logits>")
        return out[name]
    if isinstance(out, (tuple, list)):
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(out) <= index < len(out):
            raise ValueError(f"logits: expected an index of the model's {len(out)}-tuple output, got {key!r}")
        return out[index]
    raise ValueError(f"model: expected logits as a tensor, a dict / ModelOutput or a tuple, got "
                     f"{type(out).__name__}" + (f" (logits={key!r} needs a dict or a tuple)" if key is not None else ""))
