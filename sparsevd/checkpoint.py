"""Training checkpoints: the format ``sparsevd train`` writes and :func:`load_checkpoint` reads.

A checkpoint is a directory holding

- ``model.safetensors``: the model's ``state_dict`` (no pickle);
- ``config.json``: what rebuilds the model: ``model`` (a name of :data:`sparsevd.models.MODELS`),
  ``svd`` (sparse-VD layers or dense ones), ``threshold``, plus ``format`` and free-form entries
  (``dataset``, ``input_shape``, ...).

A deployed (inference) model is another format: :func:`sparsevd.save` / :func:`sparsevd.load`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from torch import nn

from .models import build_model
from .nn import DEFAULT_THRESHOLD

__all__ = ["CHECKPOINT_CONFIG", "CHECKPOINT_FORMAT", "CHECKPOINT_WEIGHTS", "DEFAULT_INPUT_SHAPE",
           "input_shape", "load_checkpoint", "read_config", "save_checkpoint"]

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = 1
#: One input sample of the models of sparsevd.models (28x28 grey images), for a config without
#: ``input_shape``.
DEFAULT_INPUT_SHAPE = (1, 28, 28)

PathLike = Union[str, Path]


def save_checkpoint(model: nn.Module, out_dir: PathLike, config: dict) -> Path:
    """Save ``model``'s state_dict as ``out_dir/model.safetensors`` and ``config`` as JSON.

    Args:
        model: a model from :func:`sparsevd.models.build_model`.
        out_dir: directory, created if missing.
        config: must hold ``model`` (name), ``svd`` (bool) and ``threshold`` (float); saved as
            ``out_dir/config.json`` with ``format`` added.

    Returns:
        The path of the ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = out / CHECKPOINT_WEIGHTS
    save_file(state, str(path), metadata={"format": "pt"})
    cfg = dict(config, format=CHECKPOINT_FORMAT)
    (out / CHECKPOINT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _paths(path: PathLike):
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    weights = p if p.suffix == ".safetensors" else directory / CHECKPOINT_WEIGHTS
    return directory, weights, directory / CHECKPOINT_CONFIG


def read_config(path: PathLike) -> dict:
    """The ``config.json`` of the checkpoint at ``path`` (its directory or one of its files).

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: not JSON, or of a newer ``format``.
    """
    _, _, cfg_path = _paths(path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: {cfg_path} not found")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format", CHECKPOINT_FORMAT) > CHECKPOINT_FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg['format']} is newer than this sparsevd "
                         f"understands ({CHECKPOINT_FORMAT})")
    return cfg


def load_checkpoint(path: PathLike, device="cpu") -> nn.Module:
    """Rebuild a model saved by ``sparsevd train`` (or :func:`save_checkpoint`).

    Args:
        path: the checkpoint directory, its ``model.safetensors`` or its ``config.json``.
        device: where to put the parameters.

    Returns:
        The model (LeNet300 / LeNet5 with sparse-VD or dense layers, as trained), in eval mode.

    Raises:
        FileNotFoundError: ``model.safetensors`` or ``config.json`` missing.
        ValueError: config without a known ``model`` or of a newer ``format``.
        RuntimeError: the weights do not match the model (from ``load_state_dict``).
    """
    from safetensors.torch import load_file

    _, weights, cfg_path = _paths(path)
    for f in (weights, cfg_path):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path}: {f} not found")
    cfg = read_config(path)
    if "model" not in cfg:
        raise ValueError(f"{cfg_path}: no 'model' entry")
    model = build_model(cfg["model"], svd=bool(cfg.get("svd", True)),
                        threshold=float(cfg.get("threshold", DEFAULT_THRESHOLD)))
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()


def input_shape(path: PathLike) -> tuple:
    """The shape of one input sample, ``input_shape`` of the checkpoint's config (without the
    batch dimension), else :data:`DEFAULT_INPUT_SHAPE`."""
    try:
        shape = read_config(path).get("input_shape")
        if shape and all(isinstance(v, int) and v > 0 for v in shape):
            return tuple(shape)
    except (OSError, ValueError, AttributeError):
        pass
    return DEFAULT_INPUT_SHAPE
