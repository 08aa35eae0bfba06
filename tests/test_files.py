"""What every write of sparsevd guarantees (sparsevd/_files.py; README, "Files and safety"):

- a training checkpoint (model.safetensors, config.json, train_state.safetensors, timings.json)
  is one atomic unit: the writer is killed (SIGKILL) or interrupted (Ctrl-C) before each file
  operation of a save in turn, and what is left is always the previous version or the new one,
  whole and consistent, from every way of naming it;
- a full disk (ENOSPC injected before each file operation of every write path, and a real small
  tmpfs where the tests run as root) gives one FileWriteError (an OSError) naming the file, the
  previous version unchanged and no temporary file;
- the same content gives the same bytes (deployed models, training checkpoints across processes
  with different PYTHONHASHSEED);
- checkpoints of the older layout (files directly in the directory) still load and resume.
"""
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

import sparsevd
from sparsevd import _files, cli
from sparsevd.cli import deploy as deploy_cli
from sparsevd.checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, load_train_state, read_config,
                                 save_checkpoint)
from sparsevd.models import LeNet300
from test_cli import _train_args, data_dir  # noqa: F401  (the data fixture)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": "lenet300", "svd": True, "threshold": 3.0, "input_shape": [1, 28, 28]}


# ------------------------------------------------------------------------------ injection
#: The file operations a write is made of; a fault is injected before the k-th call of any of them.
OPERATIONS = [(os, n) for n in ("open", "write", "pwrite", "fsync", "replace", "rename", "symlink",
                                "mkdir", "unlink", "rmdir", "chmod")] + [(safetensors.torch, "save_file")]
#: Those that can fail with ENOSPC (creating or growing a file or a name): the full-disk injection.
CREATING = {"open", "write", "pwrite", "fsync", "replace", "rename", "symlink", "mkdir", "save_file"}


