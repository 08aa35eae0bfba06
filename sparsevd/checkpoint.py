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
  digest over all of it; beside it ``timings.json``, the run's wall-clock measurements (step
  times, seconds per epoch), the one file that differs between two identical runs.

**One atomic unit.** The files of a checkpoint are written together into a fresh version
directory ``.checkpoint-<n>`` and committed by replacing one symlink, ``checkpoint`` →
``.checkpoint-<n>`` (:func:`sparsevd._files.write_unit`); ``model.safetensors``, ``config.json`` and
``train_state.safetensors`` in the directory are symlinks to ``checkpoint/<name>``, so tools that
open them by name read the current version. A crash, SIGKILL or Ctrl-C at any point of a save
leaves the previous checkpoint whole; a full disk raises one :class:`sparsevd._files.FileWriteError`
(an OSError naming the file) and changes nothing. Readers resolve ``checkpoint`` once and read
every file from that version. Directories written before (the files themselves in the directory,
no ``checkpoint`` link) still load, and the next save turns them into this layout.

**Byte-reproducible.** JSON is written with sorted keys, the safetensors headers with sorted
metadata, and nothing time-dependent goes into the files the digests cover: the same model and
settings give the same bytes of ``model.safetensors``, ``config.json`` and
``train_state.safetensors``.

Integrity: any changed byte of either file is detected when the checkpoint is read (a weight: the
``weights_sha256`` of config.json; the config: the ``config_sha256`` of model.safetensors) and
reported with the file's name. Format 1 checkpoints (no digests) still load, with a warning.

A deployed (inference) model is another format: :func:`sparsevd.save` / :func:`sparsevd.load`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._files import (bytes_digest, digest, read_safetensors, save_safetensors_new, unit_dir,
                     write_bytes_new, write_unit)
from .models import build_model
from .nn import DEFAULT_THRESHOLD

__all__ = ["CHECKPOINT_CONFIG", "CHECKPOINT_FORMAT", "CHECKPOINT_POINTER", "CHECKPOINT_WEIGHTS",
           "DEFAULT_INPUT_SHAPE", "TIMINGS", "TRAIN_STATE", "TrainState", "checkpoint_owning",
           "input_shape", "load_checkpoint", "load_train_state", "optimizer_state",
           "optimizer_tensors", "read_config", "saved_epoch", "save_checkpoint"]

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
TRAIN_STATE = "train_state.safetensors"
TIMINGS = "timings.json"
#: The symlink whose replacement commits a new version of a checkpoint (see the module docstring).
CHECKPOINT_POINTER = "checkpoint"
#: The files of a checkpoint; the first three get a symlink in the checkpoint directory.
UNIT_FILES = (CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG, TRAIN_STATE, TIMINGS)
CHECKPOINT_FORMAT = 2
WEIGHTS_FORMAT = "sparsevd.checkpoint"
STATE_FORMAT = "sparsevd.train_state"
#: One input sample of the models of sparsevd.models (28x28 grey images), for a config without
#: ``input_shape``.
DEFAULT_INPUT_SHAPE = (1, 28, 28)
#: Keys of the training state's metadata that hold wall-clock measurements (at the top level and
#: in lists of rows such as the history): written to timings.json, not into the digested state.
_MEASURED = re.compile(r".*_(seconds|ms)$")

PathLike = Union[str, Path]


