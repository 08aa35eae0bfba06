"""End-to-end tests of ``sparsevd train`` (and the ``deploy`` hand-off) on a few hundred images.

Data: the real Fashion-MNIST files when ``$SPARSEVD_DATA`` (CI: ../shared/data) or the shared
checkout's ``../shared/data`` has them, else small random IDX files written into a temp dir.
"""
import gzip
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsevd
from sparsevd import cli, data
from sparsevd.loss import svdo_layers
from sparsevd.checkpoint import load_checkpoint
from sparsevd.cli import build_parser, main
from sparsevd.train import TrainConfig, resolve_recipe
from sparsevd.convert import report
from sparsevd.data import FILE_NAMES, load_dataset

SUBSET = 300


def _real_dir():
    roots = [Path(os.environ["SPARSEVD_DATA"])] if os.environ.get("SPARSEVD_DATA") else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in roots:
        for d in (root / "fashion-mnist", root):
            if all((d / f).is_file() for f in FILE_NAMES):
                return d
    return None


def _write_fake(directory: Path, n_train: int = SUBSET, n_test: int = 100) -> Path:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_test, dtype=np.uint8)]
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for fname, arr in zip(FILE_NAMES, arrays):
        magic = {1: 0x801, 3: 0x803}[arr.ndim]
        header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        blob = gzip.compress(header + arr.tobytes(), mtime=0)
        (directory / fname).write_bytes(blob)
        lines.append(f"{data.sha256_file(directory / fname)}  {fname}\n")
    (directory / "SHA256SUMS").write_text("".join(lines))
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    real = _real_dir()
    return real if real is not None else _write_fake(tmp_path_factory.mktemp("fake-fmnist"))


def _train_args(data_dir, out, *extra):
    return ["train", "--data-dir", str(data_dir), "--subset", str(SUBSET), "--epochs", "1",
            "--no-progress", "--no-download", "--out", str(out), *extra]


def _test_images(data_dir):
    _, _, x, y = load_dataset("fashion-mnist", data_dir=data_dir, download=False)
    return x[:SUBSET], y[:SUBSET]


def _check_summary(s, model_name, svd, n_layers):
    assert s["model"] == model_name and s["dataset"] == "fashion-mnist"
    assert s["svd"] is svd and s["method"] == ("sparse_vd" if svd else "dense")
    assert 0.0 <= s["test_accuracy"] <= 1.0
    assert s["compression"] >= 1.0
    assert len(s["per_layer_sparsity"]) == n_layers == len(s["layers"])
    assert all(0.0 <= v <= 1.0 for v in s["per_layer_sparsity"])
    assert s["epochs"] == 1 and len(s["history"]) == 1
    assert s["train_seconds"] > 0 and s["device"] == "cpu" and s["device_name"]
    assert s["train_size"] == SUBSET and s["subset"] == SUBSET
    assert s["report"]["params"] == s["params"] and len(s["report"]["layers"]) == n_layers
    assert s["report"]["compression"] == pytest.approx(s["compression"])


@pytest.mark.parametrize("model_name,svd,n_layers", [
    ("lenet300", True, 3),
    ("lenet300", False, 3),
    ("lenet5", True, 4),
])
def test_train_end_to_end(tmp_path, data_dir, capsys, model_name, svd, n_layers):
    out, js = tmp_path / "run", tmp_path / "res" / "summary.json"
    argv = _train_args(data_dir, out, "--model", model_name, "--json", str(js), "--seed", "3",
                       *([] if svd else ["--dense"]))
    model, summary = cli.train.train(build_parser().parse_args(argv))

    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "test acc" in printed and "compression" in printed
    assert "total" in printed and "sparsity %" in printed  # the report table

    on_disk = json.loads(js.read_text())
    assert on_disk == json.loads((out / "summary.json").read_text())
    _check_summary(on_disk, model_name, svd, n_layers)
    if not svd:
        assert on_disk["compression"] == 1.0 and on_disk["per_layer_sparsity"] == [0.0] * 3
        assert on_disk["kl_warmup_epochs"] is None

    # the checkpoint reloads into the same model: same eval outputs, accuracy and report
    reloaded = load_checkpoint(out)
    assert not reloaded.training
    assert [type(m) for m in reloaded] == [type(m) for m in model]
    x, y = _test_images(data_dir)
    with torch.no_grad():
        ref, got = model.eval()(x), reloaded(x)
    assert torch.equal(ref, got)
    assert (got.argmax(1) == y).float().mean().item() == pytest.approx(on_disk["test_accuracy"])
    assert report(reloaded).compression == pytest.approx(on_disk["compression"])
    assert load_checkpoint(out / "model.safetensors") is not None  # the file path works too


