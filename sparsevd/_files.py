"""File primitives shared by the two file formats (training checkpoints, sparsevd.checkpoint;
deployed models, sparsevd.io) and every other file sparsevd writes (summaries, pictures, benchmark
rows): content digests, atomic writes, atomic units of several files, byte-reproducible safetensors,
and reads and writes that fail with a message naming the file.

What a write guarantees (tests/test_files.py):

- **atomic**: a file is written to a temporary file beside it, fsynced and renamed over the old one
  (:func:`atomic_write_bytes`, :func:`atomic_save_safetensors`); a set of files that belong
  together is written into a fresh version directory and committed by replacing one symlink
  (:func:`write_unit`). A crash, a SIGKILL or a Ctrl-C at any point leaves the previous version
  whole;
- **failures**: a write that fails (a full disk, no permission, an I/O error) raises one
  :class:`FileWriteError` (an OSError with the errno of the cause) naming the file; the previous
  version is unchanged and no temporary file is left behind;
- **byte-reproducible**: the same content gives the same bytes: safetensors headers are written
  with sorted metadata keys (the safetensors writer keeps them in a Rust HashMap, whose order
  changes from call to call).
"""
from __future__ import annotations

import errno as errno_
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["FileWriteError", "atomic_write_bytes", "atomic_save_safetensors", "bytes_digest",
           "check_writable", "digest", "read_safetensors", "save_safetensors_new", "unit_dir", "write_bytes_new",
           "write_unit"]

PathLike = Union[str, Path]


