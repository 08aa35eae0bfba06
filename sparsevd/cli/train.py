"""``sparsevd train``: its arguments, the run (:func:`sparsevd.train.run`) and what it prints,
the checks of a resumed run (``--resume``) and the message after Ctrl-C.

This module only parses arguments and prints: ``sparsevd train`` hands a
:class:`sparsevd.train.TrainConfig` to :func:`sparsevd.train.run` (data, model, training loop,
checkpoint, summary) and prints per epoch the loss, the test accuracy (eval mode) and the
compression, then the per-layer report. The recipe and its defaults: :mod:`sparsevd.train`.

Usage::

    sparsevd train --model lenet300 --dataset fashion-mnist --epochs 30 --json result.json
    python -m sparsevd train --dense --epochs 30
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import read_config, saved_epoch
from ..convert import report
from ..data import DATASETS
from ..models import MODELS
from ..train import RUNTIME_FIELDS, TrainConfig, TrainingDiverged, resolve_recipe, resume_conflicts, run
from .args import finite_float, nonneg_float, nonneg_int, positive_float, positive_int, seed

__all__ = ["add_parser", "command", "train"]

#: Defaults of ``sparsevd train``: those of :class:`sparsevd.train.TrainConfig`.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


#: The options a resumed run may take besides --resume (sparsevd.train.RUNTIME_FIELDS).
_FLAGS = {"threads": "--threads", "progress": "--no-progress", "json": "--json",
          "data_dir": "--data-dir", "download": "--no-download", "device": "--device"}
_RUNTIME_FLAGS = [_FLAGS[k] for k in RUNTIME_FIELDS]


# --------------------------------------------------------------------------------- arguments
class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, but not where the default is None:
    those options resolve their default from the others and say how in their help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand and its options to ``sub`` (the subparsers of the ``sparsevd``
    parser); returns its parser."""
    d = DEFAULTS
    t = sub.add_parser(
        "train", help="train LeNet-300-100 / LeNet-5 with sparse VD (or dense) and report",
        description="Train a LeNet with sparse variational dropout (or dense with --dense), print "
                    "per-epoch loss, test accuracy and compression, then the per-layer report; "
                    "save the checkpoint and a JSON summary.",
        formatter_class=_DefaultsHelp)
    t.add_argument("--model", choices=sorted(MODELS), default=d["model"],
                   help="lenet300: LeNet-300-100; lenet5: LeNet-5-Caffe")
    t.add_argument("--dataset", choices=sorted(DATASETS), default=d["dataset"])
    t.add_argument("--epochs", type=positive_int, default=d["epochs"])
    t.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    t.add_argument("--lr", type=positive_float, default=d["lr"],
                   help="Adam learning rate (default: 1e-3; 2e-3 with --target-compression, chosen on "
                        "a validation split)")
    t.add_argument("--lr-decay", choices=("linear", "none"), default=d["lr_decay"],
                   help="linear: lr decays linearly to 0 at the end of the run; none: constant")
    t.add_argument("--kl-warmup-epochs", type=nonneg_float, default=d["kl_warmup_epochs"],
                   help="sparse-VD epochs over which the KL weight beta rises linearly from 0 to "
                        "1, counted from the conversion (0: beta = 1 from the start); default: "
                        "a third of --epochs; ignored with --dense")
    t.add_argument("--threshold", type=finite_float, default=d["threshold"],
                   help="log alpha above which a weight is dropped at evaluation")
    t.add_argument("--pretrain-epochs", type=nonneg_int, default=d["pretrain_epochs"],
                   help="sparse VD only: train the dense model for the first N epochs, then "
                        "convert it to sparse-VD layers and train on with SGVLB; N < --epochs; "
                        "default: a third of --epochs, rounded down (0: sparse VD from the "
                        "random initialisation)")
    t.add_argument("--dense", action="store_true",
                   help="train the plain dense model (nn.Linear/nn.Conv2d, cross-entropy)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    t.add_argument("--seed", type=seed, default=d["seed"],
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
    t.add_argument("--subset", type=positive_int, default=None, metavar="N",
                   help="use only the first N training and N test images (quick tests)")
    t.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    t.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision: bf16 autocast (CPU or CUDA) or fp16 autocast with a "
                        "GradScaler (CUDA); parameters, KL and the LRT variance stay fp32")
    t.add_argument("--train-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="train-time clipping (default: on): in training mode the weights with log "
                        "alpha >= --threshold leave the LRT forward and backward (as in the authors' "
                        "code); with --target-compression the mask is held once the target is "
                        "reached; --no-train-clip trains with every weight")
    t.add_argument("--target-compression", type=positive_float, default=d["target_compression"],
                   metavar="X", help="sparse VD only: end the run at X-fold compression (> 1): the KL "
                   "weight adapts every step (beta != 1 changes the paper's objective; the mask stays "
                   "log alpha < --threshold); default: none, the paper's objective")
    t.add_argument("--target-scope", choices=("linear", "model"), default=d["target_scope"],
                   help="what --target-compression counts: the sparse-VD layers' weights, or every "
                        "parameter of the model")
    t.add_argument("--finetune-epochs", type=nonneg_int, default=d["finetune_epochs"], metavar="N",
                   help="sparse VD only: the last N of --epochs train the pruned model "
                        "deterministically: the mask (log alpha < --threshold) and log sigma2 frozen, "
                        "no noise, no KL, cross-entropy on the kept weights (default: a third of "
                        "--epochs with --target-compression, else 0)")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR (a checkpoint is written at the end of "
                        "every epoch) with its own settings; only " + ", ".join(_RUNTIME_FLAGS)
                        + " may be given besides (bit-identical to the uninterrupted run with the "
                        "same --threads and --device); any other option that differs from the "
                        "saved run is an error")
    return t


