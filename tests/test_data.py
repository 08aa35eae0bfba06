"""Tests for sparsevd.data: IDX parsing, search order, SHA256 checks, download, loaders."""
import gzip
import hashlib
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsevd import data
from sparsevd.data import (DATASETS, FILE_NAMES, find_dataset_dir, load_dataset, make_loaders,
                           read_idx)

N_TRAIN, N_TEST = 7, 5


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialize a uint8 array as IDX (magic 0x0801 / 0x0803, big-endian dims)."""
    assert arr.dtype == np.uint8
    magic = {1: 0x801, 3: 0x803}[arr.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_fake(directory: Path, seed: int = 0, sums: bool = True) -> dict:
    """Write four gzipped IDX files (+ SHA256SUMS) into ``directory``; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    # make sure the extremes 0 and 255 occur, to check the scaling end points
    arrays["train-images-idx3-ubyte.gz"][0, 0, :2] = [0, 255]
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for fname, arr in arrays.items():
        blob = gzip.compress(idx_bytes(arr), mtime=0)
        (directory / fname).write_bytes(blob)
        lines.append(f"{hashlib.sha256(blob).hexdigest()}  {fname}\n")
    if sums:
        (directory / "SHA256SUMS").write_text("".join(lines))
    return arrays


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No real data dirs leak in: HOME, SPARSEVD_DATA, system dirs all point into tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SPARSEVD_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    return home


def check_exact(result, arrays):
    tr_x, tr_y, te_x, te_y = result
    assert tr_x.shape == (N_TRAIN, 1, 28, 28) and te_x.shape == (N_TEST, 1, 28, 28)
    assert tr_y.shape == (N_TRAIN,) and te_y.shape == (N_TEST,)
    assert tr_x.dtype == te_x.dtype == torch.float32
    assert tr_y.dtype == te_y.dtype == torch.int64
    for x, fname in ((tr_x, FILE_NAMES[0]), (te_x, FILE_NAMES[2])):
        raw = torch.from_numpy(arrays[fname]).unsqueeze(1)
        assert torch.equal(x, raw.to(torch.float32) / 255.0)       # every element, exactly
        assert torch.equal((x * 255).round().to(torch.uint8), raw)  # and it round-trips
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    for y, fname in ((tr_y, FILE_NAMES[1]), (te_y, FILE_NAMES[3])):
        assert torch.equal(y, torch.from_numpy(arrays[fname]).to(torch.int64))
    assert float(tr_x[0, 0, 0, 0]) == 0.0 and float(tr_x[0, 0, 0, 1]) == 1.0


def test_load_exact_values(tmp_path):
    arrays = write_fake(tmp_path / "d")
    check_exact(load_dataset("fashion-mnist", data_dir=tmp_path / "d", download=False), arrays)


def test_data_dir_with_name_subdir(tmp_path):
    arrays = write_fake(tmp_path / "root" / "mnist")
    assert find_dataset_dir("mnist", tmp_path / "root") == tmp_path / "root" / "mnist"
    check_exact(load_dataset("MNIST", data_dir=str(tmp_path / "root"), download=False), arrays)


def test_sha256_argument_instead_of_sums_file(tmp_path):
    d = tmp_path / "d"
    arrays = write_fake(d, sums=False)
    # without SHA256SUMS the built-in (canonical) table applies and the fake files fail it
    with pytest.raises(ValueError, match="SHA256 mismatch"):
        load_dataset("fashion-mnist", data_dir=d, download=False)
    hashes = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILE_NAMES}
    check_exact(load_dataset("fashion-mnist", data_dir=d, download=False, sha256=hashes), arrays)


