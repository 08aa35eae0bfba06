"""MNIST-format (IDX) image classification data sets: Fashion-MNIST and MNIST.

Both data sets ship as the same four gzip-compressed IDX files::

    train-images-idx3-ubyte.gz   60000 x 28 x 28 uint8 images
    train-labels-idx1-ubyte.gz   60000 uint8 labels in [0, 9]
    t10k-images-idx3-ubyte.gz    10000 x 28 x 28 uint8 images
    t10k-labels-idx1-ubyte.gz    10000 uint8 labels in [0, 9]

Sources:

* Fashion-MNIST: H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017 (MIT license).
  Debian's package ``dataset-fashion-mnist`` installs the files under
  ``/usr/share/datasets/fashion-mnist/``.
* MNIST: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to document
  recognition", Proc. IEEE 86(11), 1998. Downloaded from the PyTorch (ossci) mirror of the
  original LeCun files, which are byte-identical to them.

Where the files are looked for (:func:`find_dataset_dir`), in order:

1. when ``data_dir`` is given: ``data_dir`` itself, then ``data_dir/<name>/``, and nothing else
   (an explicit directory is used as given or is an error: it must exist; a missing file is
   downloaded into ``data_dir/<name>/`` or reported, never looked for elsewhere);
2. otherwise ``$SPARSEVD_DATA/<name>/``, then ``$SPARSEVD_DATA`` itself (when the variable is set);
3. ``~/.cache/sparsevd/<name>/`` (also where downloads go when no ``data_dir`` is given);
4. ``/usr/share/datasets/<name>/``.

A directory counts only when all four files are in it. When none is found and ``download`` is
true, the files are downloaded into ``data_dir/<name>/`` (``data_dir`` given) or
``~/.cache/sparsevd/<name>/``.

Integrity check (SHA256 of each .gz file, as stored on disk), expected hashes taken from, per file:

1. the ``sha256`` argument of :func:`load_dataset` (a ``{file name: hex digest}`` dict), if it
   names the file;
2. otherwise a ``SHA256SUMS`` file next to the data (``sha256sum`` format: ``<hex>  <file>``),
   if present and it names the file — it is read and the file must match it;
3. otherwise the built-in table ``DATASETS[name]["sha256"]`` (the canonical upstream files).

A mismatch raises :class:`ValueError` naming the file, the expected and the actual hash.

Last fallback (``apt=True``, used by ``sparsevd train``): when the files are found nowhere and the
download fails, and the data set has a Debian package (Fashion-MNIST: ``dataset-fashion-mnist``),
``apt-get`` exists and the process runs as root, :func:`apt_install_dataset` runs
``apt-get install -y <package>`` (after ``apt-get update`` when the first try fails) and the search
is repeated; the package installs to ``/usr/share/datasets/<name>/``.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler,
                              SequentialSampler, TensorDataset)

__all__ = [
    "APT_PACKAGES",
    "DATASETS",
    "FILE_NAMES",
    "apt_install_dataset",
    "SHA256SUMS_NAME",
    "find_dataset_dir",
    "load_dataset",
    "make_loaders",
    "read_idx",
    "sha256_file",
]

PathLike = Union[str, os.PathLike]

#: The four files of an MNIST-format data set, in the order train images, train labels,
#: test images, test labels (the order of :func:`load_dataset`'s result).
FILE_NAMES: Tuple[str, str, str, str] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: Name of the optional checksum file next to the data (``sha256sum`` output format).
SHA256SUMS_NAME = "SHA256SUMS"

#: Known data sets: name -> ``files`` (the four file names, in :data:`FILE_NAMES` order),
#: ``sha256`` (file name -> SHA256 hex digest of the canonical .gz file), ``url`` (download base
#: URL; a file's URL is ``url + file name``), ``classes`` (label index -> class name),
#: ``citation``.
DATASETS: Dict[str, dict] = {
    "fashion-mnist": {
        "files": FILE_NAMES,
        "sha256": {
            "train-images-idx3-ubyte.gz":
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz":
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz":
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz":
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "classes": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        "citation": "Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747",
    },
    "mnist": {
        "files": FILE_NAMES,
        "sha256": {
            "train-images-idx3-ubyte.gz":
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz":
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz":
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz":
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "classes": tuple(str(i) for i in range(10)),
        "citation": "LeCun, Bottou, Bengio, Haffner 1998, Proc. IEEE 86(11)",
    },
}

#: System-wide data directories searched last (Debian's dataset-* packages install here).
SYSTEM_DATA_DIRS: Tuple[Path, ...] = (Path("/usr/share/datasets"),)

#: Debian packages that install a data set under ``/usr/share/datasets/<name>/``.
APT_PACKAGES: Dict[str, str] = {"fashion-mnist": "dataset-fashion-mnist"}

#: Environment variable naming a data directory.
DATA_ENV = "SPARSEVD_DATA"

#: Per-request network timeout for downloads, seconds.
DOWNLOAD_TIMEOUT_S = 20.0

_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # magic -> number of dimensions (dtype: uint8)
_IMAGE_SHAPE = (28, 28)
_NUM_CLASSES = 10


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return key


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "sparsevd"


def _candidate_dirs(name: str, data_dir: Optional[PathLike]) -> List[Path]:
    dirs: List[Path] = []
    if data_dir is not None:  # an explicit directory is the only place looked at
        d = Path(data_dir).expanduser()
        return [d, d / name]
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        e = Path(env).expanduser()
        dirs += [e / name, e]
    dirs.append(_cache_dir() / name)
    dirs += [Path(s) / name for s in SYSTEM_DATA_DIRS]
    unique: List[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _check_data_dir(data_dir: Optional[PathLike]) -> None:
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(
            f"data set not found: the data directory {Path(data_dir).expanduser()} given by "
            "--data-dir / data_dir does not exist (an explicit directory is used as given, never "
            "replaced by another location)")


def _is_complete(directory: Path, files: Iterable[str]) -> bool:
    return all((directory / f).is_file() for f in files)


def find_dataset_dir(name: str, data_dir: Optional[PathLike] = None) -> Path:
    """Return the first directory holding all four files of data set ``name``.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"`` (case and ``_``/``-`` insensitive).
        data_dir: optional directory searched first; it may hold the files directly or in a
            ``<name>/`` subdirectory.

    Search order: ``data_dir`` and ``data_dir/<name>`` when ``data_dir`` is given (only those);
    otherwise ``$SPARSEVD_DATA/<name>``, ``$SPARSEVD_DATA``, ``~/.cache/sparsevd/<name>``,
    ``/usr/share/datasets/<name>``. Only directories containing all four files count. Nothing is
    downloaded or verified.

    Returns:
        The directory, as a :class:`pathlib.Path`.

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: ``data_dir`` does not exist, or no directory qualifies; the message
            lists every directory searched.
    """
    key = _canonical_name(name)
    _check_data_dir(data_dir)
    files = DATASETS[key]["files"]
    candidates = _candidate_dirs(key, data_dir)
    for d in candidates:
        if _is_complete(d, files):
            return d
    raise FileNotFoundError(
        f"data set {key!r} not found; searched (need all of {', '.join(files)}):\n"
        + "\n".join(f"  {d}" for d in candidates))


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Return the SHA256 hex digest (64 lowercase hex characters) of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sha256sums(path: Path) -> Dict[str, str]:
    """Parse a ``sha256sum``-format file into ``{base file name: lowercase hex digest}``."""
    table: Dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if (len(parts) != 2 or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest)):
            raise ValueError(f"{path}:{lineno}: malformed line (want '<sha256>  <file>'): {line!r}")
        fname = parts[1].strip().lstrip("*")
        table[os.path.basename(fname)] = digest
    return table


def _expected_hashes(key: str, directory: Path,
                     sha256: Optional[Mapping[str, str]]) -> Dict[str, str]:
    expected = dict(DATASETS[key]["sha256"])
    sums = directory / SHA256SUMS_NAME
    if sums.is_file():
        expected.update(_read_sha256sums(sums))
    if sha256:
        expected.update({os.path.basename(k): v.lower() for k, v in sha256.items()})
    return expected


def _verify(path: Path, expected: Optional[str]) -> None:
    if expected is None:
        raise ValueError(f"{path}: no expected SHA256 known (add it to a {SHA256SUMS_NAME} file "
                         f"next to it or pass sha256=...)")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(f"{path}: SHA256 mismatch: expected {expected.lower()}, got {actual}")


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or plain; detected from the content) of unsigned bytes.

    Format (LeCun et al. 1998): a big-endian 32-bit magic number — ``0x00000801`` (1-D, uint8,
    labels) or ``0x00000803`` (3-D, uint8, images) — then one big-endian uint32 per dimension,
    then the values in C order.

    Returns:
        A ``torch.uint8`` tensor of shape ``(N,)`` (labels) or ``(N, rows, cols)`` (images).

    Raises:
        ValueError: naming the file — corrupt gzip stream, unknown magic number, header or data
            shorter than the header says (truncated), or bytes left over after the data.
        FileNotFoundError / OSError: the file cannot be opened.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or damaged stream
            raise ValueError(f"{path}: corrupt gzip stream: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no magic number)")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x} "
                         f"(expected 0x00000801 or 0x00000803, unsigned byte data)")
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "extra bytes after data in"
        raise ValueError(f"{path}: {what} IDX file: {len(raw)} bytes, header {dims} "
                         f"implies {expected}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


def _download(key: str, target: Path, sha256: Optional[Mapping[str, str]]) -> None:
    """Download the missing files of ``key`` into ``target``, verifying each; raise on failure."""
    spec = DATASETS[key]
    target.mkdir(parents=True, exist_ok=True)
    expected = _expected_hashes(key, target, sha256)
    for fname in spec["files"]:
        dest = target / fname
        if dest.is_file():
            continue
        url = spec["url"] + fname
        part = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, \
                    open(part, "wb") as out:
                shutil.copyfileobj(resp, out)
            _verify(part, expected.get(fname))
        except ValueError as e:  # hash mismatch
            part.unlink(missing_ok=True)
            raise ValueError(f"downloaded {url}: {e}") from e
        except Exception as e:  # URLError, HTTPError, timeouts, disk errors
            part.unlink(missing_ok=True)
            raise OSError(f"downloading {url}: {type(e).__name__}: {e}") from e
        os.replace(part, dest)


def apt_install_dataset(name: str, verbose: bool = True, timeout_s: float = 900.0) -> bool:
    """Install Debian's package of data set ``name`` with ``apt-get`` (the last data fallback).

    Runs ``apt-get install -y --no-install-recommends <package>``; when that fails (package lists
    missing or stale), runs ``apt-get update`` and tries once more. The package installs the four
    files under ``/usr/share/datasets/<name>/``, which :func:`find_dataset_dir` searches.

    Args:
        name: data set name; only those in :data:`APT_PACKAGES` (``"fashion-mnist"``) have one.
        verbose: print what is run (apt's own output goes to the terminal either way).
        timeout_s: limit per apt-get call, seconds.

    Returns:
        True when the package was installed; False when there is no package for ``name``,
        ``apt-get`` is missing, the process is not root, or apt-get failed (nothing is raised).

    Raises:
        ValueError: unknown ``name``.
    """
    key = _canonical_name(name)
    package = APT_PACKAGES.get(key)
    apt = shutil.which("apt-get")
    geteuid = getattr(os, "geteuid", None)
    if package is None or apt is None or geteuid is None or geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def run(*args: str) -> bool:
        cmd = [apt, *args]
        if verbose:
            print("+ " + " ".join(cmd), flush=True)
        try:
            return subprocess.run(cmd, env=env, timeout=timeout_s, check=False).returncode == 0
        except (OSError, subprocess.SubprocessError) as e:
            if verbose:
                print(f"  failed: {type(e).__name__}: {e}", flush=True)
            return False

    install = ("install", "-y", "--no-install-recommends", package)
    if run(*install):
        return True
    return run("update") and run(*install)


def load_dataset(
    name: str,
    data_dir: Optional[PathLike] = None,
    download: bool = True,
    sha256: Optional[Mapping[str, str]] = None,
    apt: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST (Xiao et al. 2017) or MNIST (LeCun et al. 1998) into memory.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        data_dir: optional directory searched first (files directly in it or in
            ``data_dir/<name>/``); downloads then go to ``data_dir/<name>/``.
        download: when the files are found nowhere, download them (urllib, 20 s timeout per
            request) into ``data_dir/<name>/`` or ``~/.cache/sparsevd/<name>/``.
        sha256: optional ``{file name: hex digest}`` overriding the expected hashes (see the module
            docstring for the precedence: this, then a ``SHA256SUMS`` next to the files, then the
            built-in table).
        apt: last fallback when no ``data_dir`` is given, the files are found nowhere and the
            download failed or is disabled: :func:`apt_install_dataset` (Debian package, as root
            only), then search again.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images ``torch.float32`` of
        shape ``(N, 1, 28, 28)``, pixel intensity scaled from 0..255 to [0, 1] (``x / 255``);
        labels ``torch.int64`` of shape ``(N,)`` in ``[0, 9]``. N = 60000 / 10000 for the
        canonical files.

    Raises:
        ValueError: unknown ``name``; a file's SHA256 mismatches (message names the file, the
            expected and the actual hash); malformed IDX content; images/labels counts disagree,
            images not 28x28, labels outside [0, 9].
        FileNotFoundError: not found and not downloadable; the message lists every directory
            searched, the download error (or that download was disabled) and how to provide the
            files.
    """
    key = _canonical_name(name)
    spec = DATASETS[key]
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        hint = (f"create it, or leave --data-dir out to search {DATA_ENV}, {_cache_dir() / key} and "
                f"{', '.join(str(Path(d) / key) for d in SYSTEM_DATA_DIRS)}")
        if key == "fashion-mnist":
            hint += (" (apt-get install dataset-fashion-mnist installs the files to "
                     "/usr/share/datasets/fashion-mnist)")
        raise FileNotFoundError(
            f"data set {key!r} not found: the data directory {Path(data_dir).expanduser()} given by "
            f"--data-dir / data_dir does not exist; an explicit directory is used as given, never "
            f"replaced by another location: {hint}")
    try:
        directory = find_dataset_dir(key, data_dir)
    except FileNotFoundError as not_found:
        searched = "\n".join(f"  {d}" for d in _candidate_dirs(key, data_dir))
        target = (Path(data_dir).expanduser() / key) if data_dir is not None else _cache_dir() / key
        if download:
            try:
                _download(key, target, sha256)
                directory = target
            except (OSError, ValueError) as e:
                download_msg = f"download into {target} failed: {e}"
                directory = None
        else:
            download_msg = "download disabled (download=False)"
            directory = None
        if directory is None and apt and key in APT_PACKAGES and data_dir is None:
            if apt_install_dataset(key):
                try:
                    directory = find_dataset_dir(key, data_dir)
                except FileNotFoundError:
                    download_msg += f"\napt-get installed {APT_PACKAGES[key]}, but its files were not found"
            else:
                download_msg += (f"\napt-get install {APT_PACKAGES[key]} not possible or failed "
                                 "(needs apt-get and root)")
        if directory is None:
            hint = (f"Provide the four files ({', '.join(spec['files'])}) in a directory and pass "
                    f"it as --data-dir / data_dir=..., or set {DATA_ENV}=<dir> (files in <dir> or "
                    f"<dir>/{key}/), or place them in {_cache_dir() / key}")
            if key == "fashion-mnist":
                hint += (", or install Debian's package: apt-get install dataset-fashion-mnist "
                         "(installs to /usr/share/datasets/fashion-mnist)")
            raise FileNotFoundError(
                f"data set {key!r} not found. Searched:\n{searched}\n{download_msg}\n{hint}."
            ) from not_found

    expected = _expected_hashes(key, directory, sha256)
    tensors = []
    for fname in spec["files"]:
        path = directory / fname
        _verify(path, expected.get(fname))
        tensors.append(read_idx(path))
    train_x, train_y, test_x, test_y = tensors

    out = []
    for split, x, y, (fx, fy) in (("train", train_x, train_y, spec["files"][:2]),
                                  ("test", test_x, test_y, spec["files"][2:])):
        if x.dim() != 3 or tuple(x.shape[1:]) != _IMAGE_SHAPE:
            raise ValueError(f"{directory / fx}: images have shape {tuple(x.shape)}, "
                             f"expected (N, 28, 28)")
        if y.dim() != 1:
            raise ValueError(f"{directory / fy}: labels have shape {tuple(y.shape)}, expected (N,)")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{split} split: {x.shape[0]} images ({fx}) but {y.shape[0]} labels "
                             f"({fy}) in {directory}")
        if y.numel() and int(y.max()) >= _NUM_CLASSES:
            raise ValueError(f"{directory / fy}: label {int(y.max())} outside [0, 9]")
        out += [x.unsqueeze(1).to(torch.float32).div_(255.0), y.to(torch.int64)]
    return tuple(out)  # type: ignore[return-value]