def _inject(monkeypatch, at, action, names=None):
    """Call ``action(name)`` before the ``at``-th call of the file operations (``names`` only);
    returns a list whose length counts the calls so far."""
    calls = []
    for module, name in OPERATIONS:
        if names is not None and name not in names:
            continue
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == at:
                action(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


def _operations(write, names=None) -> list:
    """The names of the file operations ``write()`` makes, in order."""
    mp = pytest.MonkeyPatch()
    try:
        calls = _inject(mp, 0, lambda name: None, names)
        write()
    finally:
        mp.undo()
    return calls


def _count_operations(write, names=None) -> int:
    return len(_operations(write, names))


def _enospc(name):
    if name == "save_file":  # what the safetensors writer raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _ctrl_c(name):
    raise KeyboardInterrupt


def _sigkill(name):
    os.kill(os.getpid(), signal.SIGKILL)


def _in_killed_child(write, at) -> bool:
    """Run ``write`` in a forked child that SIGKILLs itself before its ``at``-th file operation;
    True when it was killed, False when it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            mp = pytest.MonkeyPatch()
            _inject(mp, at, _sigkill)
            write()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the writer hung (injection at operation {at})")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the writer failed (injection at operation {at})"
    return False


# ------------------------------------------------------------------------------ checkpoints
@functools.lru_cache(maxsize=None)
def _model(seed: int) -> nn.Module:
    """A LeNet-300-100 (sparse VD) with parameters drawn from ``seed`` (shared: do not modify)."""
    g = torch.Generator().manual_seed(seed)
    model = LeNet300(svd=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@functools.lru_cache(maxsize=None)
def _train_state(epoch):
    """(tensors, meta) of the training state of epoch ``epoch``: an optimizer moment per parameter
    of ``_model(epoch)``, measured times (shared: do not modify; computed before any fork, so that
    the killed writers do no tensor arithmetic)."""
    tensors = {f"optimizer.{i}.exp_avg": p.detach() * epoch for i, p in enumerate(_model(epoch).parameters())}
    meta = {"epoch": epoch, "history": [{"epoch": e, "loss": 1.0 / e, "train_seconds": 0.1 * e}
                                         for e in range(1, epoch + 1)],
            "step_ms": [1.5] * epoch, "train_seconds": 0.5 * epoch}
    return tensors, meta


def _save_version(run, epoch):
    model = _model(epoch)
    save_checkpoint(model, run, dict(CONFIG, epoch=epoch), train_state=_train_state(epoch))


def _write_older_layout(run, epoch):
    """A checkpoint as the sparsevd before units wrote it: the files directly in the directory,
    config.json unsorted, the measured times inside the training state."""
    from sparsevd._files import digest

    run.mkdir(parents=True, exist_ok=True)
    model = _model(epoch)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cfg = dict(CONFIG, epoch=epoch, format=CHECKPOINT_FORMAT, weights_sha256=digest(state))
    raw = (json.dumps(cfg, indent=2) + "\n").encode()
    (run / "config.json").write_bytes(raw)
    safetensors.torch.save_file(state, str(run / "model.safetensors"), metadata={
        "format": "sparsevd.checkpoint", "config_sha256": hashlib.sha256(raw).hexdigest()})
    tensors, meta = _train_state(epoch)
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{k: v.contiguous() for k, v in tensors.items()}}
    text = json.dumps(meta, separators=(",", ":"))
    safetensors.torch.save_file(tensors, str(run / "train_state.safetensors"), metadata={
        "format": "sparsevd.train_state", "state": text,
        "sha256": digest(tensors, "sparsevd.train_state", text)})


def _fresh_older_layout(run):
    shutil.rmtree(run, ignore_errors=True)
    _write_older_layout(run, 1)


def _version_on_disk(run) -> int:
    """The epoch of the checkpoint in ``run``, read every way it can be named; asserts that its
    files agree with each other (weights, config, training state) and with the model of that epoch."""
    epochs = set()
    for name in (run, run / "model.safetensors", run / "config.json"):
        if name != run and not name.exists():
            continue  # the convenience links of a first save are made after its commit
        model = load_checkpoint(name)
        epoch = read_config(name)["epoch"]
        for (k, a), b in zip(model.state_dict().items(), _model(epoch).state_dict().values()):
            assert torch.equal(a, b), (name, k)
        epochs.add(epoch)
    state = load_train_state(run)
    epochs.add(state.meta["epoch"])
    assert len(epochs) == 1, f"files of different versions: {epochs}"
    expected = _train_state(state.meta["epoch"])[1]
    assert state.meta == expected  # the measured times (timings.json) merged back
    for k, v in load_checkpoint(run).state_dict().items():
        assert torch.equal(state.model[k], v), k
    return epochs.pop()


def _leftovers(run):
    """Temporary files and uncommitted or old version directories in ``run``."""
    names = os.listdir(run)
    current = os.readlink(run / "checkpoint") if (run / "checkpoint").is_symlink() else None
    return sorted(n for n in names if n.endswith((".tmp", ".link"))
                  or n.startswith(".checkpoint-") and n != current)


@pytest.mark.parametrize("layout", ["unit", "older layout"])
def test_a_checkpoint_save_killed_at_every_file_operation_leaves_a_whole_version(tmp_path, layout):
    """SIGKILL before operation k of the save of epoch 2 over epoch 1, for every k: the
    directory holds epoch 1 or epoch 2, whole (weights, config and training state of the same
    epoch, by every name), never a mix; once epoch 2 is committed it stays; the next save works
    and leaves nothing behind."""
    run = tmp_path / "run"
    n_ops = None
    committed = False
    seen = []
    for at in range(1, 200):
        if run.exists():
            shutil.rmtree(run)
        (_write_older_layout if layout == "older layout" else _save_version)(run, 1)
        if n_ops is None:
            probe = tmp_path / "probe"
            shutil.copytree(run, probe, symlinks=True)
            n_ops = _count_operations(lambda: _save_version(probe, 2))
            assert n_ops > 10
        killed = _in_killed_child(lambda: _save_version(run, 2), at)
        epoch = _version_on_disk(run)
        seen.append(epoch)
        assert not (committed and epoch == 1), f"epoch 2 was committed, then lost (operation {at})"
        committed = epoch == 2
        if not killed:
            assert at == n_ops + 1 and epoch == 2
            break
        _save_version(run, 3)  # the next save works and tidies up after the killed one
        assert read_config(run)["epoch"] == 3 and _leftovers(run) == []
        assert sorted(os.listdir(run)) == sorted([os.readlink(run / "checkpoint"), "checkpoint", "config.json",
                                                  "model.safetensors", "train_state.safetensors"])
    assert seen[0] == 1 and seen[-1] == 2  # both outcomes were hit


def test_ctrl_c_at_every_file_operation_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    """A KeyboardInterrupt before each file operation of a save: before the commit, the previous
    checkpoint and nothing else (the new version directory removed); after it, the new one."""
    run = tmp_path / "run"
    _save_version(run, 1)
    n_ops = _count_operations(lambda: _save_version(run, 1))
    outcomes = set()
    for at in range(1, n_ops + 1):
        mp = pytest.MonkeyPatch()
        try:
            _inject(mp, at, _ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                _save_version(run, 2)
        finally:
            mp.undo()
        epoch = _version_on_disk(run)
        outcomes.add(epoch)
        if epoch == 1:
            assert _leftovers(run) == [], (at, _leftovers(run))
        _save_version(run, 1)
        assert _leftovers(run) == []
    assert outcomes == {1, 2}


def test_a_reader_racing_a_writer_reads_one_version(tmp_path, monkeypatch):
    """A save commits (and removes the version being read) between the reads of config.json and
    model.safetensors: the reader starts again on the new version instead of failing."""
    run = tmp_path / "run"
    _save_version(run, 1)
    read = _files.read_safetensors
    calls = []

    def racing(path):
        if not calls:
            _save_version(run, 2)
        calls.append(path)
        return read(path)

    monkeypatch.setattr(sparsevd.checkpoint, "read_safetensors", racing)
    assert read_config(run)["epoch"] == 1
    model = load_checkpoint(run)
    for a, b in zip(model.state_dict().values(), _model(2).state_dict().values()):
        assert torch.equal(a, b)
    assert len(calls) == 2


def test_older_layout_loads_resumes_and_turns_into_a_unit(tmp_path):
    run = tmp_path / "run"
    _write_older_layout(run, 1)
    assert _version_on_disk(run) == 1  # weights, config, state (times inline) of the older layout
    _save_version(run, 2)
    assert (run / "checkpoint").is_symlink() and (run / "model.safetensors").is_symlink()
    assert _version_on_disk(run) == 2 and _leftovers(run) == []
    # a copy made with `cp -L` (every link a real file or directory) loads and saves too
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=False)
    assert not (copy / "checkpoint").is_symlink() and _version_on_disk(copy) == 2
    _save_version(copy, 3)
    assert _version_on_disk(copy) == 3 and _leftovers(copy) == []


# ------------------------------------------------------------------------------ full disk
def _deployed(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(sparsevd.nn.LinearSVDO(40, 30), nn.ReLU(), sparsevd.nn.LinearSVDO(30, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sparsevd.deploy(model.eval(), cost_model="csr")


def _same_deployed(path, seed) -> bool:
    x = torch.randn(5, 40)
    with torch.no_grad():
        return torch.equal(sparsevd.load(path)(x), _deployed(seed)(x))


def _read_json(path):
    return json.loads(Path(path).read_text())


def _plot(path, epochs):
    from sparsevd.plots import plot_curves

    plot_curves([{"epoch": e, "test_accuracy": 0.5, "compression": 2.0, "kl_per_image": 1.0,
                  "phase": "sparse_vd"} for e in range(1, epochs + 1)], path)


def _bench_rows(path, value):
    from sparsevd.benchmarks.common import save_rows

    save_rows([{"benchmark": "b", "shape": "s", "dtype": "f", "mode": "m", "provider": "p",
                "median_ms": value}], "cpu", path)


#: Every write path: name -> (file or directory it writes, write(path, version), version(path)).
#: (The plot renders for 0.3 s: it is faulted at its write and its rename only; the atomic write
#: it goes through is faulted everywhere in the summary JSON row.)
WRITE_PATHS = {
    "sparsevd.save (deployed model)": (
        "m.safetensors", lambda p, v: sparsevd.save(_deployed(v), p),
        lambda p: next(v for v in (1, 2) if _same_deployed(p, v))),
    "save_checkpoint with the training state (a unit)": (
        "run", lambda p, v: _save_version(p, v), _version_on_disk),
    "save_checkpoint over the older layout": (
        "old", lambda p, v: _fresh_older_layout(p) if v == 1 else _save_version(p, v), _version_on_disk),
    "summary JSON (atomic_write_bytes)": (
        "summary.json", lambda p, v: _files.atomic_write_bytes(p, json.dumps({"v": v}).encode()),
        lambda p: _read_json(p)["v"]),
    "plot (curves.png)": (
        "curves.png", _plot, lambda p: 1 + (p.read_bytes() != p.with_name("first.png").read_bytes())),
    "benchmark rows (benchmarks/results JSON)": (
        "rows.json", _bench_rows, lambda p: _read_json(p)[0]["median_ms"]),
}


@pytest.mark.parametrize("kind", list(WRITE_PATHS))
def test_full_disk_at_every_file_operation_is_one_error_and_keeps_the_previous_version(
        tmp_path, monkeypatch, kind):
    """ENOSPC (OSError, or the safetensors writer's SafetensorError) injected before each file
    operation that can meet a full disk: one FileWriteError (an OSError, errno ENOSPC, never a
    SafetensorError) whose message names the file, the previous version whole, no temporary file;
    a fault after the commit (tidying up) loses nothing of the new version."""
    name, write, version = WRITE_PATHS[kind]
    path = tmp_path / name
    write(path, 1)
    if kind.startswith("plot"):
        shutil.copy(path, tmp_path / "first.png")
    ops = _operations(lambda: write(path, 1), CREATING)
    assert len(ops) >= 3
    failed = 0
    everywhere = range(1, len(ops) + 1)
    for at in ([ops.index("write") + 1, ops.index("replace") + 1] if kind.startswith("plot") else everywhere):
        before = sorted(os.listdir(tmp_path))
        mp = pytest.MonkeyPatch()
        try:
            _inject(mp, at, _enospc, CREATING)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a fault while tidying up
                write(path, 2)
            error = None
        except Exception as e:  # noqa: BLE001 (the test: which exception)
            error = e
        finally:
            mp.undo()
        if error is None:  # the fault hit an operation after the commit
            assert version(path) == 2
        else:
            failed += 1
            assert isinstance(error, _files.FileWriteError) and isinstance(error, OSError), repr(error)
            assert not isinstance(error, SafetensorError) and error.errno == errno.ENOSPC
            msg = str(error)
            assert "\n" not in msg and "No space left on device" in msg and str(tmp_path / name) in msg
            assert version(path) == 1
            assert sorted(os.listdir(tmp_path)) == before, "a temporary file was left"
            if path.is_dir():
                assert _leftovers(path) == []
        write(path, 1)
        if path.is_dir():
            assert _leftovers(path) == []
    assert failed >= 2


def test_cli_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, data_dir, monkeypatch,  # noqa: F811
                                                                 capsys):
    """`sparsevd train --out` and `sparsevd deploy --out` on a full disk (the safetensors writer
    fails as it does there): exit status 1, one line naming the file, no traceback; the checkpoint
    of the last completed epoch, or the previous deployed file, is kept."""
    save_file = safetensors.torch.save_file
    calls = {"n": 0, "limit": 2}  # the first checkpoint (model.safetensors, train state) fits

    def full(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            _enospc("save_file")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    run = tmp_path / "run"
    rc = cli.main(_train_args(data_dir, run, "--epochs", "2", "--pretrain-epochs", "0"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sparsevd train: {run}/") and "No space left on device" in lines[0]
    assert load_train_state(run).meta["epoch"] == 1 and _leftovers(run) == []
    load_checkpoint(run)

    calls["limit"] = 10**9
    out = tmp_path / "deployed.safetensors"
    assert deploy_cli.main([str(run), "--out", str(out), "--cost-model", "csr", "--batch", "1",
                            "--min-time", "0.01"]) == 0
    first = out.read_bytes()
    calls["limit"] = calls["n"]
    rc = deploy_cli.main([str(run), "--out", str(out), "--cost-model", "csr", "--batch", "1",
                          "--min-time", "0.01"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"sparsevd deploy: {out}: cannot write: No space left on device")
    assert out.read_bytes() == first and sorted(os.listdir(tmp_path)) == ["deployed.safetensors", "run"]


@pytest.fixture
def small_disk(tmp_path):
    """A function mounting a tmpfs of ``size`` bytes at a new directory (root only: skipped
    where mounting is impossible; the injected full-disk tests above run everywhere)."""
    mounted = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _unit_bytes(run) -> int:
    return sum(f.stat().st_size for f in (run / "checkpoint").iterdir())


def test_real_full_disk_tmpfs(tmp_path, small_disk, data_dir, capsys):  # noqa: F811
    """On a small tmpfs, as a user meets it: the second checkpoint, a second deployed model and a
    file beyond the space left fail with one line naming the file; what was there stays."""
    # sparsevd train --out: room for one checkpoint, not for the next one beside it
    probe = tmp_path / "probe"
    args = ("--epochs", "2", "--pretrain-epochs", "0", "--threads", "1")
    assert cli.main(_train_args(data_dir, probe, *args)) == 0
    disk = small_disk(int(1.5 * _unit_bytes(probe)))
    run = disk / "run"
    capsys.readouterr()
    rc = cli.main(_train_args(data_dir, run, *args))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{run}/" in err and "No space left on device" in err
    assert load_train_state(run).meta["epoch"] == 1 and _leftovers(run) == []
    load_checkpoint(run)

    # sparsevd.save and sparsevd deploy --out: the previous file stays, nothing temporary is left
    model = _deployed(1)
    size = len(sparsevd.save(model, tmp_path / "m.safetensors").read_bytes())
    disk = small_disk(int(1.5 * size) // 4096 * 4096 + 4096)
    path = sparsevd.save(model, disk / "m.safetensors")
    first = path.read_bytes()
    with pytest.raises(_files.FileWriteError) as e:
        sparsevd.save(_deployed(2), path)
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
    assert path.read_bytes() == first and os.listdir(disk) == ["m.safetensors"]
    rc = deploy_cli.main([str(probe), "--out", str(disk / "deployed.safetensors"), "--cost-model", "csr",
                          "--batch", "1", "--min-time", "0.01"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    assert os.listdir(disk) == ["m.safetensors"] and path.read_bytes() == first


# ------------------------------------------------------------------------------ same bytes
def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_SAVE_DEPLOYED = """
import sys, torch, sparsevd
sys.path.insert(0, {tests!r})
from test_files import _deployed
sparsevd.save(_deployed(7), sys.argv[1])
"""


def _other_hash_seed() -> str:
    """A PYTHONHASHSEED other than this process's (set orders differ between the two)."""
    return "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"


def test_the_same_deployed_model_gives_the_same_bytes(tmp_path):
    """8 saves in this process and one in a process with another PYTHONHASHSEED: one sha256."""
    model = _deployed(7)
    sums = {_sha(sparsevd.save(model, tmp_path / f"m{i}.safetensors")) for i in range(8)}
    other = tmp_path / "other.safetensors"
    subprocess.run([sys.executable, "-c", _SAVE_DEPLOYED.format(tests=str(ROOT / "tests")), str(other)],
                   env=dict(os.environ, PYTHONHASHSEED=_other_hash_seed()), check=True, timeout=120)
    sums.add(_sha(other))
    assert len(sums) == 1, sums


def test_training_checkpoints_are_byte_identical_across_processes(tmp_path, data_dir):  # noqa: F811
    """`sparsevd train` in this process and in another (another PYTHONHASHSEED, another --out),
    same seed and settings: model.safetensors, config.json and train_state.safetensors have the
    same sha256; only the measured times (timings.json) may differ."""
    argv = ["--epochs", "2", "--pretrain-epochs", "1", "--threads", "1"]
    other = subprocess.Popen([sys.executable, "-m", "sparsevd", *_train_args(data_dir, tmp_path / "other", *argv)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONHASHSEED=_other_hash_seed()))
    assert cli.main(_train_args(data_dir, tmp_path / "here", *argv)) == 0
    assert other.wait(timeout=300) == 0, other.stderr.read()
    for name in ("model.safetensors", "config.json", "train_state.safetensors"):
        assert _sha(tmp_path / "here" / name) == _sha(tmp_path / "other" / name), name
    assert _read_json(tmp_path / "here" / "checkpoint" / "timings.json").keys() == {
        "eval_seconds", "history", "step_ms", "train_seconds"}


def test_check_writable_leaves_no_directory_it_made(tmp_path):
    """The probe of a run's output makes the missing directories and removes them after, so a
    run that fails later (a missing checkpoint) leaves nothing behind; the writers make them."""
    out = tmp_path / "new" / "a" / "b" / "model.safetensors"
    _files.check_writable(out, "--out", directory=False)
    assert list(tmp_path.iterdir()) == []
    _files.check_writable(tmp_path / "run", "output directory", directory=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # an existing directory stays
    _files.check_writable(tmp_path / "kept" / "x.safetensors", "--out", directory=False)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    sparsevd.save(sparsevd.deploy(LeNet300().eval(), cost_model="dense"), out)
    assert out.is_file()


def test_save_and_load_1d_modules_and_reject_a_non_module(tmp_path):
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.MaxPool1d(2), nn.AvgPool1d(2, ceil_mode=True),
                          nn.AdaptiveMaxPool1d(3), nn.AdaptiveAvgPool1d(2), nn.Flatten()).eval()
    loaded = sparsevd.load(sparsevd.save(model, tmp_path / "c1.safetensors"))
    assert str(loaded) == str(model)
    x = torch.randn(3, 2, 17)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(TypeError, match="^model: expected an nn.Module, got dict"):
        sparsevd.save({"w": torch.ones(2)}, tmp_path / "d.safetensors")