def test_main_in_process_and_same_seed_same_result(tmp_path, data_dir, capsys):
    a = _train_args(data_dir, tmp_path / "a", "--json", str(tmp_path / "a.json"), "--threads", "1")
    b = _train_args(data_dir, tmp_path / "b", "--json", str(tmp_path / "b.json"), "--threads", "1")
    assert main(a) == 0 and main(b) == 0
    sa, sb = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    _check_summary(sa, "lenet300", True, 3)
    assert sa["test_accuracy"] == sb["test_accuracy"]
    assert sa["history"][0]["loss"] == pytest.approx(sb["history"][0]["loss"], rel=1e-5)


def test_dense_pretraining_then_sparse_vd(tmp_path, data_dir):
    out = tmp_path / "run"
    argv = _train_args(data_dir, out, "--epochs", "2", "--pretrain-epochs", "1", "--threads", "1")
    model, summary = cli.train.train(build_parser().parse_args(argv))
    assert [h["phase"] for h in summary["history"]] == ["dense", "sparse_vd"]
    assert summary["history"][0]["beta"] is None and summary["history"][1]["beta"] > 0
    assert summary["pretrain_epochs"] == 1 and summary["svd"] is True
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(0.0)  # one schedule over both
    reloaded = load_checkpoint(out)
    assert [type(m).__name__ for m in reloaded if hasattr(m, "weight")] == ["LinearSVDO"] * 3
    x, _ = _test_images(data_dir)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reloaded(x))