def _state_tensors(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _json_bytes(obj, **kw) -> bytes:
    return (json.dumps(obj, sort_keys=True, **kw) + "\n").encode()


def save_checkpoint(model: nn.Module, out_dir: PathLike, config: Optional[dict],
                    train_state: Optional[Tuple[Dict[str, Tensor], dict]] = None) -> Path:
    """Save ``model``'s state_dict as ``out_dir/model.safetensors`` and ``config`` as
    ``out_dir/config.json``, with the digests that make any later change of either detectable,
    and, given ``train_state``, the training state, all as one atomic unit (module docstring).

    Args:
        model: a model from :func:`sparsevd.models.build_model`.
        out_dir: directory, created if missing.
        config: must hold ``model`` (name), ``svd`` (bool) and ``threshold`` (float); saved with
            ``format`` and ``weights_sha256`` added. None: only the training state is written.
        train_state: ``(tensors, meta)``: further tensors (optimizer state, RNG states) by name,
            and JSON-serializable settings and counters (epoch, schedule, history, ...; entries
            named ``*_seconds`` / ``*_ms`` go to ``timings.json``), stored with the model's
            state_dict as ``train_state.safetensors``.

    Returns:
        The path of ``model.safetensors`` (of ``train_state.safetensors`` without ``config``).

    Raises:
        ValueError: neither ``config`` nor ``train_state``.
        FileWriteError (an OSError): a file cannot be written (a full disk, permissions): the
            message names it; the previous checkpoint is unchanged, nothing temporary is left.
    """
    out = Path(out_dir)
    files: Dict[str, Callable[[Path], None]] = {}
    if config is not None:
        state = _state_tensors(model)
        cfg_bytes = _json_bytes(dict(config, format=CHECKPOINT_FORMAT, weights_sha256=digest(state)),
                                indent=2)
        meta = {"format": WEIGHTS_FORMAT, "config_sha256": bytes_digest(cfg_bytes)}
        files[CHECKPOINT_CONFIG] = lambda p: write_bytes_new(p, cfg_bytes)
        files[CHECKPOINT_WEIGHTS] = lambda p: save_safetensors_new(state, p, meta)
    if train_state is not None:
        files.update(_train_state_files(model, *train_state))
    if not files:
        raise ValueError("save_checkpoint: nothing to save (config and train_state are None)")
    write_unit(out, CHECKPOINT_POINTER, files, links=tuple(n for n in UNIT_FILES[:3] if n in files))
    return out / (CHECKPOINT_WEIGHTS if config is not None else TRAIN_STATE)


def _read_dir(directory: Path) -> Path:
    """The directory holding the files of the checkpoint in ``directory``: the version its
    ``checkpoint`` link names (resolved once), or ``directory`` (the older layout)."""
    return unit_dir(directory, CHECKPOINT_POINTER)


def _paths(path: PathLike) -> Tuple[Path, Path, Path]:
    """(directory read, weights file, config file) of the checkpoint that ``path`` names: the
    directory itself, or its ``.safetensors`` or ``.json`` file (also through the ``checkpoint``
    link).

    Raises:
        FileNotFoundError: ``path`` names nothing (the message names it).
    """
    p = Path(path)
    if p.is_dir():
        d = _read_dir(p)
        return d, d / CHECKPOINT_WEIGHTS, d / CHECKPOINT_CONFIG
    if p.is_file() and p.suffix in (".safetensors", ".json"):
        d = p.parent
        if d.is_symlink():  # <run>/checkpoint/<file>: the version the link names now
            d = d.parent / os.readlink(d)
        elif p.name in UNIT_FILES:  # <run>/model.safetensors, ...: the version of <run>/checkpoint
            d = _read_dir(d)
        if p.name in UNIT_FILES:
            return d, d / CHECKPOINT_WEIGHTS, d / CHECKPOINT_CONFIG
        if p.suffix == ".safetensors":
            return d, d / p.name, d / CHECKPOINT_CONFIG
        return d, d / CHECKPOINT_WEIGHTS, d / p.name
    if p.exists():
        raise FileNotFoundError(f"{p}: not a checkpoint (expected a directory written by "
                                "`sparsevd train --out DIR`, or its .safetensors / .json file)")
    raise FileNotFoundError(f"{p}: no such checkpoint directory or file")


def _read_settled(locate: Callable[[], tuple], read: Callable[..., tuple]) -> tuple:
    """``read(*locate())``, again (twice at most) when a file vanished because a writer committed
    a new version meanwhile and removed the one being read (the location changed)."""
    for attempt in range(3):
        where = locate()
        try:
            return read(*where)
        except FileNotFoundError:
            if attempt == 2 or locate() == where:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


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
    def read(_, weights: Path, cfg_path: Path):
        return weights, cfg_path, *_read_config_bytes(cfg_path), *read_safetensors(weights)

    weights, cfg_path, raw, cfg, state, meta = _read_settled(lambda: _paths(path), read)
    fmt = cfg.get("format", 1)
    if fmt >= 2:
        if meta.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{weights}: not a sparsevd training checkpoint (safetensors metadata "
                             f"format={meta.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
        if meta.get("config_sha256") != bytes_digest(raw):
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
class TrainState(NamedTuple):
    """A training state as :func:`load_train_state` reads it."""

    model: Dict[str, Tensor]  #: the model's state_dict
    tensors: Dict[str, Tensor]  #: the other tensors (optimizer, RNG states)
    meta: dict  #: settings, counters and history, with the measurements of timings.json merged in
    path: Path  #: the file read


def _split_measured(meta: dict) -> Tuple[dict, dict]:
    """(``meta`` without its wall-clock measurements, the measurements): the keys matching
    :data:`_MEASURED` at the top level and in lists of rows (the history)."""
    kept, measured = {}, {}
    for k, v in meta.items():
        if _MEASURED.match(k):
            measured[k] = v
        elif isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            rows = [_split_measured(r) for r in v]
            kept[k] = [r[0] for r in rows]
            if any(r[1] for r in rows):
                measured[k] = [r[1] for r in rows]
        else:
            kept[k] = v
    return kept, measured


def _merge_measured(meta: dict, measured: dict) -> dict:
    """The inverse of :func:`_split_measured`."""
    out = dict(meta)
    for k, v in measured.items():
        if isinstance(v, list) and isinstance(out.get(k), list) and all(isinstance(r, dict) for r in v):
            out[k] = [dict(row, **m) for row, m in zip(out[k], v)]
        else:
            out[k] = v
    return out


def _train_state_files(model: nn.Module, tensors: Dict[str, Tensor], meta: dict
                       ) -> Dict[str, Callable[[Path], None]]:
    """The writers of ``train_state.safetensors`` (model, ``tensors``, the deterministic part of
    ``meta`` and a digest over all of it) and ``timings.json`` (the measurements of ``meta``)."""
    all_tensors = {f"model.{k}": v for k, v in _state_tensors(model).items()}
    all_tensors.update({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    kept, measured = _split_measured(meta)
    text = json.dumps(kept, separators=(",", ":"), sort_keys=True)
    header = {"format": STATE_FORMAT, "state": text, "sha256": digest(all_tensors, STATE_FORMAT, text)}
    timings = _json_bytes(measured)
    return {TRAIN_STATE: lambda p: save_safetensors_new(all_tensors, p, header),
            TIMINGS: lambda p: write_bytes_new(p, timings)}


def _state_path(path: PathLike) -> Path:
    """The training state file of the run directory ``path`` (through its ``checkpoint`` link);
    ``path`` itself when it names another file."""
    p = Path(path)
    if p.is_dir():
        return _read_dir(p) / TRAIN_STATE
    if p.name in UNIT_FILES and p.parent.exists():
        return _paths(p.parent)[0] / TRAIN_STATE
    return p


def load_train_state(path: PathLike) -> TrainState:
    """Read the training state that :func:`save_checkpoint` wrote with ``train_state``.

    Args:
        path: the run directory (``sparsevd train --out DIR``) or its train_state.safetensors.

    Raises:
        FileNotFoundError: no such file (the run has no completed epoch to resume from).
        ValueError: corrupted (digest mismatch, truncated, a timings.json that is not JSON) or
            not a training state.
    """
    def read(file: Path):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no training state to resume from (a run writes it at "
                                    "the end of every epoch)")
        timings = file.parent / TIMINGS
        return (file, *read_safetensors(file),
                timings.read_bytes() if file.name == TRAIN_STATE and timings.is_file() else None)

    path, tensors, meta, timings = _read_settled(lambda: (_state_path(path),), read)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a sparsevd training state (format={meta.get('format')!r})")
    text = meta.get("state", "")
    if meta.get("sha256") != digest(tensors, STATE_FORMAT, text):
        raise ValueError(f"{path}: corrupted training state: the sha256 checksum does not match")
    try:
        state = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: corrupted training state ({e})") from None
    if timings is not None:
        try:
            state = _merge_measured(state, json.loads(timings))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path.parent / TIMINGS}: corrupted measurements ({e})") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    other = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return TrainState(model, other, state, path)


def saved_epoch(run_dir: PathLike) -> Optional[Tuple[int, Optional[int], tuple]]:
    """``(epoch, epochs, version)`` of the training state in ``run_dir`` (the last completed
    epoch, the run's total, and an identity of the file that changes with every save), read
    from its metadata only; None when there is none or it cannot be read."""
    from safetensors import safe_open

    file = _state_path(run_dir)
    try:
        with safe_open(str(file), framework="pt") as f:
            state = json.loads((f.metadata() or {}).get("state", ""))
        st = os.stat(file)
        return int(state["epoch"]), state.get("recipe", {}).get("epochs"), (st.st_ino, st.st_mtime_ns)
    except Exception:  # missing, unreadable, corrupted: no state to tell about
        return None


def checkpoint_owning(path: PathLike, run_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The training checkpoint directory that writing ``path`` would damage, or None.

    ``path`` would damage a checkpoint when it is one of its files (``model.safetensors``,
    ``config.json``, ``train_state.safetensors``, ``timings.json`` of a checkpoint directory, or
    of ``run_dir``, the directory a run is about to write; also through symlinks), lies in one of
    its version directories, or is a file holding a training checkpoint or state (its safetensors
    metadata says so, wherever it was copied).
    """
    p = Path(path)
    real = Path(os.path.realpath(p))
    run = None if run_dir is None else os.path.realpath(run_dir)
    version = re.compile(re.escape(f".{CHECKPOINT_POINTER}-") + r"\d+$")
    for d, name in ((p.parent, p.name), (real.parent, real.name)):
        if version.match(d.name):  # (<run>/checkpoint/<any> resolves to one)
            return d.parent
        if name in UNIT_FILES and ((d / CHECKPOINT_POINTER).is_dir() or (d / TRAIN_STATE).is_file()
                                   or (d / CHECKPOINT_CONFIG).is_file() and (d / CHECKPOINT_WEIGHTS).is_file()
                                   or os.path.realpath(d) == run):
            return d
    if real.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(real), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:  # not a safetensors file: nothing of a checkpoint
            return None
        if fmt in (WEIGHTS_FORMAT, STATE_FORMAT):
            return real.parent
    return None


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
