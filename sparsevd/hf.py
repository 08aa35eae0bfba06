"""Hugging Face models: ``save_pretrained(model, dir)`` / ``from_pretrained(dir)`` in sparsevd's
compact format, beside transformers' own (``pip install sparsevd[hf]``).

Two ways to save a converted or deployed transformers model:

- ``model.save_pretrained(dir)`` (transformers' own; also what a SentenceTransformer's ``save``
  and the HF Trainer call): a standard checkpoint holding the dense-equivalent weights and a
  ``quantization_config`` naming sparsevd (:mod:`sparsevd.hf_integration`). Any transformers
  loads it as the dense pruned model; with this module imported ``from_pretrained`` (of
  transformers, or this module's) rebuilds the sparse model exactly. As large as the dense model.
- :func:`save_pretrained` here (in the style of PEFT's adapters: the base config plus what
  sparsevd made): ``config.json`` (the model's config, as transformers writes it) and
  ``sparsevd_model.safetensors`` (:func:`sparsevd.save`: the CSR tensors, plans, specs of the
  sparse modules, digests), as small as the sparse model. :func:`from_pretrained` builds the
  architecture from the config (``config.architectures``, or ``model_class``) and loads the file
  into it. transformers' own ``from_pretrained`` refuses this directory (no ``model.safetensors``).

Importing this module registers the ``"sparsevd"`` quantizer with transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import io
from .hf_integration import pretrained_models, register

__all__ = ["WEIGHTS_NAME", "from_pretrained", "save_pretrained"]

#: The sparse weights file of :func:`save_pretrained`.
WEIGHTS_NAME = "sparsevd_model.safetensors"

PathLike = Union[str, Path]

register()


def save_pretrained(model: nn.Module, save_directory: PathLike) -> Path:
    """Save a converted or deployed transformers ``PreTrainedModel`` as ``config.json`` (its
    config, without a ``quantization_config``; the generation config too where the model has
    one) and :data:`WEIGHTS_NAME` (:func:`sparsevd.save`, atomic). Returns the directory.

    Raises:
        TypeError: ``model`` is not a transformers PreTrainedModel.
        ValueError: as :func:`sparsevd.save`.
    """
    if not any(name == "" for name, _ in pretrained_models(model)):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__} "
                        "(sparsevd.save(model, path) stores any module)")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    io.save(model, directory / WEIGHTS_NAME)
    config = model.config
    had = config.__dict__.pop("quantization_config", None)
    dtype = config.dtype
    try:
        config.dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), dtype)
        config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(directory)
    finally:
        config.dtype = dtype
        if had is not None:
            config.quantization_config = had
    return directory


def from_pretrained(directory: PathLike, model_class: Optional[type] = None,
                    device: Union[str, torch.device] = "cpu", **kwargs) -> nn.Module:
    """Load a directory written by :func:`save_pretrained` (or by transformers' own
    ``save_pretrained`` of a sparsevd model) without any download.

    Args:
        directory: the local directory.
        model_class: the transformers class to build (default: ``config.architectures[0]`` of
            the directory, looked up in ``transformers``).
        device: where to put the model.
        kwargs: passed to transformers' ``from_pretrained`` for a directory of the second kind.

    Returns:
        The model, as saved (deployed models in eval mode).

    Raises:
        FileNotFoundError: no config.json, or no weights, in ``directory``.
        ValueError: a config without ``architectures`` and no ``model_class``, an unknown class,
            or the errors of :func:`sparsevd.load` (naming the file).
    """
    import transformers

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a directory of save_pretrained)")
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names:
            raise ValueError(f"{directory}/config.json: no 'architectures'; pass model_class=")
        model_class = getattr(transformers, names[0], None)
        if model_class is None:
            raise ValueError(f"{directory}/config.json: unknown architecture {names[0]!r}; pass model_class=")
    if not (directory / WEIGHTS_NAME).is_file():
        if (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file():
            kwargs.setdefault("local_files_only", True)
            return model_class.from_pretrained(str(directory), **kwargs).to(device)
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (nor model.safetensors)")
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    model = model_class._from_config(config, dtype=dtype).to(device)
    return io.load(directory / WEIGHTS_NAME, model=model)