def make_loaders(
    name: str,
    batch_size: int,
    data_dir: Optional[PathLike] = None,
    subset: Optional[int] = None,
    seed: int = 0,
    download: bool = True,
    test_batch_size: Optional[int] = None,
    apt: bool = False,
    world_size: int = 1,
    rank: int = 0,
) -> Tuple[DataLoader, DataLoader]:
    """Build ``(train_loader, test_loader)`` over :func:`load_dataset`'s tensors.

    Args:
        name, data_dir, download, apt: as for :func:`load_dataset`.
        batch_size: training batch size (images per batch); with ``world_size`` > 1 the global
            batch: each rank draws ``batch_size / world_size`` of it through a
            :class:`~torch.utils.data.DistributedSampler` (shuffled with ``seed`` and the epoch:
            call ``loader.batch_sampler.sampler.set_epoch(e)``, as :func:`sparsevd.train.fit`
            does).
        world_size, rank: the data-parallel group (1 and 0: a single process).
        subset: if given, keep only the first ``subset`` training and the first ``subset`` test
            images (for quick runs); ``None`` keeps all.
        seed: seeds the training loader's shuffling generator (same seed -> same batch order).
        test_batch_size: test batch size; defaults to ``batch_size``.

    Returns:
        Two :class:`torch.utils.data.DataLoader` (``num_workers=0``) yielding
        ``(images float32 (B, 1, 28, 28) in [0, 1], labels int64 (B,))``; the training one is
        shuffled every epoch, the test one is in file order. The last batch may be smaller.

    Raises:
        ValueError: ``batch_size`` or ``subset`` not positive; as :func:`load_dataset`.
        FileNotFoundError: as :func:`load_dataset`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"world_size, rank: expected world_size ≥ 1 and 0 ≤ rank < world_size, "
                         f"got {world_size} and {rank}")
    if batch_size % world_size:
        raise ValueError(f"batch_size: the global batch {batch_size} must be divisible by the "
                         f"number of processes {world_size}")
    if subset is not None and subset <= 0:
        raise ValueError(f"subset must be positive or None, got {subset}")
    train_x, train_y, test_x, test_y = load_dataset(name, data_dir=data_dir, download=download,
                                                    apt=apt)
    if subset is not None:
        train_x, train_y = train_x[:subset], train_y[:subset]
        test_x, test_y = test_x[:subset], test_y[:subset]
    generator = torch.Generator().manual_seed(int(seed))
    train_set, test_set = TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)
    # Batches are gathered with one tensor index per batch (a BatchSampler fed to the dataset),
    # not by collating B single images: the loader then costs microseconds per batch.
    if world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=int(seed))
        batch_size //= world_size
    else:
        sampler = RandomSampler(train_set, generator=generator)
    train_loader = DataLoader(train_set, batch_size=None, num_workers=0,
                              sampler=BatchSampler(sampler, batch_size, False))
    test_loader = DataLoader(
        test_set, batch_size=None, num_workers=0,
        sampler=BatchSampler(SequentialSampler(test_set), test_batch_size or batch_size, False))
    return train_loader, test_loader