def test_search_order(tmp_path, monkeypatch, isolated_env):
    a = write_fake(tmp_path / "explicit", seed=1)
    b = write_fake(tmp_path / "env" / "fashion-mnist", seed=2)
    c = write_fake(isolated_env / ".cache" / "sparsevd" / "fashion-mnist", seed=3)
    d = write_fake(tmp_path / "system" / "fashion-mnist", seed=4)
    monkeypatch.setenv("SPARSEVD_DATA", str(tmp_path / "env"))
    name = "fashion-mnist"
    assert find_dataset_dir(name, tmp_path / "explicit") == tmp_path / "explicit"
    check_exact(load_dataset(name, data_dir=tmp_path / "explicit", download=False), a)
    # no data_dir: $SPARSEVD_DATA/<name> wins over the cache
    assert find_dataset_dir(name) == tmp_path / "env" / name
    check_exact(load_dataset(name, download=False), b)
    # $SPARSEVD_DATA holding the files directly also works
    monkeypatch.setenv("SPARSEVD_DATA", str(tmp_path / "env" / name))
    assert find_dataset_dir(name) == tmp_path / "env" / name
    # an explicit data_dir is used as given: an incomplete or missing one is an error, never
    # replaced by the env dir
    (tmp_path / "partial").mkdir()
    (tmp_path / "explicit" / FILE_NAMES[0]).replace(tmp_path / "partial" / FILE_NAMES[0])
    with pytest.raises(FileNotFoundError, match="partial"):
        find_dataset_dir(name, tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_dataset_dir(name, tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match=r"typo given by --data-dir / data_dir does not exist"):
        load_dataset(name, data_dir=tmp_path / "typo")  # not even with download=True
    # then the cache under $HOME, then the system dir
    monkeypatch.delenv("SPARSEVD_DATA")
    assert find_dataset_dir(name) == isolated_env / ".cache" / "sparsevd" / name
    check_exact(load_dataset(name, download=False), c)
    for f in FILE_NAMES[:1]:
        (isolated_env / ".cache" / "sparsevd" / name / f).unlink()
    assert find_dataset_dir(name) == tmp_path / "system" / name
    check_exact(load_dataset(name, download=False), d)


def test_corrupted_file_names_file_and_hashes(tmp_path):
    d = tmp_path / "d"
    write_fake(d)
    target = d / "t10k-images-idx3-ubyte.gz"
    expected = hashlib.sha256(target.read_bytes()).hexdigest()
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(ValueError) as exc:
        load_dataset("fashion-mnist", data_dir=d, download=False)
    msg = str(exc.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and expected in msg and actual in msg


def test_truncated_idx(tmp_path):
    d = tmp_path / "d"
    arrays = write_fake(d)
    raw = idx_bytes(arrays[FILE_NAMES[0]])
    for bad, what in ((raw[:-3], "truncated"), (raw + b"\0", "extra"), (raw[:10], "truncated")):
        p = tmp_path / "bad-idx3-ubyte.gz"
        p.write_bytes(gzip.compress(bad))
        with pytest.raises(ValueError, match=what) as exc:
            read_idx(p)
        assert str(p) in str(exc.value)
    # truncated gzip stream itself
    p.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(ValueError, match="bad-idx3-ubyte.gz"):
        read_idx(p)
    # through load_dataset, with a SHA256SUMS that matches the truncated file
    blob = gzip.compress(raw[:-28])
    (d / FILE_NAMES[0]).write_bytes(blob)
    (d / "SHA256SUMS").write_text(f"{hashlib.sha256(blob).hexdigest()}  {FILE_NAMES[0]}\n",
                                  encoding="ascii")
    with pytest.raises(ValueError, match="truncated") as exc:
        load_dataset("fashion-mnist", data_dir=d, download=False,
                     sha256={f: hashlib.sha256((d / f).read_bytes()).hexdigest()
                             for f in FILE_NAMES[1:]})
    assert FILE_NAMES[0] in str(exc.value)


def test_read_idx_plain_and_bad_magic(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    p = tmp_path / "plain-idx3-ubyte"
    p.write_bytes(idx_bytes(arr))
    t = read_idx(p)
    assert t.dtype == torch.uint8 and torch.equal(t, torch.from_numpy(arr))
    labels = np.array([3, 1, 4], dtype=np.uint8)
    p.write_bytes(gzip.compress(idx_bytes(labels)))
    assert torch.equal(read_idx(p), torch.from_numpy(labels))
    p.write_bytes(b"\x00\x00\x0d\x03" + idx_bytes(arr)[4:])  # float32 type code
    with pytest.raises(ValueError, match="magic") as exc:
        read_idx(p)
    assert str(p) in str(exc.value)


def test_missing_everywhere_lists_dirs(tmp_path, monkeypatch, isolated_env):
    monkeypatch.setenv("SPARSEVD_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere", download=False)
    msg = str(exc.value)
    assert f"{tmp_path / 'nowhere'} given by --data-dir / data_dir does not exist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty", download=False)
    msg = str(exc.value)
    for d in (tmp_path / "empty", tmp_path / "empty" / "fashion-mnist"):
        assert str(d) in msg
    assert str(tmp_path / "env") not in msg  # an explicit directory is the only place looked at
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("fashion-mnist", download=False)
    msg = str(exc.value)
    for d in (tmp_path / "env" / "fashion-mnist", tmp_path / "env",
              isolated_env / ".cache" / "sparsevd" / "fashion-mnist",
              tmp_path / "system" / "fashion-mnist"):
        assert str(d) in msg
    assert "download=False" in msg and "SPARSEVD_DATA" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("mnist", download=False)
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("cifar10", download=False)


def test_download_from_file_urls(tmp_path, monkeypatch, isolated_env):
    src = tmp_path / "server"
    arrays = write_fake(src, sums=False)
    hashes = {f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in FILE_NAMES}
    spec = dict(DATASETS["mnist"], url=src.as_uri() + "/", sha256=hashes)
    monkeypatch.setitem(DATASETS, "mnist", spec)
    # with data_dir: downloads into data_dir/<name>
    (tmp_path / "dd").mkdir()
    check_exact(load_dataset("mnist", data_dir=tmp_path / "dd"), arrays)
    assert sorted(p.name for p in (tmp_path / "dd" / "mnist").iterdir()) == sorted(FILE_NAMES)
    assert find_dataset_dir("mnist", tmp_path / "dd") == tmp_path / "dd" / "mnist"
    # without: downloads into ~/.cache/sparsevd/mnist
    check_exact(load_dataset("mnist"), arrays)
    cache = isolated_env / ".cache" / "sparsevd" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILE_NAMES)
    assert find_dataset_dir("mnist") == cache


def test_download_failure_reported(tmp_path, monkeypatch):
    spec = dict(DATASETS["mnist"], url=(tmp_path / "no-server").as_uri() + "/")
    monkeypatch.setitem(DATASETS, "mnist", spec)
    (tmp_path / "dd").mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("mnist", data_dir=tmp_path / "dd")
    msg = str(exc.value)
    assert "download into" in msg and "failed" in msg and "train-images-idx3-ubyte.gz" in msg
    assert not list((tmp_path / "dd" / "mnist").iterdir())  # no partial files left behind
    # a downloaded file with the wrong hash is rejected and removed
    src = tmp_path / "server"
    write_fake(src, sums=False)
    monkeypatch.setitem(DATASETS, "mnist", dict(DATASETS["mnist"], url=src.as_uri() + "/"))
    (tmp_path / "dd2").mkdir()
    with pytest.raises(FileNotFoundError, match="SHA256 mismatch"):
        load_dataset("mnist", data_dir=tmp_path / "dd2")
    assert not list((tmp_path / "dd2" / "mnist").iterdir())


def test_make_loaders(tmp_path):
    d = tmp_path / "d"
    arrays = write_fake(d)
    train, test = make_loaders("fashion-mnist", batch_size=3, data_dir=d, download=False)
    xs, ys = zip(*train)
    assert [x.shape[0] for x in xs] == [3, 3, 1]
    assert xs[0].shape[1:] == (1, 28, 28) and xs[0].dtype == torch.float32
    assert ys[0].dtype == torch.int64
    all_y = torch.cat(ys)
    expected = torch.from_numpy(arrays[FILE_NAMES[1]]).to(torch.int64)
    assert torch.equal(all_y.sort().values, expected.sort().values)  # a permutation
    # same seed -> same order; test loader in file order
    train2, _ = make_loaders("fashion-mnist", batch_size=3, data_dir=d, download=False)
    assert torch.equal(torch.cat([y for _, y in train2]), all_y)
    test_y = torch.cat([y for _, y in test])
    assert torch.equal(test_y, torch.from_numpy(arrays[FILE_NAMES[3]]).to(torch.int64))
    # subset limits both splits to the first `subset` images
    train, test = make_loaders("fashion-mnist", batch_size=2, data_dir=d, subset=4,
                               download=False)
    assert sum(x.shape[0] for x, _ in train) == 4
    tx = torch.cat([x for x, _ in test])
    raw = torch.from_numpy(arrays[FILE_NAMES[2]][:4]).unsqueeze(1).to(torch.float32) / 255
    assert torch.equal(tx, raw)


def _real_fashion_dir():
    roots = []
    if os.environ.get("SPARSEVD_DATA"):
        roots.append(Path(os.environ["SPARSEVD_DATA"]))
    roots.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    for root in roots:
        for d in (root / "fashion-mnist", root):
            if all((d / f).is_file() for f in FILE_NAMES):
                return d
    return None


_REAL = _real_fashion_dir()  # evaluated before the autouse fixture clears SPARSEVD_DATA


@pytest.mark.skipif(_REAL is None, reason="real Fashion-MNIST files not available")
def test_real_fashion_mnist():
    tr_x, tr_y, te_x, te_y = load_dataset("fashion-mnist", data_dir=_REAL, download=False)
    assert tr_x.shape == (60000, 1, 28, 28) and te_x.shape == (10000, 1, 28, 28)
    assert tr_y.shape == (60000,) and te_y.shape == (10000,)
    assert tr_x.dtype == torch.float32 and tr_y.dtype == torch.int64
    for y in (tr_y, te_y):
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.equal(torch.bincount(y), torch.full((10,), y.numel() // 10))  # balanced
    assert 0.0 <= float(tr_x.min()) and float(tr_x.max()) <= 1.0
    assert float(tr_x.max()) == 1.0


class FakeApt:
    """Stands in for subprocess.run of apt-get: records commands, fails the first install."""

    def __init__(self, system_dir: Path, fail_first_install: bool = True, works: bool = True):
        self.calls = []
        self.system_dir = system_dir
        self.fail_first_install = fail_first_install
        self.works = works

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd[1:]))
        ok = self.works
        if cmd[1] == "install" and self.fail_first_install and len(self.calls) == 1:
            ok = False  # "Unable to locate package": lists not updated yet
        elif cmd[1] == "install" and ok:
            write_fake(self.system_dir / "fashion-mnist")
        return types.SimpleNamespace(returncode=0 if ok else 100)


@pytest.fixture
def fake_root_apt(tmp_path, monkeypatch):
    apt = FakeApt(tmp_path / "system")
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(data.os, "geteuid", lambda: 0, raising=False)
    monkeypatch.setattr(data.subprocess, "run", apt)
    return apt


def test_apt_install_updates_then_retries(fake_root_apt):
    assert data.apt_install_dataset("fashion-mnist", verbose=False)
    install = ["install", "-y", "--no-install-recommends", "dataset-fashion-mnist"]
    assert fake_root_apt.calls == [install, ["update"], install]


def test_apt_install_not_possible(fake_root_apt, monkeypatch):
    assert not data.apt_install_dataset("mnist")  # no Debian package for MNIST
    monkeypatch.setattr(data.os, "geteuid", lambda: 1000, raising=False)
    assert not data.apt_install_dataset("fashion-mnist")  # not root
    monkeypatch.setattr(data.os, "geteuid", lambda: 0, raising=False)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    assert not data.apt_install_dataset("fashion-mnist")  # no apt-get
    assert fake_root_apt.calls == []
    with pytest.raises(ValueError, match="unknown data set"):
        data.apt_install_dataset("cifar")


def test_load_dataset_apt_fallback(fake_root_apt, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist", download=False)  # apt=False: not tried
    assert fake_root_apt.calls == []
    tr_x, tr_y, te_x, te_y = load_dataset("fashion-mnist", download=False, apt=True)
    assert tr_x.shape == (N_TRAIN, 1, 28, 28) and te_y.shape == (N_TEST,)
    assert len(fake_root_apt.calls) == 3


def test_load_dataset_apt_failure_message(fake_root_apt):
    fake_root_apt.works = False
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist not possible"):
        load_dataset("fashion-mnist", download=False, apt=True)