# -------------------------------------------------------------------------------- printing
def _print_start(info: dict) -> None:
    svd = info["svd"]
    print(f"sparsevd train: {info['model']} ({'sparse VD' if svd else 'dense'}) on {info['dataset']}, "
          f"{info['train_size']} train / {info['test_size']} test images, {info['epochs']} epochs, "
          f"batch {info['batch_size']}, Adam lr {info['lr']:g} ({info['lr_decay']} decay)"
          + (f", KL warm-up {info['kl_warmup_epochs']:g} epochs, backend {info['backend']}" if svd else "")
          + (f", {info['pretrain_epochs']} dense pre-training epochs" if svd and info["pretrain_epochs"] else "")
          + (f", resuming {info['out']}" if info["resume"] else "")
          + (f", {info['amp']} autocast" if info.get("amp") else "")
          + (", train-time clipping" if svd and info.get("train_clip") else "")
          + (f", target {info['target_compression']:g}x ({info['target_scope']})"
             if svd and info.get("target_compression") else "")
          + (f", {info['finetune_epochs']} fixed-mask fine-tuning epochs" if svd and info.get("finetune_epochs") else "")
          + (f", {info['world_size']} processes" if info.get("world_size", 1) > 1 else "")
          + f", device {info['device']} ({info['device_name']}, {info['threads']} threads)", flush=True)


def _print_epoch(row: dict, svd: bool) -> None:
    phase_svd = row["phase"] == "sparse_vd"
    compression = row["compression"] if row["compression"] is not None else float("inf")
    print(f"epoch {row['epoch']:3d}/{row['epochs']}  loss {row['loss']:.4f}  ce {row['ce']:.4f}"
          + (f"  kl/N {row['kl_per_image']:.4f}  beta {row['beta']:.2f}" if phase_svd else "")
          + ("  (fixed-mask fine-tuning)" if row["phase"] == "finetune"
             else "  (dense pre-training)" if svd and not phase_svd else "")
          + f"  lr {row['lr']:.2e}  test acc {100 * row['test_accuracy']:.2f}%  "
          f"compression {compression:.1f}x  ({row['train_seconds']:.1f} s)", flush=True)


def train(args: argparse.Namespace, given: Optional[set] = None) -> Tuple[nn.Module, dict]:
    """Run ``sparsevd train`` with ``args`` from :func:`sparsevd.cli.build_parser` (``train``
    subcommand): the per-epoch lines, the report table and the final line are printed; the work is
    :func:`sparsevd.train.run`'s. ``given``: with ``--resume``, the dests of the options the
    command line gave (the others are the saved run's; default: all).

    Returns:
        ``(model, summary)`` as :func:`sparsevd.train.run`.

    Raises:
        as :func:`sparsevd.train.run`.
    """
    config = _config(args, given)
    svd = [not config.dense]

    def start(info):
        svd[0] = info["svd"]
        _print_start(info)

    model, summary = run(config, on_start=start, on_epoch=lambda row: _print_epoch(row, svd[0]),
                         resume=args.resume is not None)
    if summary["rank"] != 0:  # data parallel: rank 0 prints
        return model, summary
    print()
    rep = report(model)
    print(rep)
    print(rep.model_line())
    for key, what in (("eval", "deterministic (eval mode)"), ("mc", "Monte-Carlo predictive mean")):
        p = summary["predictive"].get(key)
        if p:
            samples = f", S = {p['samples']}" if p["samples"] else ""
            print(f"{what}{samples}: test accuracy {100 * p['accuracy']:.2f}%, ECE (15 bins) "
                  f"{100 * p['ece']:.2f}%, NLL {p['nll']:.4f}, mean entropy {p['entropy']:.4f} nats")
    print(f"\ntest accuracy {100 * summary['test_accuracy']:.2f}%  compression "
          f"{summary['compression'] or float('inf'):.1f}x  ({summary['nonzero']} of {summary['params']} "
          f"weights kept)  train time {summary['train_seconds']:.0f} s  checkpoint "
          f"{summary['checkpoint']}" + (f"  summary {args.json}" if args.json else ""), flush=True)
    return model, summary


