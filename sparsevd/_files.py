"""File primitives shared by the two file formats (training checkpoints, sparsevd.checkpoint;
deployed models, sparsevd.io): content digests, atomic writes, safetensors reads that fail with a
message naming the file."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["atomic_write_bytes", "atomic_save_safetensors", "check_writable", "digest",
           "read_safetensors"]

PathLike = Union[str, Path]


def _file_mode() -> int:
    """0666 less the process's umask: the mode of any file the process creates."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def digest(tensors: Dict[str, Tensor], *texts: str) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and bytes (in name order), then of
    ``texts`` (e.g. a JSON config): any change of a byte of either changes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for text in texts:
        h.update(b"\x00text|")
        h.update(text.encode())
    return h.hexdigest()


def _temp_beside(path: Path):
    """A new empty file beside ``path``, created with the usual permissions (0666 less the
    umask, like any file the process writes; mkstemp's 0600 would hide results from others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{next(tempfile._get_candidate_names())}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _file_mode())  # writers such as safetensors may create their file 0600
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, fsync, rename)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        tmp.write_bytes(data)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save_safetensors(tensors: Dict[str, Tensor], path: PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically (tensors are moved to the CPU and
    made contiguous)."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = _temp_beside(path)
    try:
        save_file(cpu, str(tmp), metadata=metadata)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_safetensors(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a safetensors file, or truncated / corrupted (the message names the file
            and says what the reader found); a pickle, for instance, is refused, never loaded.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own errors: bad header, truncated data, ...
        raise ValueError(f"{path}: corrupted or not a safetensors file ({type(e).__name__}: {e})") from e
    return tensors, meta


def check_writable(path, what: str, directory: bool) -> None:
    """Make sure, before a long run, that ``path`` can be written: a directory (created if
    missing) or a file (its parent created if missing), by writing and removing a probe file.

    Raises:
        OSError (PermissionError, NotADirectoryError, IsADirectoryError, ...): the message names
            ``what`` and ``path``.
    """
    p = Path(path)
    try:
        if not directory and p.is_dir():
            raise IsADirectoryError(f"{p} is a directory")
        target = p if directory else p.parent
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".sparsevd-probe-"):
            pass
    except OSError as e:
        raise type(e)(f"{what} {p} is not writable: {e.strerror or e}") from None