class FileWriteError(OSError):
    """A file could not be written (full disk, permissions, an I/O error).

    ``errno``, ``strerror`` and ``filename`` are those of the cause (``errno.ENOSPC`` for a full
    disk); ``str()`` is one line naming the file, the reason and what was kept.
    """

    def __init__(self, errno: int, strerror: str, filename: str, message: str) -> None:
        super().__init__(errno, strerror, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_error(path: PathLike, exc: BaseException, kept: str = "nothing was changed"
                ) -> FileWriteError:
    """The :class:`FileWriteError` for a failed write of ``path``: from an OSError, or from the
    safetensors writer's SafetensorError ("I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, FileWriteError):
        return exc
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else errno_.EIO
    reason = getattr(exc, "strerror", None) or (os.strerror(code) if code != errno_.EIO else str(exc))
    return FileWriteError(code, reason, str(path), f"{path}: cannot write: {reason} ({kept})")


def _file_mode() -> int:
    """0666 less the process's umask: the mode of any file the process creates."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def bytes_digest(data: bytes) -> str:
    """SHA-256 (hex, 64 lowercase characters) of ``data``: the digest of a file's bytes (e.g. the
    ``config_sha256`` of a checkpoint's config.json)."""
    return hashlib.sha256(data).hexdigest()


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


def _fsync_dir(path: Path, strict: bool = True) -> None:
    """fsync a directory, so that the names created or renamed in it survive a power loss.
    ``strict=False`` after a commit: the rename is done, its durability is the best we can do."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if strict and e.errno not in (errno_.EINVAL, errno_.ENOTSUP, errno_.EBADF):
            raise
    finally:
        os.close(fd)


def write_bytes_new(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated, mode 0666 less the umask) and fsync it.
    Not atomic by itself: for a file nobody reads yet (a temporary file, a file of a new version
    directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class _Pairs(list):
    """A JSON object read as its (key, value) pairs, in file order."""


def _dump(obj) -> str:
    """Compact JSON as serde_json (the safetensors writer) writes it: no spaces, UTF-8 kept."""
    if isinstance(obj, _Pairs):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _dump(v) for k, v in obj) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(_dump(v) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def _sorted_header(header: bytes) -> bytes:
    """A safetensors JSON header with its ``__metadata__`` keys sorted; the tensor entries keep
    the writer's order (sorted by alignment and name)."""
    items = json.loads(header, object_pairs_hook=_Pairs)
    return _dump(_Pairs((k, _Pairs(sorted(v)) if k == "__metadata__" else v) for k, v in items)).encode()


def save_safetensors_new(tensors: Dict[str, Tensor], path: PathLike,
                         metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` (a file nobody reads yet), then sort the header's
    metadata keys (byte-reproducible files), fsync, and give it mode 0666 less the umask.
    Tensors are moved to the CPU and made contiguous."""
    import safetensors.torch

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(cpu, str(path), metadata=metadata)
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(n)
        new = _sorted_header(header)
        if len(new) > n:  # (cannot happen: the same JSON, reordered) never write a wrong file
            raise ValueError(f"{path}: internal error: the sorted safetensors header is longer")
        os.pwrite(fd, new + b" " * (n - len(new)), 8)  # (the writer pads with spaces too)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, _file_mode())  # the safetensors writer creates its file 0600 on some versions


def _temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new name beside ``path`` for a temporary file, claimed by creating the file empty (or,
    with ``suffix=".link"``, a name no file has yet)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{next(tempfile._get_candidate_names())}{suffix}"
        if suffix == ".link":
            if not os.path.lexists(tmp):
                return tmp
            continue
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def _atomic(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically with ``write(temporary path)``: a temporary file beside it, fsync,
    rename, fsync of the directory. Any failure raises :class:`FileWriteError` (the previous file
    unchanged, the temporary file removed); a KeyboardInterrupt removes it too."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        tmp = None
    except Exception as e:
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise write_error(path, e) from e
        raise
    finally:
        if tmp is not None:
            _unlink_quietly(tmp)
    _fsync_dir(path.parent, strict=False)
    return path


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, fsync, rename).

    Raises:
        FileWriteError: the file cannot be written (the message names it; the previous file is
            unchanged and no temporary file is left).
    """
    return _atomic(path, lambda tmp: write_bytes_new(tmp, data))


def atomic_save_safetensors(tensors: Dict[str, Tensor], path: PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically, with sorted metadata keys (tensors
    are moved to the CPU and made contiguous).

    Raises:
        FileWriteError: as :func:`atomic_write_bytes` (never a SafetensorError).
    """
    return _atomic(path, lambda tmp: save_safetensors_new(tensors, tmp, metadata))


# ---------------------------------------------------------------------------- atomic units
def _version_re(pointer: str) -> "re.Pattern[str]":
    return re.compile(re.escape(f".{pointer}-") + r"(\d+)$")


def _next_version(directory: Path, pointer: str) -> Path:
    """``directory/.<pointer>-<n>`` with n above every version directory there."""
    numbers = [int(m.group(1)) for m in map(_version_re(pointer).match, os.listdir(directory)) if m]
    return directory / f".{pointer}-{max(numbers, default=0) + 1}"


def unit_dir(directory: PathLike, pointer: str) -> Path:
    """The directory to read a unit's files from: the version ``directory/pointer`` names (read
    once, so that every file comes from the same version), or ``directory`` itself when it has no
    pointer (files written before units existed, or a copy made with ``cp -L``)."""
    directory = Path(directory)
    if directory.is_symlink() and directory.name == pointer:  # the link itself: its version
        return directory.parent / os.readlink(directory)
    link = directory / pointer
    if link.is_symlink():
        return directory / os.readlink(link)
    return link if link.is_dir() else directory


def write_unit(directory: PathLike, pointer: str, files: Dict[str, Callable[[Path], None]],
               links: Tuple[str, ...] = ()) -> Path:
    """Write a set of files that belong together as one atomic unit.

    Every file is written (``files[name](path)``, which must fsync it: :func:`write_bytes_new`,
    :func:`save_safetensors_new`) into a fresh version directory ``directory/.<pointer>-<n>``;
    the directory is fsynced; then one symlink ``directory/<pointer>`` → the version is replaced
    (one rename, atomic), which commits the version. Afterwards the names in ``links`` get
    symlinks ``directory/<name>`` → ``<pointer>/<name>`` (once; a regular file of an older layout
    there is replaced) and the older versions are removed.

    A crash, SIGKILL or Ctrl-C before the rename leaves the previous version whole (and at most an
    uncommitted version directory, removed by the next write); after it, the new one.

    Returns:
        ``directory / pointer``.

    Raises:
        FileWriteError: a file cannot be written (the message names ``directory/<name>``); the
            previous version is unchanged and the new version directory removed.
    """
    directory = Path(directory)
    version = link = None
    name = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _adopt_real_pointer(directory, pointer)
        version = _next_version(directory, pointer)
        os.mkdir(version)
        for name, write in files.items():
            write(version / name)
        name = None
        _fsync_dir(version)
        link = _temp_beside(directory / pointer, ".link")
        os.symlink(version.name, link)
        os.replace(link, directory / pointer)  # the commit
        link = version = None
    except BaseException as e:
        if link is not None:
            _unlink_quietly(link)
        if version is not None:
            shutil.rmtree(version, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            where = directory / name if name is not None else directory
            raise write_error(where, e, f"nothing in {directory} was changed") from e
        raise
    _fsync_dir(directory, strict=False)
    _finish_unit(directory, pointer, links)
    return directory / pointer


def _adopt_real_pointer(directory: Path, pointer: str) -> None:
    """A real directory at ``directory/pointer`` (a run copied with ``cp -L``) becomes a version
    directory, so that the pointer can be a symlink again. Until the commit that follows, readers
    see the files of the directory itself, copies of the same version."""
    link = directory / pointer
    if link.is_dir() and not link.is_symlink():
        os.rename(link, _next_version(directory, pointer))


def _finish_unit(directory: Path, pointer: str, links: Tuple[str, ...]) -> None:
    """After a commit: the convenience symlinks, then the removal of older versions. The version
    is committed already, so a failure here is a warning, never an error."""
    current = os.readlink(directory / pointer)
    try:
        for name in links:
            top, target = directory / name, f"{pointer}/{name}"
            if top.is_symlink() and os.readlink(top) == target:
                continue
            if top.is_dir() and not top.is_symlink():
                continue
            tmp = _temp_beside(top, ".link")
            os.symlink(target, tmp)
            try:
                os.replace(tmp, top)
            except OSError:
                _unlink_quietly(tmp)
                raise
        pattern = _version_re(pointer)
        # the temporary links of _temp_beside(...,".link") that a killed writer left
        stale = re.compile(r"\.(?:%s)\.\d+\.[^.]+\.link$" % "|".join(map(re.escape, (pointer, *links))))
        for entry in os.listdir(directory):
            if pattern.match(entry) and entry != current:
                shutil.rmtree(directory / entry, ignore_errors=True)
            elif stale.match(entry):
                _unlink_quietly(directory / entry)
    except OSError as e:
        warnings.warn(f"{directory}: the new version is saved in {directory / pointer}, but "
                      f"tidying up failed: {e}", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ reads
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
    """Make sure, before a long run, that ``path`` can be written: a directory or a file (in its
    parent), by writing and removing a probe file. Directories missing on the way are made for
    the probe and removed after it (the writers make them again), so a run that fails later
    leaves none behind.

    Raises:
        OSError (PermissionError, NotADirectoryError, IsADirectoryError, ...): the message names
            ``what`` and ``path``.
    """
    p = Path(path)
    target = p if directory else p.parent
    missing = [d for d in (target, *target.parents) if not d.exists()]
    try:
        if not directory and p.is_dir():
            raise IsADirectoryError(f"{p} is a directory")
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".sparsevd-probe-"):
            pass
    except OSError as e:
        raise type(e)(f"{what} {p} is not writable: {e.strerror or e}") from None
    finally:
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
