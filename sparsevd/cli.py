"""Command line: ``sparsevd train`` (and ``sparsevd deploy``, implemented in ``sparsevd.deploy_cli``).

``sparsevd train`` trains LeNet-300-100 or LeNet-5-Caffe on Fashion-MNIST or MNIST, with sparse
variational dropout (default) or as the plain dense model (``--dense``), and prints per epoch the
loss, the test accuracy (eval mode) and the compression, then the per-layer report. It saves the
checkpoint (``model.safetensors`` + ``config.json``, reloadable with :func:`load_checkpoint`) and a
JSON summary.

Recipe (Molchanov, Ashukha, Vetrov, ICML 2017, sec. 5): Adam, lr 1e-3, batch 100, loss SGVLB =
N · mean cross-entropy + β · KL with N = number of training images and β warmed up linearly from 0
to 1 (here per step), log σ² initialised to −10, weights with log α ≥ 3 dropped at evaluation.
Tuned within the method for 30-epoch CPU runs (README, "Recipe"): the first third of the epochs
trains the dense model, which is then converted to sparse-VD layers (sparse VD as fine-tuning of
a pre-trained net); β warms up over the next third; the learning rate decays linearly to 0
over the whole run. ``--pretrain-epochs 0 --kl-warmup-epochs 5 --lr-decay none`` is the plain
from-scratch recipe. Dense runs (``--dense``) use the same optimiser and schedule with plain
cross-entropy for all epochs.

Usage::

    sparsevd train --model lenet300 --dataset fashion-mnist --epochs 30 --json result.json
    python -m sparsevd train --dense --epochs 30
    sparsevd deploy ...        # see sparsevd deploy --help
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .convert import convert, report
from .data import DATASETS, make_loaders
from .loss import SGVLB, kl_divergence, svdo_layers
from .models import MODELS, build_model
from .nn import DEFAULT_THRESHOLD

__all__ = ["build_parser", "evaluate", "load_checkpoint", "main", "resolve_recipe",
           "save_checkpoint", "train"]

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = 1

#: Defaults of ``sparsevd train`` (the recipe of the README's results table).
DEFAULTS = dict(model="lenet300", dataset="fashion-mnist", epochs=30, batch_size=100, lr=1e-3,
                lr_decay="linear", kl_warmup_epochs=None, pretrain_epochs=None, threshold=DEFAULT_THRESHOLD, seed=0)


# ----------------------------------------------------------------------------------- arguments
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``sparsevd`` command (subcommands ``train`` and ``deploy``)."""
    parser = argparse.ArgumentParser(
        prog="sparsevd",
        description="Sparse Variational Dropout (Molchanov, Ashukha, Vetrov, ICML 2017).")
    sub = parser.add_subparsers(dest="command", metavar="{train,deploy}")
    sub.required = True
    d = DEFAULTS
    t = sub.add_parser(
        "train", help="train LeNet-300-100 / LeNet-5 with sparse VD (or dense) and report",
        description="Train a LeNet with sparse variational dropout (or dense with --dense), print "
                    "per-epoch loss, test accuracy and compression, then the per-layer report; "
                    "save the checkpoint and a JSON summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", choices=sorted(MODELS), default=d["model"],
                   help="lenet300: LeNet-300-100; lenet5: LeNet-5-Caffe")
    t.add_argument("--dataset", choices=sorted(DATASETS), default=d["dataset"])
    t.add_argument("--epochs", type=_positive_int, default=d["epochs"])
    t.add_argument("--batch-size", type=_positive_int, default=d["batch_size"])
    t.add_argument("--lr", type=_positive_float, default=d["lr"], help="Adam learning rate")
    t.add_argument("--lr-decay", choices=("linear", "none"), default=d["lr_decay"],
                   help="linear: lr decays linearly to 0 at the end of the run; none: constant")
    t.add_argument("--kl-warmup-epochs", type=_nonneg_float, default=d["kl_warmup_epochs"],
                   help="sparse-VD epochs over which the KL weight beta rises linearly from 0 to "
                        "1, counted from the conversion (0: beta = 1 from the start); default: "
                        "a third of --epochs; ignored with --dense")
    t.add_argument("--threshold", type=_finite_float, default=d["threshold"],
                   help="log alpha above which a weight is dropped at evaluation")
    t.add_argument("--pretrain-epochs", type=_nonneg_int, default=d["pretrain_epochs"],
                   help="sparse VD only: train the dense model for the first N epochs, then "
                        "convert it to sparse-VD layers and train on with SGVLB; N < --epochs; "
                        "default: a third of --epochs, rounded down (0: sparse VD from the "
                        "random initialisation)")
    t.add_argument("--dense", action="store_true",
                   help="train the plain dense model (nn.Linear/nn.Conv2d, cross-entropy)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    t.add_argument("--seed", type=int, default=d["seed"],
                   help="seeds the initialisation, the noise and the batch order")
    t.add_argument("--data-dir", default=None,
                   help="directory with the four IDX .gz files (or a <dataset>/ subdirectory); "
                        "otherwise $SPARSEVD_DATA, ~/.cache/sparsevd, /usr/share/datasets are "
                        "searched, then a download and (as root) apt-get are tried")
    t.add_argument("--no-download", action="store_true",
                   help="do not download or apt-get install missing data")
    t.add_argument("--out", default=None,
                   help="directory for model.safetensors, config.json and summary.json "
                        "(default runs/<model>-<svd|dense>-<dataset>)")
    t.add_argument("--json", default=None, metavar="FILE", help="also write the summary here")
    t.add_argument("--subset", type=_positive_int, default=None, metavar="N",
                   help="use only the first N training and N test images (quick tests)")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.train_parser = t  # for errors that name the train subcommand
    sub.add_parser(
        "deploy", add_help=False,
        help="turn a trained checkpoint into a sparse inference model "
             "(sparsevd deploy --help for its options)")
    return parser


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on ``--epochs`` (in place; also returns ``args``).

    ``pretrain_epochs`` defaults to ``epochs // 3`` and ``kl_warmup_epochs`` to ``epochs / 3``:
    a third of the run trains the dense model, the sparse-VD phase warms β up over the next
    third and trains at β = 1 for the last one. With ``--dense`` both are 0.
    """
    if args.dense:
        args.pretrain_epochs = 0
        args.kl_warmup_epochs = 0.0 if args.kl_warmup_epochs is None else args.kl_warmup_epochs
        return args
    if args.pretrain_epochs is None:
        args.pretrain_epochs = args.epochs // 3
    if args.kl_warmup_epochs is None:
        args.kl_warmup_epochs = args.epochs / 3
    return args


# --------------------------------------------------------------------------------- checkpoint
def save_checkpoint(model: nn.Module, out_dir, config: dict) -> Path:
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


def load_checkpoint(path, device="cpu") -> nn.Module:
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

    p = Path(path)
    directory = p if p.is_dir() else p.parent
    weights = p if p.suffix == ".safetensors" else directory / CHECKPOINT_WEIGHTS
    cfg_path = directory / CHECKPOINT_CONFIG
    for f in (weights, cfg_path):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path}: {f} not found")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format", CHECKPOINT_FORMAT) > CHECKPOINT_FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg['format']} is newer than this sparsevd "
                         f"understands ({CHECKPOINT_FORMAT})")
    if "model" not in cfg:
        raise ValueError(f"{cfg_path}: no 'model' entry")
    model = build_model(cfg["model"], svd=bool(cfg.get("svd", True)),
                        threshold=float(cfg.get("threshold", DEFAULT_THRESHOLD)))
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode over ``loader``.

    The model is left in eval mode; sparse-VD layers use their deterministic masked weights.
    """
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _backend_used(model: nn.Module, device: torch.device) -> Optional[str]:
    layers = svdo_layers(model)
    if not layers:
        return None
    from .ops.backend import get_impl

    op = "lrt_conv2d" if any(type(m).__name__ == "Conv2dSVDO" for _, m in layers) else "lrt_linear"
    try:
        return get_impl(op, device)[0]
    except Exception as e:  # reported, not fatal: the first forward raises the real error
        return f"unavailable ({e})"