def _fields(args: argparse.Namespace, given=None) -> dict:
    """TrainConfig fields from ``args`` (of the option dests in ``given`` only, when set)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and (given is None or k in given)}
    for field, dest in (("download", "no_download"), ("progress", "no_progress")):
        if given is None or dest in given:
            values[field] = not getattr(args, dest)
    return values


def _config(args: argparse.Namespace, given=None) -> TrainConfig:
    """The TrainConfig of ``args``; of a resumed run (``--resume``), the options in ``given``
    only (the rest is the saved run's)."""
    values = _fields(args, given if args.resume is not None else None)
    if args.resume is not None:
        values["out"] = args.resume
    return TrainConfig(**values)


def _given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests of the ``train`` options that ``argv`` gives (abbreviated or ``--opt=value``
    forms included): ``argv`` parsed again with every default suppressed."""
    actions = parser.train_parser._actions
    defaults = [a.default for a in actions]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, d in zip(actions, defaults):
            a.default = d
    return set(vars(given)) - {"command", "resume"}


def _resume_conflicts(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set) -> list:
    """The options given with ``--resume DIR`` that contradict the saved run, as
    "--flag VALUE (saved: VALUE)" strings; an unreadable checkpoint is left to the run to report."""
    try:
        saved = read_config(args.resume).get("train_config")
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        return []
    actions = {a.dest: a for a in parser.train_parser._actions if a.option_strings}
    flags = {dest: a.option_strings[0] for dest, a in actions.items()}
    out = []
    if "out" in given and Path(args.out).resolve() != Path(args.resume).resolve():
        out.append(f"--out {args.out} (a resumed run writes into {args.resume})")
    for field, old, new in resume_conflicts(saved, _fields(args, given)):
        dest = {"download": "no_download", "progress": "no_progress"}.get(field, field)
        value = "" if isinstance(new, bool) else f" {new}"
        flag = flags.get(dest, field)
        if new is False and isinstance(actions.get(dest), argparse.BooleanOptionalAction):
            flag = actions[dest].option_strings[1]  # --no-<flag>
        out.append(f"{flag}{value} (saved: {old})")
    return out


def _interrupted(out: Path, before, resumed: bool) -> str:
    """The message after Ctrl-C: what the run directory holds now, and what to do."""
    now = saved_epoch(out)
    if now is None:
        return (f"sparsevd train: interrupted before the first epoch ended; nothing was saved in "
                f"{out}, so there is nothing to resume: run the same command again to start over")
    epoch, epochs, version = now
    of = f" of {epochs}" if epochs else ""
    if not resumed and before is not None and version == before[2]:
        return (f"sparsevd train: interrupted before the first epoch ended; nothing of this run was "
                f"saved ({out} still holds the checkpoint of epoch {epoch}{of} of an earlier run, "
                f"which `sparsevd train --resume {out}` would continue)")
    return (f"sparsevd train: interrupted; the checkpoint of epoch {epoch}{of} is in {out}: "
            f"continue with `sparsevd train --resume {out}`")


# ------------------------------------------------------------------------------------ command
def _checked(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> Optional[set]:
    """The usage checks of ``sparsevd train`` before anything runs (argparse exits with 2 and the
    message): with ``--resume``, options that contradict the saved run; else the recipe's
    defaults resolved and --pretrain-epochs below --epochs; --device cuda only with CUDA. Returns
    ``given`` for :func:`train` (with ``--resume``: the dests the command line gave; else None)."""
    given = None
    if args.resume is not None:  # the saved run's settings; only the runtime ones may change
        given = _given_options(parser, argv)
        conflicts = _resume_conflicts(parser, args, given)
        if conflicts:
            parser.train_parser.error(
                f"argument --resume: options that contradict the run saved in {args.resume}: "
                + "; ".join(conflicts) + f"; a resumed run takes only {', '.join(_RUNTIME_FLAGS)}")
    else:
        resolve_recipe(args)
        if not args.dense and args.pretrain_epochs >= args.epochs:
            parser.train_parser.error(f"argument --pretrain-epochs: {args.pretrain_epochs} leaves no "
                                      f"sparse-VD epoch of --epochs {args.epochs}; use fewer")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.train_parser.error("argument --device: cuda requested but torch.cuda.is_available() is "
                                  "False")
    return given


def command(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``sparsevd train``: ``args`` parsed by ``parser`` (:func:`sparsevd.cli.build_parser`)
    from ``argv``; returns the exit status (0; 1: data not found, diverged, a file unreadable or
    unwritable; 130: interrupted, with what the run directory holds and how to resume). Usage
    errors exit with 2 (argparse, :func:`_checked`)."""
    given = _checked(parser, args, argv)
    out = _config(args, given).out_dir()
    before = saved_epoch(out)
    try:
        train(args, given)
    except TrainingDiverged as e:
        print(f"sparsevd train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n" + _interrupted(out, before, args.resume is not None), file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"sparsevd train: {e}", file=sys.stderr)
        return 1
    return 0
