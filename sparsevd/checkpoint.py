"""Training checkpoints: the format ``sparsevd train`` writes and :func:`load_checkpoint` reads.

A checkpoint is a directory holding

- ``model.safetensors``: the model's ``state_dict`` (safetensors: no pickle is ever loaded), and
  in its metadata ``format = "sparsevd.checkpoint"`` and ``config_sha256``, the SHA-256 of the
  bytes of ``config.json``;
- ``config.json``: what rebuilds the model: ``model`` (a name of :data:`sparsevd.models.MODELS`),
  ``svd`` (sparse-VD layers or dense ones), ``threshold``, ``format`` (:data:`CHECKPOINT_FORMAT`),
  ``weights_sha256`` (the digest of every tensor's name, dtype, shape and bytes) and free-form
  entries (``dataset``, ``input_shape``, ...);
- ``train_state.safetensors`` (written by ``sparsevd train`` at the end of every epoch): what
  ``--resume`` continues from: the model, the optimizer's tensors, the RNG states and, in its
  metadata, the run's settings, the epoch, the learning-rate schedule and the history, with a
  digest over all of it.

Integrity: any changed byte of either file is detected when the checkpoint is read (a weight: the
``weights_sha256`` of config.json; the config: the ``config_sha256`` of model.safetensors) and
reported with the file's name. Every file is written atomically (a temporary file beside it, then
a rename), so a crash or a Ctrl-C leaves the previous version whole. Format 1 checkpoints (no
digests) still load, with a warning.

A deployed (inference) model is another format: :func:`sparsevd.save` / :func:`sparsevd.load`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from torch import Tensor, nn

from ._files import atomic_save_safetensors, atomic_write_bytes, digest, read_safetensors
from .models import build_model
from .nn import DEFAULT_THRESHOLD

__all__ = ["CHECKPOINT_CONFIG", "CHECKPOINT_FORMAT", "CHECKPOINT_WEIGHTS", "DEFAULT_INPUT_SHAPE",
           "TRAIN_STATE", "input_shape", "load_checkpoint", "load_train_state", "optimizer_state",
           "optimizer_tensors", "read_config", "save_checkpoint", "save_train_state"]

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
TRAIN_STATE = "train_state.safetensors"
CHECKPOINT_FORMAT = 2
WEIGHTS_FORMAT = "sparsevd.checkpoint"
STATE_FORMAT = "sparsevd.train_state"
#: One input sample of the models of sparsevd.models (28x28 grey images), for a config without
#: ``input_shape``.
DEFAULT_INPUT_SHAPE = (1, 28, 28)

PathLike = Union[str, Path]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_tensors(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, out_dir: PathLike, config: dict) -> Path:
    """Save ``model``'s state_dict as ``out_dir/model.safetensors`` and ``config`` as
    ``out_dir/config.json``, with the digests that make any later change of either detectable.

    Args:
        model: a model from :func:`sparsevd.models.build_model`.
        out_dir: directory, created if missing.
        config: must hold ``model`` (name), ``svd`` (bool) and ``threshold`` (float); saved with
            ``format`` and ``weights_sha256`` added.

    Returns:
        The path of the ``.safetensors`` file.

    Raises:
        OSError: ``out_dir`` cannot be created or written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _state_tensors(model)
    cfg = dict(config, format=CHECKPOINT_FORMAT, weights_sha256=digest(state))
    cfg_bytes = (json.dumps(cfg, indent=2) + "\n").encode()
    # config first: a crash between the two renames leaves a mismatch that load reports, never a
    # silently inconsistent pair
    atomic_write_bytes(out / CHECKPOINT_CONFIG, cfg_bytes)
    path = atomic_save_safetensors(state, out / CHECKPOINT_WEIGHTS, {
        "format": WEIGHTS_FORMAT, "config_sha256": _sha256(cfg_bytes)})
    return path


def _paths(path: PathLike) -> Tuple[Path, Path, Path]:
    """(directory, weights file, config file) of the checkpoint that ``path`` names: the
    directory itself, or its ``.safetensors`` or ``.json`` file.

    Raises:
        FileNotFoundError: ``path`` names nothing (the message names it).
    """
    p = Path(path)
    if p.is_dir():
        return p, p / CHECKPOINT_WEIGHTS, p / CHECKPOINT_CONFIG
    if p.is_file() and p.suffix == ".safetensors":
        return p.parent, p, p.parent / CHECKPOINT_CONFIG
    if p.is_file() and p.suffix == ".json":
        return p.parent, p.parent / CHECKPOINT_WEIGHTS, p
    if p.exists():
        raise FileNotFoundError(f"{p}: not a checkpoint (expected a directory written by "
                                "`sparsevd train --out DIR`, or its .safetensors / .json file)")
    raise FileNotFoundError(f"{p}: no such checkpoint directory or file")


def _read_config_bytes(cfg_path: Path) -> Tuple[bytes, dict]:
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (a checkpoint needs its {CHECKPOINT_CONFIG})")
    raw = cfg_path.read_bytes()
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{cfg_path}: corrupted config: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: corrupted config: expected a JSON object, got a "
                         f"{type(cfg).__name__}")
    fmt = cfg.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise ValueError(f"{cfg_path}: corrupted config: format {fmt!r} is not an integer")
    if fmt > CHECKPOINT_FORMAT:
        raise ValueError(f"{cfg_path}: format {fmt} is newer than this sparsevd understands "
                         f"({CHECKPOINT_FORMAT}); upgrade sparsevd")
    return raw, cfg