def test_train_clip_run(tmp_path, data_dir, capsys, monkeypatch):
    """--train-clip (the default): the converted layers clip in training (their forward gets
    clip_threshold = threshold), the start line and the summary say so; with --no-train-clip
    nothing clips."""
    seen = []
    real = sparsevd.functional.lrt_linear

    def spy(*args, **kwargs):
        seen.append(kwargs.get("clip_threshold"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sparsevd.functional, "lrt_linear", spy)
    argv = _train_args(data_dir, tmp_path / "c", "--epochs", "2", "--pretrain-epochs", "1",
                       "--train-clip", "--threshold", "2.5", "--threads", "1")
    model, summary = cli.train.train(build_parser().parse_args(argv))
    assert "train-time clipping" in capsys.readouterr().out
    assert summary["train_clip"] is True and seen and set(seen) == {2.5}
    assert all(m.train_clip for _, m in svdo_layers(model))
    seen.clear()
    cli.train.train(build_parser().parse_args(_train_args(data_dir, tmp_path / "n", "--threads", "1",
                                                           "--no-train-clip")))
    assert seen and set(seen) == {None}
    # the default resolves to on, with a compression target too (the controller holds the mask
    # there); --no-train-clip turns it off
    assert resolve_recipe(build_parser().parse_args(["train"])).train_clip is True
    assert resolve_recipe(build_parser().parse_args(["train", "--target-compression", "10"])).train_clip is True
    assert resolve_recipe(build_parser().parse_args(["train", "--target-compression", "10",
                                                     "--no-train-clip"])).train_clip is False


def test_train_finetune_epochs(tmp_path, capsys, data_dir):
    """--finetune-epochs N: the last N epochs train with the mask frozen (printed, in the summary)."""
    argv = _train_args(data_dir, tmp_path / "f", "--epochs", "3", "--pretrain-epochs", "1", "--finetune-epochs", "1",
                       "--threads", "1")
    _, summary = cli.train.train(build_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert "1 fixed-mask fine-tuning epochs" in out and "(fixed-mask fine-tuning)" in out
    assert summary["finetune_epochs"] == 1
    assert [r["phase"] for r in summary["history"]] == ["dense", "sparse_vd", "finetune"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--finetune-epochs", "-1"])


@pytest.mark.parametrize("argv,pretrain,warmup", [
    (["train"], 10, 10.0),
    (["train", "--epochs", "2"], 0, 2 / 3),
    (["train", "--epochs", "9", "--kl-warmup-epochs", "1", "--pretrain-epochs", "0"], 0, 1.0),
    (["train", "--dense"], 0, 0.0),
])
def test_recipe_defaults(argv, pretrain, warmup):
    args = resolve_recipe(build_parser().parse_args(argv))
    assert args.pretrain_epochs == pretrain and args.kl_warmup_epochs == pytest.approx(warmup)


@pytest.mark.parametrize("argv,lr,finetune", [
    (["train"], 1e-3, 0),                                               # the paper's objective
    (["train", "--dense", "--target-compression", "10"], 1e-3, 0),      # no mask, no target
    (["train", "--target-compression", "20"], 2e-3, 10),                # the pareto benchmark's recipe
    (["train", "--target-compression", "20", "--epochs", "9"], 2e-3, 3),
    (["train", "--target-compression", "20", "--epochs", "10", "--pretrain-epochs", "8"], 2e-3, 1),
    (["train", "--target-compression", "20", "--lr", "5e-4", "--finetune-epochs", "0"], 5e-4, 0),
])
def test_target_recipe_defaults(argv, lr, finetune):
    """A run with a compression target defaults to TARGET_LR and a fixed-mask tail of a third of
    the epochs (at most what leaves one sparse-VD epoch); --lr / --finetune-epochs force."""
    args = resolve_recipe(build_parser().parse_args(argv))
    assert args.lr == pytest.approx(lr) and args.finetune_epochs == finetune
    assert args.pretrain_epochs + args.finetune_epochs < args.epochs or args.dense


def test_resume_of_a_run_saved_before_the_target_defaults(tmp_path):
    """A checkpoint whose train_config lacks finetune_epochs (older sparsevd) resumes with 0."""
    from sparsevd.training.config import resumed_config
    saved = {"model": "lenet300", "epochs": 3, "lr": 1e-3, "target_compression": 10.0}
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train_config": saved}))
    config = resumed_config(TrainConfig(out=str(out)))
    assert config.finetune_epochs == 0 and config.lr == 1e-3


def test_python_m_sparsevd(tmp_path, data_dir):
    """The module entry point runs the same command in a fresh interpreter."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "sparsevd", *_train_args(data_dir, out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["train", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["train", "--batch-size", "ten"], "--batch-size: expected a positive integer, got 'ten'"),
    (["train", "--lr", "-1"], "--lr: expected a positive finite number"),
    (["train", "--kl-warmup-epochs", "nan"], "--kl-warmup-epochs: expected a finite number"),
    (["train", "--model", "vgg"], "--model: invalid choice: 'vgg'"),
    (["train", "--dataset", "cifar"], "--dataset: invalid choice"),
    (["train", "--device", "tpu"], "--device: invalid choice"),
    (["train", "--subset", "-5"], "--subset: expected a positive integer"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--epochs", "2", "--pretrain-epochs", "2"],
     "--pretrain-epochs: 2 leaves no sparse-VD epoch"),
    (["train", "--pretrain-epochs", "-1"], "--pretrain-epochs: expected an integer >= 0"),
    (["fly"], "invalid choice: 'fly'"),
    ([], "required"),
])
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_requested_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--device", "cuda"])
    assert exc.value.code == 2 and "cuda requested" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPARSEVD_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    rc = main(["train", "--data-dir", str(tmp_path / "empty"), "--no-download", "--epochs", "1",
               "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "not found" in err and "--data-dir" in err and "apt-get install dataset-fashion-mnist" in err


def test_deploy_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sparsevd.cli.deploy", None)  # import fails as if absent
    assert main(["deploy", "--help"]) == 2
    assert "sparsevd.cli.deploy" in capsys.readouterr().err


def test_deploy_forwards_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("sparsevd.cli.deploy")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sparsevd.cli.deploy", fake)
    assert main(["deploy", "ckpt", "--out", "x", "--train"]) == 0
    assert seen == [["ckpt", "--out", "x", "--train"]]
    fake.main = lambda argv: 3
    assert main(["deploy"]) == 3


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "deploy" in out
