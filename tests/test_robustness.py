"""Reliability, tried as a new user would: tampered files, bad arguments and paths, diverging runs,
an interrupted run resumed. Each kind of corruption is one row of a table with the error it must
give (the file named, what is wrong), never a crash, a traceback or a silently different model.

The memory safety of the deployed layers and their semantics for non-finite inputs are tested in
test_sparse_layers.py and test_csr_linear.py.
"""
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import cli
from sparsevd.cli import deploy as deploy_cli
from sparsevd.checkpoint import load_checkpoint, read_config, save_checkpoint
from sparsevd.models import LeNet300
from sparsevd.train import TrainingDiverged, fit
from test_cli import _train_args, data_dir  # noqa: F401  (the data fixture)


# ------------------------------------------------------------------------------ helpers
def _flip(path: Path, offset_from_end: int, mask: int = 0x40) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= mask
    path.write_bytes(bytes(raw))


def _edit_bytes(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert old in raw, (old, raw[:200])
    path.write_bytes(raw.replace(old, new, 1))


@pytest.fixture
def deployed_file(tmp_path):
    """A deployed Linear–Tanh–Linear model saved to a file, and its outputs on a batch."""
    model = nn.Sequential(sparsevd.nn.LinearSVDO(6, 5), nn.Tanh(), sparsevd.nn.LinearSVDO(5, 3))
    model.eval()
    path = sparsevd.save(sparsevd.deploy(model, cost_model="csr"), tmp_path / "m.safetensors")
    return path


@pytest.fixture
def checkpoint(tmp_path):
    """A training checkpoint of a sparse-VD LeNet-300-100."""
    model = LeNet300(svd=True)
    save_checkpoint(model, tmp_path / "ck", {"model": "lenet300", "svd": True, "threshold": 3.0,
                                             "input_shape": [1, 28, 28]})
    return tmp_path / "ck"


# ----------------------------------------------------------------------- deployed model files
def _resign(path: Path, config: str) -> None:
    """Rewrite the deployed file's config with a consistent checksum (a buggy or newer writer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparsevd._files import digest
    from sparsevd.io import FORMAT, FORMAT_VERSION

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=dict(
        meta, config=config, sha256=digest(tensors, FORMAT, str(FORMAT_VERSION), config)))


def _config(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def _with_tree(tree: str) -> str:
    """A (format 3) config holding ``tree`` (JSON text) and an empty record of named modules."""
    return '{"tree":' + tree + ',"model":{"class":"x","modules":{},"aliases":{}}}'


def _nested(depth: int) -> str:
    """A config of ``depth`` Sequentials, each holding the next (built as text: too deep for
    json.dumps)."""
    return _with_tree('{"type":"Sequential","children":[["0",' * depth + '{"type":"Identity","args":{}}'
                      + "]]}" * depth)


def _duplicate_child(path: Path) -> str:
    spec = _config(path)
    spec["tree"]["children"][2][0] = spec["tree"]["children"][0][0]
    return json.dumps(spec)


DEPLOYED_CORRUPTIONS = {
    # name: (corrupt(path), exception, message)
    "bit flip in a weight": (lambda p: _flip(p, 3), ValueError, "corrupted file: the checksum"),
    "Tanh replaced by ReLU in the metadata": (
        lambda p: _edit_bytes(p, b'\\"Tanh\\"', b'\\"ReLU\\"'), ValueError, "corrupted file: the checksum"),
    "a child renamed to a duplicate": (
        lambda p: _edit_bytes(p, b'[\\"2\\",', b'[\\"0\\",'), ValueError, "corrupted file: the checksum"),
    "a duplicate child name, consistently signed": (
        lambda p: _resign(p, _duplicate_child(p)), ValueError, "repeated"),
    "a config nested 10000 deep, consistently signed": (
        lambda p: _resign(p, _nested(10000)), ValueError, "nested deeper than"),
    "a module tree that is a JSON list, consistently signed": (
        lambda p: _resign(p, _with_tree("[1, 2]")), ValueError, "not an object with a 'type'"),
    "a config that is a JSON list, consistently signed": (
        lambda p: _resign(p, "[1, 2]"), ValueError, "expected an object with 'tree' and 'model'"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-7]), ValueError,
                  "corrupted or not a safetensors file"),
    "a pickle": (lambda p: p.write_bytes(pickle.dumps({"w": torch.ones(3)})), ValueError,
                 "corrupted or not a safetensors file"),
    "empty": (lambda p: p.write_bytes(b""), ValueError, "corrupted or not a safetensors file"),
}


@pytest.mark.parametrize("kind", list(DEPLOYED_CORRUPTIONS))
def test_deployed_file_tampering(deployed_file, kind):
    corrupt, exc, message = DEPLOYED_CORRUPTIONS[kind]
    sparsevd.load(deployed_file)  # loads before the corruption
    corrupt(deployed_file)
    with pytest.raises(exc, match=message) as e:
        sparsevd.load(deployed_file)
    assert str(deployed_file) in str(e.value)


# ----------------------------------------------------------------------- training checkpoints
def _first_weight_offset(path: Path) -> int:
    """Offset from the end of the file of a byte holding the exponent of some weight."""
    return 2  # the last tensor's last fp32 value: its high byte is sign + exponent bits


def _edit_config(ck: Path, change) -> None:
    cfg_path = ck / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg = change(cfg)
    cfg_path.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)


CHECKPOINT_CORRUPTIONS = {
    "an exponent bit of a weight": (lambda ck: _flip(ck / "model.safetensors", 2, 0x40), ValueError,
                                    "model.safetensors: corrupted checkpoint: the tensor data changed"),
    "threshold edited": (lambda ck: _edit_config(ck, lambda c: dict(c, threshold=1.0)), ValueError,
                         "config.json: corrupted checkpoint: config.json changed"),
    "input_shape edited": (lambda ck: _edit_config(ck, lambda c: dict(c, input_shape=[3, 32, 32])),
                           ValueError, "config.json changed"),
    "format as a string": (lambda ck: _edit_config(ck, lambda c: dict(c, format="1")), ValueError,
                           "format '1' is not an integer"),
    "config a JSON list": (lambda ck: _edit_config(ck, lambda c: "[1, 2, 3]"), ValueError,
                           "expected a JSON object, got a list"),
    "config not JSON": (lambda ck: _edit_config(ck, lambda c: "{model: lenet"), ValueError,
                        "corrupted config: not JSON"),
    "weights truncated": (lambda ck: (ck / "model.safetensors").write_bytes(
        (ck / "model.safetensors").read_bytes()[:1000]), ValueError, "corrupted or not a safetensors"),
    "weights a pickle": (lambda ck: torch.save(LeNet300().state_dict(), ck / "model.safetensors"),
                         ValueError, "corrupted or not a safetensors file"),
    "config missing": (lambda ck: (ck / "config.json").resolve().unlink(), FileNotFoundError,
                       "config.json"),
    "weights missing": (lambda ck: (ck / "model.safetensors").resolve().unlink(), FileNotFoundError,
                        "model.safetensors: no such file"),
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CORRUPTIONS))
def test_checkpoint_tampering(checkpoint, tmp_path, capsys, kind):
    corrupt, exc, message = CHECKPOINT_CORRUPTIONS[kind]
    load_checkpoint(checkpoint)
    corrupt(checkpoint)
    with pytest.raises(exc, match=message):
        load_checkpoint(checkpoint)
    # `sparsevd deploy` says the same, with exit status 1 and no traceback
    rc = deploy_cli.main([str(checkpoint), "--out", str(tmp_path / "d.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot read checkpoint" in err and message.split(": ")[-1] in err
    assert not (tmp_path / "d.safetensors").exists()


def test_checkpoint_roundtrip_is_bit_exact_and_files_are_atomic(checkpoint):
    model = load_checkpoint(checkpoint)
    again = LeNet300(svd=True)
    save_checkpoint(model, checkpoint.parent / "ck2", read_config(checkpoint))
    again = load_checkpoint(checkpoint.parent / "ck2")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list(checkpoint.parent.glob("ck*/.*.tmp"))  # no temporary file left behind


# -------------------------------------------------------------------------------------- paths
def test_paths_that_name_no_checkpoint(checkpoint, tmp_path, capsys):
    for bad in (checkpoint / "no_such_run", checkpoint / "typo.json", tmp_path / "nothing"):
        with pytest.raises(FileNotFoundError, match=str(bad)):
            load_checkpoint(bad)
        assert deploy_cli.main([str(bad), "--out", str(tmp_path / "x.safetensors")]) == 1
        assert str(bad) in capsys.readouterr().err
    (checkpoint / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(checkpoint / "notes.txt")
    # the directory and each of its two files name the checkpoint
    for good in (checkpoint, checkpoint / "model.safetensors", checkpoint / "config.json"):
        assert isinstance(load_checkpoint(good), nn.Module)


def test_explicit_data_dir_is_used_or_is_an_error(tmp_path, capsys):
    rc = cli.main(["train", "--data-dir", str(tmp_path / "typo"), "--epochs", "1",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'typo'} given by --data-dir" in err and "does not exist" in err


# ---------------------------------------------------------------------------------- threshold
def test_nan_threshold_is_refused_everywhere(tmp_path, checkpoint, capsys):
    layer = sparsevd.nn.LinearSVDO(4, 3)
    for bad, exc in ((float("nan"), ValueError), (float("inf"), ValueError), ("3", TypeError)):
        with pytest.raises(exc, match="threshold"):
            layer.threshold = bad
        with pytest.raises(exc, match="threshold"):
            sparsevd.nn.LinearSVDO(4, 3, threshold=bad)
        with pytest.raises(exc, match="threshold"):
            sparsevd.functional.masked_linear(torch.randn(2, 4), layer.weight, layer.log_sigma2,
                                              layer.bias, bad)
        with pytest.raises(exc, match="threshold"):
            sparsevd.deploy(nn.Sequential(layer), threshold=bad)
        with pytest.raises(exc, match="threshold"):
            sparsevd.report(nn.Sequential(layer), threshold=bad)
    with pytest.raises(TypeError, match="threshold"):
        layer.threshold = None  # (None means "each layer's own" for deploy and report only)
    assert layer.threshold == 3.0
    with pytest.raises(SystemExit) as e:
        deploy_cli.build_parser().parse_args([str(checkpoint), "--out", "x", "--threshold", "nan"])
    assert e.value.code == 2 and "--threshold: expected a finite number" in capsys.readouterr().err
    assert cli.main(["deploy", str(checkpoint), "--out", str(tmp_path / "x"), "--threshold", "nan"]) == 2


def test_setting_the_threshold_keeps_the_trained_parameters():
    """A new threshold changes the mask only: θ and the trained log σ² stay as they are (the
    deploy CLI's --threshold sets it on every layer of a trained model)."""
    layer = sparsevd.nn.LinearSVDO(16, 8)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 4 - 6)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    kept = layer.mask().sum()
    layer.threshold = -2.0
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert layer.mask().sum() < kept


# --------------------------------------------------------------------------------- divergence
class _Loader:
    """A tiny in-memory loader whose step ``bad_step`` of epoch ``bad_epoch`` (0-based) feeds
    inputs scaled by ``scale``."""

    def __init__(self, n=4, batch=8, scale=1e20, bad_epoch=0, bad_step=0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n * batch, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (n * batch,), generator=g)
        self.n, self.batch, self.scale = n, batch, scale
        self.bad_epoch, self.bad_step, self.epoch = bad_epoch, bad_step, -1
        self.dataset = self.x

    def __len__(self):
        return self.n

    def __iter__(self):
        self.epoch += 1
        for i in range(self.n):
            x = self.x[i * self.batch:(i + 1) * self.batch]
            if (self.epoch, i) == (self.bad_epoch, self.bad_step):
                x = x * self.scale
            yield x, self.y[i * self.batch:(i + 1) * self.batch]


@pytest.mark.parametrize("method,scale", [("sparse_vd", 1e20), ("dense", 1e38), ("dense", math.nan)])
def test_huge_inputs_stop_the_run_at_once(method, scale):
    """Inputs ×1e20 overflow the LRT variance (x² > fp32 max); dense logits overflow at ×1e38."""
    model = LeNet300(svd=False)
    with pytest.raises(TrainingDiverged) as e:
        fit(model, _Loader(scale=scale), _Loader(scale=1.0), epochs=2, method=method)
    msg = str(e.value)
    assert "epoch 1, step 0" in msg and "no finite loss before it" in msg
    assert e.value.epoch == 1 and e.value.step == 0 and not math.isfinite(e.value.loss)


def test_nonfinite_parameter_names_the_layer_and_keeps_the_last_checkpoint(tmp_path):
    """A parameter that turns inf in epoch 2 stops the run at the next step, naming the
    parameter, the step and the last finite loss; the checkpoint of epoch 1 stays whole."""
    model = LeNet300(svd=True)
    layer = model[3]

    def poison(row):
        if row["epoch"] == 1:
            with torch.no_grad():
                layer.log_sigma2[0, 0] = float("inf")

    with pytest.raises(TrainingDiverged) as e:
        fit(model, _Loader(scale=1.0), _Loader(scale=1.0), epochs=3, on_epoch=poison,
            checkpoint_dir=tmp_path / "run", checkpoint_config={"model": "lenet300", "threshold": 3.0})
    msg = str(e.value)
    assert "epoch 2, step 0" in msg and "3.log_sigma2" in msg and "last finite loss" in msg
    assert f"the checkpoint of epoch 1 is kept in {tmp_path / 'run'}" in msg
    assert e.value.layers == ["3.log_sigma2"] and e.value.checkpoint_epoch == 1
    kept = load_checkpoint(tmp_path / "run")  # whole, finite, the state after epoch 1
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_cli_divergence_is_a_message_not_a_traceback(tmp_path, data_dir, capsys):  # noqa: F811
    rc = cli.main(_train_args(data_dir, tmp_path / "run", "--dense", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert rc == 1 and "sparsevd train: training diverged at epoch 1" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_gives_the_uninterrupted_result_bit_for_bit(tmp_path, data_dir, monkeypatch,  # noqa: F811
                                                            capsys, stop_after):
    """3 epochs (1 dense pre-training + 2 sparse VD, so the stop falls right at and after the
    conversion): interrupted by Ctrl-C after epoch ``stop_after`` and resumed, the final checkpoint
    equals the uninterrupted run's bit for bit."""
    from safetensors.torch import load_file

    args = ["--epochs", "3", "--pretrain-epochs", "1", "--threads", "1"]
    assert cli.main(_train_args(data_dir, tmp_path / "full", *args)) == 0
    printed = cli.train._print_epoch

    def interrupt(row, svd):
        printed(row, svd)
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.train, "_print_epoch", interrupt)
    assert cli.main(_train_args(data_dir, tmp_path / "cut", *args)) == 130
    assert f"sparsevd train --resume {tmp_path / 'cut'}" in capsys.readouterr().err
    monkeypatch.setattr(cli.train, "_print_epoch", printed)
    assert cli.main(["train", "--resume", str(tmp_path / "cut"), "--no-progress", "--threads", "1"]) == 0
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert sorted(full) == sorted(cut)
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    s_cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert s_cut["resumed_from_epoch"] == stop_after
    assert [h["loss"] for h in s_cut["history"]] == [h["loss"] for h in s_full["history"]]
    assert s_cut["test_accuracy"] == s_full["test_accuracy"]
    for name in ("model.safetensors", "config.json", "train_state.safetensors"):  # the files too
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_resume_refuses_other_settings_and_missing_state(tmp_path):
    model = LeNet300(svd=False)
    fit(model, _Loader(scale=1.0), _Loader(scale=1.0), epochs=2, pretrain_epochs=1,
        checkpoint_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"resume: .*lr = 0.001 \(given 0.01\)"):
        fit(LeNet300(svd=False), _Loader(scale=1.0), _Loader(scale=1.0), epochs=2,
            pretrain_epochs=1, lr=1e-2, checkpoint_dir=tmp_path / "run", resume=True)
    with pytest.raises(FileNotFoundError, match="no training state to resume from"):
        fit(LeNet300(svd=False), _Loader(scale=1.0), _Loader(scale=1.0), epochs=2,
            checkpoint_dir=tmp_path / "empty", resume=True)
    state = tmp_path / "run" / "train_state.safetensors"
    _flip(state, 5)
    with pytest.raises(ValueError, match="corrupted training state"):
        fit(LeNet300(svd=False), _Loader(scale=1.0), _Loader(scale=1.0), epochs=2,
            pretrain_epochs=1, checkpoint_dir=tmp_path / "run", resume=True)


def test_resume_with_another_models_training_state_names_the_file(tmp_path, data_dir, capsys):  # noqa: F811
    """A LeNet-5 run's train_state.safetensors copied into a LeNet-300-100 run: `--resume` says
    which file does not fit the model (no RuntimeError traceback); nothing is written."""
    args = ("--epochs", "2", "--pretrain-epochs", "1", "--threads", "1")
    assert cli.main(_train_args(data_dir, tmp_path / "a", *args)) == 0
    assert cli.main(_train_args(data_dir, tmp_path / "b", "--model", "lenet5", *args)) == 0
    shutil.copyfile(tmp_path / "b" / "train_state.safetensors", tmp_path / "a" / "train_state.safetensors")
    before = _tree_bytes(tmp_path / "a")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "a"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'a'}/" in err and "train_state.safetensors: the training state does not fit this " \
        "run's model" in err and "size mismatch" in err
    assert _tree_bytes(tmp_path / "a") == before


def _tree_bytes(directory: Path) -> dict:
    """Every file under ``directory`` (links followed once) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_dir):  # noqa: F811
    """A finished one-epoch `sparsevd train` run (LeNet-300-100, sparse VD, 1 pre-training epoch of 2)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    assert cli.main(_train_args(data_dir, run, "--epochs", "2", "--pretrain-epochs", "1", "--threads", "1")) == 0
    return run


#: Options given with `--resume DIR` that contradict the saved run -> what the error names.
RESUME_CONFLICTS = {
    "another model": (["--model", "lenet5"], "--model lenet5 (saved: lenet300)"),
    "more epochs": (["--epochs", "5"], "--epochs 5 (saved: 2)"),
    "another output directory": (["--out", "{tmp}/other"], "--out {tmp}/other (a resumed run writes into"),
    "another learning rate, --opt=value": (["--lr=0.01"], "--lr 0.01 (saved: 0.001)"),
    "an abbreviated option": (["--batch", "50"], "--batch-size 50 (saved: 100)"),
    "dense instead of sparse VD": (["--dense"], "--dense (saved: False)"),
    "no train-time clipping": (["--no-train-clip"], "--no-train-clip (saved: True)"),
    "another seed": (["--seed", "3"], "--seed 3 (saved: 0)"),
    "another subset": (["--subset", "10"], "--subset 10 (saved: 300)"),
    "mixed precision": (["--amp", "bf16"], "--amp bf16 (saved: None)"),
    "another threshold": (["--threshold", "2"], "--threshold 2.0 (saved: 3.0)"),
    "three at once": (["--model", "lenet5", "--epochs", "5", "--out", "{tmp}/other"],
                      "--out {tmp}/other (a resumed run writes into {run}); --model lenet5 (saved: "
                      "lenet300); --epochs 5 (saved: 2)"),
}


@pytest.mark.parametrize("kind", list(RESUME_CONFLICTS))
def test_resume_refuses_options_that_contradict_the_saved_run(saved_run, tmp_path, capsys, kind):
    extra, message = RESUME_CONFLICTS[kind]
    fill = lambda t: t.format(tmp=tmp_path, run=saved_run)  # noqa: E731
    before = _tree_bytes(saved_run)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(saved_run), *map(fill, extra)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"contradict the run saved in {saved_run}: {fill(message)}" in err, err
    assert "a resumed run takes only --threads, --no-progress, --json, --data-dir, --no-download, --device" in err
    assert _tree_bytes(saved_run) == before and not (tmp_path / "other").exists()


def test_resume_takes_the_runtime_options_and_repeated_settings(saved_run, tmp_path, data_dir):  # noqa: F811
    """--threads, --no-progress, --json, --device, --data-dir, --no-download may change, and the
    recipe options may be repeated with the saved values (also --out DIR itself)."""
    rc = cli.main(["train", "--resume", str(saved_run), "--threads", "1", "--no-progress", "--json",
                   str(tmp_path / "s.json"), "--device", "cpu", "--data-dir", str(data_dir),
                   "--no-download", "--out", str(saved_run), "--epochs", "2", "--model", "lenet300"])
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["resumed_from_epoch"] == 2


def _stop_in_evaluation(monkeypatch, epoch):
    """Ctrl-C during the evaluation of epoch ``epoch`` (after its steps, before its checkpoint)."""
    from sparsevd import train

    evaluate, calls = train.evaluate, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", stop)


#: Where Ctrl-C stops a run -> what the message says (and whether it offers --resume).
INTERRUPTIONS = {
    "in epoch 1 of a new run": (
        None, 1, "interrupted before the first epoch ended; nothing was saved in {run}, so there is "
                 "nothing to resume: run the same command again to start over", False),
    "in epoch 1 of a new run over an earlier run's directory": (
        "earlier", 1, "interrupted before the first epoch ended; nothing of this run was saved ({run} "
                      "still holds the checkpoint of epoch 1 of 1 of an earlier run", True),
    "in epoch 2": (None, 2, "interrupted; the checkpoint of epoch 1 of 2 is in {run}: continue with "
                            "`sparsevd train --resume {run}`", True),
    "in the first epoch of a resumed run": (
        "resumed", 1, "interrupted; the checkpoint of epoch 1 of 2 is in {run}: continue with "
                      "`sparsevd train --resume {run}`", True),
}


@pytest.mark.parametrize("kind", list(INTERRUPTIONS))
def test_ctrl_c_says_what_the_run_directory_holds(tmp_path, data_dir, monkeypatch, capsys, kind):  # noqa: F811
    before, epoch, message, resumable = INTERRUPTIONS[kind]
    run = tmp_path / "run"
    args = ["--epochs", "2", "--pretrain-epochs", "1", "--threads", "1"]
    argv = _train_args(data_dir, run, *args)
    if before == "earlier":
        assert cli.main(_train_args(data_dir, run, "--epochs", "1", "--threads", "1")) == 0
    if before == "resumed":
        _stop_in_evaluation(monkeypatch, 2)
        assert cli.main(argv) == 130
        monkeypatch.undo()
        argv = ["train", "--resume", str(run), "--no-progress"]
    capsys.readouterr()
    _stop_in_evaluation(monkeypatch, epoch)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert message.format(run=run) in err, err
    assert ("--resume" in err) == resumable and "Traceback" not in err


# ------------------------------------------------------------------------ outputs over checkpoints
def _older_layout_copy(ck: Path, where: Path) -> Path:
    """The checkpoint ``ck`` as the older layout stores it: its files directly in a directory."""
    where.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(ck / name, where / name)
    return where


#: Output paths that are files of a training checkpoint -> (path given the checkpoint `ck` and tmp).
CHECKPOINT_OUTPUTS = {
    "its model.safetensors": lambda ck, tmp: ck / "model.safetensors",
    "its config.json": lambda ck, tmp: ck / "config.json",
    "its train_state.safetensors": lambda ck, tmp: ck / "train_state.safetensors",
    "its weights through the checkpoint link": lambda ck, tmp: ck / "checkpoint" / "model.safetensors",
    "a new file in its version directory": lambda ck, tmp: ck / "checkpoint" / "deployed.safetensors",
    "another training checkpoint": lambda ck, tmp: _other_checkpoint(tmp) / "model.safetensors",
    "a copy of checkpoint weights elsewhere": lambda ck, tmp: Path(
        shutil.copyfile(ck / "model.safetensors", tmp / "best.safetensors")),
    "a checkpoint of the older layout": lambda ck, tmp: _older_layout_copy(ck, tmp / "old") / "model.safetensors",
}


def _other_checkpoint(tmp: Path) -> Path:
    save_checkpoint(LeNet300(svd=True), tmp / "other", {"model": "lenet300", "svd": True, "threshold": 3.0})
    return tmp / "other"


@pytest.mark.parametrize("kind", list(CHECKPOINT_OUTPUTS))
def test_deploy_refuses_to_write_over_a_training_checkpoint(checkpoint, tmp_path, capsys, kind):
    """`sparsevd deploy --out` (and sparsevd.save) over a file of a training checkpoint: refused
    before anything is written, every file as it was."""
    out = CHECKPOINT_OUTPUTS[kind](checkpoint, tmp_path)
    before = _tree_bytes(tmp_path)
    rc = deploy_cli.main([str(checkpoint), "--out", str(out), "--cost-model", "csr", "--min-time", "0.01"])
    err = capsys.readouterr().err
    assert rc == 1 and f"--out {out} is a file of the training checkpoint in" in err, err
    assert err.count("\n") == 1 and _tree_bytes(tmp_path) == before
    with pytest.raises(FileExistsError, match="a file of the training checkpoint in"):  # the library too
        sparsevd.save(sparsevd.deploy(load_checkpoint(checkpoint), cost_model="csr"), out)
    assert _tree_bytes(tmp_path) == before


def test_outputs_beside_a_checkpoint_are_fine_and_train_json_over_it_is_refused(
        checkpoint, tmp_path, data_dir, capsys):  # noqa: F811
    out = checkpoint / "deployed.safetensors"
    assert deploy_cli.main([str(checkpoint), "--out", str(out), "--cost-model", "csr", "--batch", "1",
                            "--min-time", "0.01"]) == 0
    assert isinstance(sparsevd.load(out), nn.Module) and isinstance(load_checkpoint(checkpoint), nn.Module)
    for target in (checkpoint / "config.json", tmp_path / "new" / "model.safetensors"):
        # the directory of a finished run, or the one this run is about to write
        before = _tree_bytes(tmp_path)
        run = checkpoint if target.parent == checkpoint else target.parent
        rc = cli.main(_train_args(data_dir, run, "--json", str(target)))
        out_, err = capsys.readouterr()
        assert rc == 1 and f"summary file {target} is a file of the training checkpoint" in err, err
        assert "epoch" not in out_ and _tree_bytes(tmp_path) == before


# ------------------------------------------------------------------------------ clear errors
def test_clear_errors_instead_of_tracebacks(tmp_path, checkpoint, data_dir, capsys):  # noqa: F811
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # sparsevd deploy: unwritable --out (checked first), --threads=-1
    assert deploy_cli.main([str(checkpoint), "--out", str(blocker / "m.safetensors")]) == 1
    assert f"--out {blocker / 'm.safetensors'} is not writable" in capsys.readouterr().err
    assert deploy_cli.main([str(checkpoint), "--out", "x", "--threads=-1"]) == 2
    assert "--threads: expected a positive integer" in capsys.readouterr().err
    # sparsevd train: a seed beyond 63 bits; unwritable --out or --json before any training
    with pytest.raises(SystemExit):
        cli.main(["train", "--seed", "99999999999999999999999"])
    assert "--seed: expected a seed in [0, 2**63 - 1]" in capsys.readouterr().err
    for extra in (["--out", str(blocker / "run")],
                  ["--out", str(tmp_path / "ok"), "--json", str(blocker / "s.json")]):
        rc = cli.main(_train_args(data_dir, tmp_path / "unused", *extra))
        out, err = capsys.readouterr()
        assert rc == 1 and "is not writable" in err and "epoch" not in out
    # the layers name the argument
    with pytest.raises(TypeError, match="^threshold: expected a finite real number, got '3'"):
        sparsevd.nn.LinearSVDO(3, 2, threshold="3")
    with pytest.raises(ValueError, match="^stride: expected values ≥ 1"):
        sparsevd.nn.SparseConv2d.from_dense(torch.randn(2, 1, 3, 3), stride=0)
    with pytest.raises(ValueError, match="^groups"):
        sparsevd.nn.Conv2dSVDO(3, 4, 3, groups=2)


# ------------------------------------------------------------------------- inference mode
def _deployed(build, mode, shape):
    """(the deployed ``build()`` with trained-looking log σ², in ``mode``, the input shape)."""
    model = build()
    for m in model.modules():
        if isinstance(m, sparsevd.nn.svdo.SVDO_LAYERS):
            with torch.no_grad():
                m.log_sigma2.copy_(torch.randn_like(m.log_sigma2) * 3 - 3)
    return sparsevd.deploy(model.eval(), cost_model=mode), shape


def _mlp():
    return nn.Sequential(sparsevd.nn.LinearSVDO(12, 9), nn.Tanh(), sparsevd.nn.LinearSVDO(9, 7))


#: Layers whose eval forward keeps a cache: name -> build(), returning (module, input shape).
#: (The deployed layers' "csr" mode keeps none: it runs the CSR kernel on the buffers.)
CACHED_LAYERS = {
    "LinearSVDO": lambda: (sparsevd.nn.LinearSVDO(12, 7), (5, 12)),
    "Conv2dSVDO": lambda: (sparsevd.nn.Conv2dSVDO(3, 4, 3, padding=1), (2, 3, 6, 6)),
    "Conv1dSVDO": lambda: (sparsevd.nn.Conv1dSVDO(3, 4, 3), (2, 3, 9)),
    "SparseLinear, dense": lambda: _deployed(_mlp, "dense", (5, 12)),
    "SparseLinear, masked": lambda: _deployed(_mlp, "masked", (5, 12)),
    "SparseConv2d, dense": lambda: _deployed(
        lambda: nn.Sequential(sparsevd.nn.Conv2dSVDO(3, 4, 3)), "dense", (2, 3, 6, 6)),
    "SparseConv1d, dense": lambda: _deployed(
        lambda: nn.Sequential(sparsevd.nn.Conv1dSVDO(3, 4, 3)), "dense", (2, 3, 9)),
}


@pytest.mark.parametrize("kind", list(CACHED_LAYERS))
def test_an_inference_mode_call_does_not_poison_the_eval_cache(kind):
    """Frozen layer in eval mode, called under torch.inference_mode() right after its parameters
    (buffers) changed in place, so that its cache is rebuilt there; then an input that requires
    grad: the output and the input gradient are those of a copy that never saw inference mode
    (nn.Linear handles the same sequence)."""
    import copy

    module, shape = CACHED_LAYERS[kind]()
    module.eval().requires_grad_(False)
    twin = copy.deepcopy(module)
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    twin_tensors = [t for t in (*twin.parameters(), *twin.buffers()) if t.is_floating_point()]
    with torch.no_grad():
        for t, u in zip(tensors, twin_tensors):
            t.mul_(1.5)
            u.mul_(1.5)
    x = torch.randn(*shape)
    with torch.inference_mode():
        y_inf = module(x)
    xg = x.clone().requires_grad_(True)
    y = module(xg)
    g = torch.randn_like(y)
    y.backward(g)
    xt = x.clone().requires_grad_(True)
    y_twin = twin(xt)
    y_twin.backward(g)
    assert torch.equal(y.detach(), y_twin.detach()) and torch.equal(y_inf, y_twin.detach())
    assert xg.grad is not None and torch.equal(xg.grad, xt.grad)
    assert xg.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- predict
#: Models with nothing to sample -> build(), returning the model (input (4, 1, 28, 28)).
DETERMINISTIC_MODELS = {
    "dense": lambda: LeNet300(svd=False),
    "deployed": lambda: sparsevd.deploy(LeNet300(svd=True).eval(), cost_model="csr"),
}


@pytest.mark.parametrize("kind", list(DETERMINISTIC_MODELS))
def test_predict_without_sparse_vd_layers_warns_and_says_deterministic(kind):
    model = DETERMINISTIC_MODELS[kind]().eval()
    x = torch.randn(4, 1, 28, 28)
    with pytest.warns(RuntimeWarning, match="no sparse-VD layers.*deterministic.*not a 10-sample"):
        pred = sparsevd.predict(model, x, samples=10)
    assert pred.samples == 0
    with torch.no_grad():
        assert torch.equal(pred.probs, torch.softmax(model(x), -1))


def test_predict_with_sparse_vd_layers_samples_without_a_warning():
    model = LeNet300(svd=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.nn.LinearSVDO):
                m.log_sigma2.fill_(-2.0)
    x = torch.randn(4, 1, 28, 28)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = sparsevd.predict(model, x, samples=10, seed=0)
    assert pred.samples == 10
    with torch.no_grad():
        assert not torch.allclose(pred.probs, torch.softmax(model.eval()(x), -1))