def read_config(path: PathLike) -> dict:
    """The ``config.json`` of the checkpoint at ``path`` (its directory or one of its files).

    Raises:
        FileNotFoundError: ``path`` names no checkpoint, or it has no ``config.json``.
        ValueError: not a JSON object, or of a newer ``format``.
    """
    return _read_config_bytes(_paths(path)[2])[1]


def load_checkpoint(path: PathLike, device="cpu") -> nn.Module:
    """Rebuild a model saved by ``sparsevd train`` (or :func:`save_checkpoint`), after checking
    that neither file changed since it was written.

    Args:
        path: the checkpoint directory, its ``model.safetensors`` or its ``config.json``.
        device: where to put the parameters.

    Returns:
        The model (LeNet300 / LeNet5 with sparse-VD or dense layers, as trained), in eval mode.

    Raises:
        FileNotFoundError: ``path`` names no checkpoint, or a file of it is missing.
        ValueError: a file changed after it was written (digest mismatch: which file and what), is
            not JSON / not safetensors / truncated, a config without a known ``model`` or of a
            newer ``format``, or weights that do not fit the model.
    """
    _, weights, cfg_path = _paths(path)
    raw, cfg = _read_config_bytes(cfg_path)
    state, meta = read_safetensors(weights)
    fmt = cfg.get("format", 1)
    if fmt >= 2:
        if meta.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{weights}: not a sparsevd training checkpoint (safetensors metadata "
                             f"format={meta.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
        if meta.get("config_sha256") != _sha256(raw):
            raise ValueError(f"{cfg_path}: corrupted checkpoint: config.json changed after it was "
                             f"written (its sha256 does not match the one recorded in {weights.name})")
        if cfg.get("weights_sha256") != digest(state):
            raise ValueError(f"{weights}: corrupted checkpoint: the tensor data changed after it was "
                             f"written (its sha256 does not match the one recorded in {cfg_path.name})")
    else:
        warnings.warn(f"{cfg_path}: a format-1 checkpoint (older sparsevd) has no checksums; its "
                      "integrity cannot be checked", RuntimeWarning, stacklevel=2)
    if not isinstance(cfg.get("model"), str):
        raise ValueError(f"{cfg_path}: no 'model' entry")
    threshold = cfg.get("threshold", DEFAULT_THRESHOLD)
    model = build_model(cfg["model"], svd=bool(cfg.get("svd", True)), threshold=threshold)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: the weights do not fit model {cfg['model']!r} "
                         f"(svd={bool(cfg.get('svd', True))}): {e}") from None
    return model.to(device).eval()


def input_shape(path: PathLike) -> tuple:
    """The shape of one input sample, ``input_shape`` of the checkpoint's config (without the
    batch dimension), else :data:`DEFAULT_INPUT_SHAPE`.

    Raises:
        ValueError: an ``input_shape`` that is not a list of positive ints (read without the
            digest check: :func:`load_checkpoint` reports an edited config first).
    """
    shape = read_config(path).get("input_shape")
    if shape is None:
        return DEFAULT_INPUT_SHAPE
    if not isinstance(shape, list) or not shape or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"{_paths(path)[2]}: corrupted config: input_shape {shape!r} is not a "
                         "list of positive integers")
    return tuple(shape)


# ------------------------------------------------------------------------------ training state
def save_train_state(path: PathLike, model: nn.Module, tensors: Dict[str, Tensor],
                     meta: dict) -> Path:
    """Write the resumable state of a training run to ``path`` atomically.

    Args:
        path: the file (``<out_dir>/train_state.safetensors``).
        model: the model being trained (its state_dict is stored under ``model.``).
        tensors: further tensors (optimizer state, RNG states), by name.
        meta: JSON-serializable settings and counters (epoch, schedule, history, ...).

    Returns:
        ``path``.
    """
    all_tensors = {f"model.{k}": v for k, v in _state_tensors(model).items()}
    all_tensors.update({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    text = json.dumps(meta, separators=(",", ":"))
    return atomic_save_safetensors(all_tensors, path, {
        "format": STATE_FORMAT, "state": text, "sha256": digest(all_tensors, STATE_FORMAT, text)})


def load_train_state(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], dict]:
    """Read what :func:`save_train_state` wrote: (model state_dict, other tensors, meta).

    Raises:
        FileNotFoundError: no such file (the run has no completed epoch to resume from).
        ValueError: corrupted (digest mismatch, truncated) or not a training state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from (a run writes it at the "
                                "end of every epoch)")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a sparsevd training state (format={meta.get('format')!r})")
    text = meta.get("state", "")
    if meta.get("sha256") != digest(tensors, STATE_FORMAT, text):
        raise ValueError(f"{path}: corrupted training state: the sha256 checksum does not match")
    try:
        state = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: corrupted training state ({e})") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    other = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return model, other, state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, Tensor], dict]:
    """An optimizer's state_dict split into tensors (for safetensors) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: Dict[str, Tensor] = {}
    state_json: Dict[str, dict] = {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v
            else:
                entry[k] = v
        state_json[str(pid)] = entry
    return tensors, {"param_groups": sd["param_groups"], "state": state_json}


def optimizer_state(tensors: Dict[str, Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_tensors`: a state_dict for ``Optimizer.load_state_dict``."""
    state: Dict[int, dict] = {int(pid): dict(entry) for pid, entry in meta["state"].items()}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}