def _finite(v: float):
    return v if math.isfinite(v) else None


def train(args: argparse.Namespace) -> Tuple[nn.Module, dict]:
    """Run ``sparsevd train`` with ``args`` from :func:`build_parser` (``train`` subcommand).

    Prints the per-epoch lines and the report, saves the checkpoint and the summary.

    Returns:
        ``(model, summary)``: the trained model (eval mode) and the JSON summary as a dict.

    Raises:
        FileNotFoundError: the data set cannot be found, downloaded or installed.
    """
    resolve_recipe(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> Tuple[nn.Module, dict]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    svd = not args.dense
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    train_loader, test_loader = make_loaders(
        args.dataset, args.batch_size, data_dir=args.data_dir, subset=args.subset, seed=args.seed,
        download=not args.no_download, test_batch_size=1000, apt=not args.no_download)
    train_size, test_size = len(train_loader.dataset), len(test_loader.dataset)
    data_seconds = time.perf_counter() - t0

    pretrain = args.pretrain_epochs if svd else 0
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch

    def optimizer(model: nn.Module, first_step: int):
        # Adam; with linear decay lr_k = lr · (1 − k / total_steps) at global step k (0 at the end)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        if args.lr_decay != "linear":
            return opt, None
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: max(0.0, 1.0 - (k + first_step) / total_steps))

    model = build_model(args.model, svd=svd and pretrain == 0, threshold=args.threshold).to(device)
    opt, sched = optimizer(model, 0)
    crit = (SGVLB(model, train_size, kl_warmup_epochs=args.kl_warmup_epochs)
            if svd and not pretrain else None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    backend = _backend_used(build_model(args.model, svd=True), device) if svd else None

    out_dir = Path(args.out) if args.out else Path("runs") / (
        f"{args.model}-{'svd' if svd else 'dense'}-{args.dataset}")
    print(f"sparsevd train: {args.model} ({'sparse VD' if svd else 'dense'}) on {args.dataset}, "
          f"{train_size} train / {test_size} test images, {args.epochs} epochs, batch "
          f"{args.batch_size}, Adam lr {args.lr:g} ({args.lr_decay} decay)"
          + (f", KL warm-up {args.kl_warmup_epochs:g} epochs, backend {backend}" if svd else "")
          + (f", {pretrain} dense pre-training epochs" if pretrain else "")
          + f", device {device} ({device_name}, {torch.get_num_threads()} threads)", flush=True)

    from tqdm.auto import tqdm

    history: List[dict] = []
    step_ms: List[float] = []
    train_seconds = eval_seconds = 0.0
    for epoch in range(args.epochs):
        if svd and pretrain and epoch == pretrain:
            # dense pre-training done: sparse-VD layers take over θ and b (log σ² = −10), with a
            # fresh Adam continuing the same learning-rate schedule
            model = convert(model, threshold=args.threshold)
            opt, sched = optimizer(model, epoch * steps_per_epoch)
            crit = SGVLB(model, train_size, kl_warmup_epochs=args.kl_warmup_epochs)
        phase_svd = svd and epoch >= pretrain
        model.train()
        t_ep = time.perf_counter()
        loss_sum = ce_sum = 0.0
        n_batches = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.no_progress, mininterval=0.5, file=sys.stderr)
        for i, (x, y) in enumerate(bar):
            t_step = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            if phase_svd:
                crit.epoch = epoch - pretrain + i / steps_per_epoch  # β rises per step
                loss = crit(logits, y)
                with torch.no_grad():
                    ce = F.cross_entropy(logits, y)
                loss_per_image = loss.detach() / train_size
            else:
                loss = ce = F.cross_entropy(logits, y)
                loss_per_image = loss.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += float(loss_per_image)  # syncs, so the step time below is complete
            ce_sum += float(ce.detach())
            step_ms.append(1e3 * (time.perf_counter() - t_step))
            n_batches += 1
            if i % 50 == 0 and not args.no_progress:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ep_train = time.perf_counter() - t_ep
        train_seconds += ep_train
        t_ev = time.perf_counter()
        acc = evaluate(model, test_loader, device)
        rep = report(model)
        eval_seconds += time.perf_counter() - t_ev
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(n_batches, 1),
            "ce": ce_sum / max(n_batches, 1),
            "phase": "sparse_vd" if phase_svd else "dense",
            "kl_per_image": (float(kl_divergence(model).detach()) / train_size) if svd else 0.0,
            "beta": crit.beta if phase_svd else None,
            "lr": opt.param_groups[0]["lr"],
            "test_accuracy": acc,
            "compression": _finite(rep.compression),
            "train_seconds": ep_train,
        }
        history.append(row)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {row['loss']:.4f}  ce {row['ce']:.4f}"
              + (f"  kl/N {row['kl_per_image']:.4f}  beta {row['beta']:.2f}" if phase_svd else "")
              + ("  (dense pre-training)" if svd and not phase_svd else "")
              + f"  lr {row['lr']:.2e}  test acc {100 * acc:.2f}%  "
              f"compression {rep.compression:.1f}x  ({ep_train:.1f} s)", flush=True)

    model.eval()
    rep = report(model)
    print()
    print(rep)
    acc = history[-1]["test_accuracy"] if history else evaluate(model, test_loader, device)

    config = {"model": args.model, "svd": svd, "threshold": args.threshold,
              "dataset": args.dataset, "num_classes": 10, "input_shape": [1, 28, 28]}
    ckpt = save_checkpoint(model, out_dir, config)
    q = torch.tensor(step_ms or [float("nan")], dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    summary = {
        "benchmark": f"{args.model}_train",
        "provider": "sparsevd" if svd else "dense",
        "mode": "train",
        "dtype": "float32",
        "shape": f"batch={args.batch_size},train_size={train_size}",
        "median_ms": _finite(q[0]),
        "p20_ms": _finite(q[1]),
        "p80_ms": _finite(q[2]),
        "model": args.model,
        "method": "sparse_vd" if svd else "dense",
        "svd": svd,
        "dataset": args.dataset,
        "test_accuracy": acc,
        "compression": _finite(rep.compression),
        "sparsity": rep.sparsity / 100.0,
        "per_layer_sparsity": [r.sparsity / 100.0 for r in rep.layers],
        "layers": [r.name for r in rep.layers],
        "params": rep.params,
        "nonzero": rep.nonzero,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "kl_warmup_epochs": args.kl_warmup_epochs if svd else None,
        "pretrain_epochs": pretrain,
        "threshold": args.threshold,
        "seed": args.seed,
        "subset": args.subset,
        "train_size": train_size,
        "test_size": test_size,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "data_seconds": data_seconds,
        "seconds_per_epoch": train_seconds / max(args.epochs, 1),
        "device": device.type,
        "device_name": device_name,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "backend": backend,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "sparsevd": _version(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt),
        "history": history,
        "report": _json_safe(rep.as_dict()),
    }
    text = json.dumps(summary, indent=2) + "\n"
    (out_dir / "summary.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(f"\ntest accuracy {100 * acc:.2f}%  compression {rep.compression:.1f}x  "
          f"({rep.nonzero} of {rep.params} weights kept)  train time {train_seconds:.0f} s  "
          f"checkpoint {ckpt}" + (f"  summary {args.json}" if args.json else ""), flush=True)
    return model, summary


def _json_safe(obj):
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------- main
def _deploy(argv: Sequence[str]) -> int:
    try:
        import importlib

        deploy_cli = importlib.import_module("sparsevd.deploy_cli")
    except ModuleNotFoundError as e:
        if e.name != "sparsevd.deploy_cli":
            raise
        print("sparsevd deploy: not available in this version of sparsevd (the module "
              "sparsevd.deploy_cli is missing)", file=sys.stderr)
        return 2
    rc = deploy_cli.main(list(argv))
    return int(rc or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sparsevd`` command and of ``python -m sparsevd``.

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success; 1 when the data cannot be found; 2 for usage errors
        (argparse exits with 2 itself) or a missing ``deploy`` implementation.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "deploy":
        return _deploy(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        resolve_recipe(args)
        if not args.dense and args.pretrain_epochs >= args.epochs:
            parser.train_parser.error(f"argument --pretrain-epochs: {args.pretrain_epochs} leaves no sparse-VD "
                         f"epoch of --epochs {args.epochs}; use fewer")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.train_parser.error("argument --device: cuda requested but torch.cuda.is_available() is "
                         "False")
        try:
            train(args)
        except FileNotFoundError as e:
            print(f"sparsevd train: {e}", file=sys.stderr)
            return 1
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
