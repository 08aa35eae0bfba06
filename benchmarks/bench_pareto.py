"""Sparse VD against gradual magnitude pruning: test accuracy against compression (issue 23, item 5).

Models ``lenet300`` (LeNet-300-100) and ``lenet5`` (LeNet-5-Caffe) on Fashion-MNIST, ``--epochs``
(30) epochs, batch 100, the same optimiser and learning-rate schedule for both methods (the main
job's: Adam lr 1e-3 fused, ``sparsevd.train.adam``, decayed linearly to 0 over the run):

- ``sparse_vd``: the main job's recipe through ``sparsevd.train.fit`` (a third of the epochs dense,
  then sparse-VD layers with β warmed up over the next third; threshold 3; train-time clipping as
  ``sparsevd train`` decides it: on). With ``--targets``,
  ``fit(..., target_compression=X)`` when this ``fit`` accepts it (issue 23 item 1); otherwise one
  row with the recipe's own compression (``target`` None) whatever the targets.
- ``magnitude``: the dense model with :class:`sparsevd.magnitude.GradualMagnitudePruning` (Zhu &
  Gupta's cubic schedule, global L1 over the Linear/Conv2d weights, every ``--frequency`` steps)
  to each target compression, made permanent at the end. Tuned (``--tune``, on by default): a
  grid of pruning windows (fractions of the run: (1/3, 2/3) — the window of sparse VD's β warm-up
  —, (0, 2/3), (1/3, 5/6)) × learning rates (1e-3, 2e-3, 3e-3), each a ``--tune-epochs`` run (default:
  the run's epochs; 5- and 6-epoch proxies chose the wrong lr for sparse VD) trained on
  50,000 training images and scored on the other 10,000 (the test set is never used to choose);
  the best goes to the full run. The row records the grid, its validation accuracies and the choice.

Compression: total / nonzero over the weights of the Linear/Conv2d layers (biases excluded), as
``sparsevd.report`` counts the converted layers. Rows are appended to
``benchmarks/results/pareto-<YYYYMMDD>.json`` (``model``, ``method``, ``epochs``, ``target``,
``compression``, ``test_accuracy``, ``seed``, ``tuned``, ``seconds``, the environment).
``--report`` draws every row of the results files (or ``--report-from FILE...``) as test accuracy
against compression (log x) to ``benchmarks/results/pareto-<date>.png`` and writes the table into
README.md between ``<!-- pareto:begin -->`` and ``<!-- pareto:end -->``.

Sparse VD's own options: ``--svd-lr`` (1e-3), ``--svd-finetune N`` (0: ``fit(finetune_epochs=N)``,
the fixed-mask deterministic tail), ``--svd-pretrain N`` (a third); ``--tune-svd`` chooses the
fine-tuning share (:data:`FINETUNES`: a third) × lr {1e-3, 2e-3, 3e-3} per target with
``--svd-tune-epochs`` runs (default: the run's epochs) on the same validation split as the
magnitude grid (the row records the grid). Train-time clipping as ``sparsevd train`` resolves it
(on; with a target the controller holds the mask once the target is reached).

Usage: SPARSEVD_DATA=/work/shared/data python -m benchmarks.bench_pareto [--models lenet300 lenet5]
       [--methods magnitude sparse_vd] [--targets 10 20 50 100] [--epochs 30] [--seeds 0]
       [--no-tune] [--tune-epochs N] [--frequency 100] [--subset N] [--out FILE]
       [--svd-lr LR] [--svd-finetune N] [--svd-pretrain N] [--tune-svd [--svd-tune-epochs N]]
       [--no-tune --mag-window BEGIN END --mag-lr LR]
       [--report [--report-from FILE ...] [--readme README.md] [--png FILE]]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from . import common

from sparsevd.data import load_dataset
from sparsevd.magnitude import GradualMagnitudePruning
from sparsevd.models import build_model
from sparsevd.train import TrainConfig, adam, evaluate, fit, resolve_recipe

MODELS = ("lenet300", "lenet5")
METHODS = ("magnitude", "sparse_vd")
TARGETS = (10.0, 20.0, 50.0, 100.0)
#: The magnitude baseline's tuning grid: pruning windows (fractions of the run) × learning rates.
WINDOWS = ((1 / 3, 2 / 3), (0.0, 2 / 3), (1 / 3, 5 / 6))
LRS = (1e-3, 2e-3, 3e-3)
#: Sparse VD's tuning grid (``--tune-svd``): the share of the run given to the fixed-mask
#: fine-tuning (``fit(finetune_epochs=)``, rounded to whole epochs) × the same learning rates.
#: A third, the tail of the magnitude baseline's best window (0, 2/3): shorter tails lost
#: 0.06–3.3 points at every target (benchmarks/NOTES.md), so the grid spends its runs on the lr.
FINETUNES = (1 / 3,)
#: The README markers of the table (:func:`write_readme`).
BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"


def results_path(day: Optional[str] = None) -> Path:
    """benchmarks/results/pareto-<YYYYMMDD>.json."""
    day = day or datetime.date.today().strftime("%Y%m%d")
    return common.RESULTS_DIR / f"pareto-{day}.json"


def make_loader(x: torch.Tensor, y: torch.Tensor, batch: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle, generator=gen if shuffle else None)


def train_magnitude(model_name: str, train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                    epochs: int, target: float, lr: float, window: Tuple[float, float], seed: int,
                    frequency: int = 100, batch: int = 100) -> Dict[str, float]:
    """Dense training with gradual magnitude pruning to ``target`` compression over ``window`` (fractions
    of the steps), the main job's optimiser and schedule. Returns test_accuracy and compression."""
    torch.manual_seed(seed)
    model = build_model(model_name, svd=False)
    loader = make_loader(*train, batch, True, seed)
    steps = max(1, epochs * len(loader))
    opt = adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - k / steps))
    pruner = GradualMagnitudePruning(model, target_compression=target, begin_step=int(window[0] * steps),
                                     end_step=int(window[1] * steps), frequency=frequency)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            pruner.step()
    pruner.finish()
    acc = evaluate(model, make_loader(*test, 1000, False, 0), torch.device("cpu"))
    return {"test_accuracy": acc, "compression": pruner.compression()}


def validation_split(train):
    """(fit, validation): all but the last 10,000 (or a sixth of the) training images, and those;
    the test set is never used to choose."""
    x, y = train
    n_val = min(10_000, len(y) // 6)
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def tune_magnitude(model_name: str, train, target: float, seed: int, epochs: int, frequency: int):
    """The grid WINDOWS × LRS, each trained on all but the last 10,000 (or a sixth of the) training
    images and scored on those. Returns (best {window, lr}, [grid rows])."""
    fit_part, val_part = validation_split(train)
    grid = []
    for window in WINDOWS:
        for lr in LRS:
            r = train_magnitude(model_name, fit_part, val_part, epochs, target, lr, window, seed, frequency)
            grid.append({"window": [round(w, 4) for w in window], "lr": lr, "val_accuracy": r["test_accuracy"]})
    best = max(grid, key=lambda g: g["val_accuracy"])
    return {"window": best["window"], "lr": best["lr"]}, grid


def fit_accepts_target() -> bool:
    """Whether sparsevd.train.fit takes ``target_compression`` (issue 23 item 1)."""
    return "target_compression" in inspect.signature(fit).parameters


def _train_clip(target) -> bool:
    """Train-time clipping as ``sparsevd train`` resolves it (training.config.resolve_recipe)."""
    return resolve_recipe(TrainConfig(target_compression=target)).train_clip


def finetune_epochs(epochs: int, share: float) -> int:
    """The fine-tuning epochs of a run of ``epochs`` for a ``share`` of it (rounded), leaving at
    least one sparse-VD epoch after the third of dense pre-training."""
    return max(0, min(round(share * epochs), epochs - epochs // 3 - 1))


def train_sparse_vd(model_name: str, train, test, epochs: int, target: Optional[float], seed: int,
                    batch: int = 100, lr: float = 1e-3, finetune: int = 0,
                    pretrain: Optional[int] = None) -> Dict[str, float]:
    """The main job's recipe (sparsevd.train.fit, defaults of resolve_recipe and TrainConfig's train-time
    clipping), with the target when given, at ``lr``, the last ``finetune`` epochs fine-tuning with
    the mask frozen (``fit(finetune_epochs=)``), after ``pretrain`` dense epochs (default: a third)."""
    torch.manual_seed(seed)
    model = build_model(model_name, svd=False)
    kw = {} if target is None else {"target_compression": target}
    if finetune:
        kw["finetune_epochs"] = finetune
    out = fit(model, make_loader(*train, batch, True, seed), make_loader(*test, 1000, False, 0), epochs=epochs,
              lr=lr, pretrain_epochs=epochs // 3 if pretrain is None else pretrain, kl_warmup_epochs=epochs / 3, train_size=len(train[1]),
              device="cpu", mc_samples=0, train_clip=_train_clip(target), **kw)
    return {"test_accuracy": out["test_accuracy"], "compression": out["compression"]}


def tune_sparse_vd(model_name: str, train, target: Optional[float], seed: int, epochs: int):
    """The grid FINETUNES × LRS on the validation split of :func:`tune_magnitude`. Returns
    (best {finetune share, lr}, [grid rows])."""
    fit_part, val_part = validation_split(train)
    grid = []
    for share in FINETUNES:
        for lr in LRS:
            r = train_sparse_vd(model_name, fit_part, val_part, epochs, target, seed, lr=lr,
                                finetune=finetune_epochs(epochs, share))
            grid.append({"finetune_share": round(share, 4), "finetune_epochs": finetune_epochs(epochs, share),
                         "lr": lr, "val_accuracy": r["test_accuracy"], "val_compression": r["compression"]})
    best = max(grid, key=lambda g: g["val_accuracy"])
    return {"finetune_share": best["finetune_share"], "lr": best["lr"]}, grid


def run_rows(args, data) -> List[dict]:
    train, test = data
    env = common.environment("cpu")
    rows = []
    for model_name in args.models:
        for seed in args.seeds:
            for method in args.methods:
                if method == "sparse_vd":
                    targets = list(args.targets) if fit_accepts_target() else [None]
                else:
                    targets = list(args.targets)
                for target in targets:
                    t0 = time.perf_counter()
                    tuned: Dict[str, object] = {}
                    if method == "magnitude":
                        choice = {"window": [round(w, 4) for w in (args.mag_window or WINDOWS[0])],
                                  "lr": args.mag_lr}
                        if args.tune:
                            choice, grid = tune_magnitude(model_name, train, target, seed, args.tune_epochs,
                                                          args.frequency)
                            tuned = {"tuned": "pruning window x lr on a 10k validation split",
                                     "tune_epochs": args.tune_epochs, "grid": grid}
                        r = train_magnitude(model_name, train, test, args.epochs, target, choice["lr"],
                                            tuple(choice["window"]), seed, args.frequency)
                        tuned.update({"window": choice["window"], "lr": choice["lr"], "frequency": args.frequency})
                    else:
                        choice = {"finetune_share": args.svd_finetune / args.epochs, "lr": args.svd_lr}
                        tuned = {"tuned": None}
                        if args.tune_svd:
                            choice, grid = tune_sparse_vd(model_name, train, target, seed, args.svd_tune_epochs)
                            tuned = {"tuned": "fine-tuning share x lr on a 10k validation split",
                                     "tune_epochs": args.svd_tune_epochs, "grid": grid}
                        ft = finetune_epochs(args.epochs, choice["finetune_share"])
                        pretrain = getattr(args, "svd_pretrain", None)
                        r = train_sparse_vd(model_name, train, test, args.epochs, target, seed, lr=choice["lr"],
                                            finetune=ft, pretrain=pretrain)
                        tuned.update({"lr": choice["lr"], "finetune_epochs": ft,
                                      "pretrain_epochs": args.epochs // 3 if pretrain is None else pretrain,
                                      "recipe": "main job (sparsevd.train.fit defaults)",
                                      "train_clip": _train_clip(target)})
                    row = {"benchmark": "pareto", "model": model_name, "method": method, "epochs": args.epochs,
                           "target": target, "compression": r["compression"],
                           "test_accuracy": r["test_accuracy"], "seed": seed, "train_size": len(train[1]),
                           "seconds": time.perf_counter() - t0, **tuned, **env}
                    print(f"{model_name} {method} target={target} seed={seed}: "
                          f"{100 * r['test_accuracy']:.2f} % at {r['compression']:.1f}x "
                          f"({row['seconds']:.0f} s)", flush=True)
                    rows.append(row)
                    if not args.no_save:
                        save(rows[-1:], args.out)
    return rows


def save(rows: List[dict], path: Optional[Path] = None) -> Path:
    """Append ``rows`` to ``path`` (default: today's results file)."""
    return common.append_rows(Path(path) if path else results_path(), rows)


def load_rows(paths: Sequence[Path]) -> List[dict]:
    rows = []
    for p in paths:
        rows += [r for r in json.loads(Path(p).read_text()) if r.get("benchmark") == "pareto"]
    return rows


def latest(rows: List[dict]) -> List[dict]:
    """One row per (model, method, target, seed): the last one (a rerun replaces a row)."""
    last = {}
    for r in rows:
        last[(r["model"], r["method"], r.get("target"), r["seed"])] = r
    return list(last.values())


def table(rows: List[dict]) -> str:
    """A markdown table of :func:`latest` rows."""
    last = latest(rows)
    lines = ["| model | method | target | compression | test accuracy | epochs | seed | settings (chosen by) |",
             "|---|---|---|---|---|---|---|---|"]
    order = sorted(last, key=lambda r: (r["model"], r["method"], r.get("target") or 0, r["seed"]))
    for r in order:
        if r["method"] == "magnitude":
            tuned = f"window {r['window'][0]:.2f}–{r['window'][1]:.2f}, lr {r['lr']:g}"
        elif r.get("finetune_epochs") or r.get("tuned"):
            tuned = f"recipe, lr {r['lr']:g}, fine-tune {r.get('finetune_epochs', 0)} ep."
            if r.get("pretrain_epochs", r["epochs"] // 3) != r["epochs"] // 3:
                tuned += f", dense {r['pretrain_epochs']} ep."
        else:
            tuned = "recipe"
        # a grid row chose its settings on the validation split; the others were given (the
        # row's note says from where, e.g. seed 0's grid or another model's choice)
        tuned += " (validation grid)" if r.get("grid") else " (given)"
        target = "—" if r.get("target") is None else f"{r['target']:g}×"
        lines.append(f"| {r['model']} | {r['method']} | {target} | {r['compression']:.1f}× | "
                     f"{100 * r['test_accuracy']:.2f} % | {r['epochs']} | {r['seed']} | {tuned} |")
    return "\n".join(lines)


def by_point(rows: List[dict]) -> Dict[Tuple[str, str, Optional[float]], List[dict]]:
    """The :func:`latest` rows grouped by (model, method, target): one row per seed."""
    groups: Dict[Tuple[str, str, Optional[float]], List[dict]] = {}
    for r in latest(rows):
        groups.setdefault((r["model"], r["method"], r.get("target")), []).append(r)
    return groups


def mean_accuracy(rs: List[dict]) -> float:
    """The mean ``test_accuracy`` (a fraction in [0, 1]) of the rows ``rs`` (one per seed; not empty)."""
    return sum(r["test_accuracy"] for r in rs) / len(rs)


def summary(rows: List[dict]) -> str:
    """A markdown table per (model, target): each method's test accuracy averaged over its seeds
    (how many, and their range) and sparse VD minus magnitude where both have rows."""
    points = by_point(rows)
    lines = ["| model | target | magnitude: mean (seeds, range) | sparse VD: mean (seeds, range) | sparse VD − magnitude |",
             "|---|---|---|---|---|"]
    keys = sorted({(m, t) for m, _, t in points}, key=lambda k: (k[0], k[1] or 0))

    def cell(rs):
        if not rs:
            return "—"
        accs = [100 * r["test_accuracy"] for r in rs]
        return f"{100 * mean_accuracy(rs):.2f} % ({len(rs)}, {min(accs):.2f}–{max(accs):.2f})"

    for model_name, target in keys:
        mag, svd = points.get((model_name, "magnitude", target), []), points.get((model_name, "sparse_vd", target), [])
        diff = f"{100 * (mean_accuracy(svd) - mean_accuracy(mag)):+.2f}" if mag and svd else "—"
        label = "—" if target is None else f"{target:g}×"
        lines.append(f"| {model_name} | {label} | {cell(mag)} | {cell(svd)} | {diff} |")
    return "\n".join(lines)


def plot(rows: List[dict], png: Path) -> Path:
    """Test accuracy against compression (log x): each (model, method) a line through the means over
    seeds of its targets, bars from the lowest to the highest seed (the rows of the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: Dict[Tuple[str, str], List[List[dict]]] = {}
    for (model_name, method, _), rs in by_point(rows).items():
        lines.setdefault((model_name, method), []).append(rs)
    for (model_name, method), pts in sorted(lines.items()):
        # per point: mean compression, mean accuracy, lowest and highest seed (%)
        stats = sorted((sum(r["compression"] for r in rs) / len(rs), 100 * mean_accuracy(rs),
                        100 * min(r["test_accuracy"] for r in rs), 100 * max(r["test_accuracy"] for r in rs))
                       for rs in pts)
        x, y, lo, hi = zip(*stats)
        ax.errorbar(x, y, yerr=[[m - a for m, a in zip(y, lo)], [b - m for m, b in zip(y, hi)]], capsize=3,
                    marker="o" if method == "sparse_vd" else "s", linestyle="-" if method == "sparse_vd" else "--",
                    label=f"{model_name} {method}")
    ax.set_xscale("log")
    ax.set_xlabel("compression (weights / nonzero weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: sparse VD vs gradual magnitude pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def write_readme(readme: Path, text: str) -> None:
    """Replace what is between the pareto markers of ``readme`` with ``text``.

    Raises:
        ValueError: readme lacks the markers (names the file).
    """
    common.write_readme_section(readme, "pareto", text)


def report(args) -> int:
    paths = args.report_from or sorted(glob.glob(str(common.RESULTS_DIR / "pareto-*.json")))
    rows = load_rows(paths)
    if not rows:
        raise SystemExit("--report: no pareto rows in " + (", ".join(map(str, paths)) or "benchmarks/results"))
    png = Path(args.png) if args.png else results_path().with_suffix(".png")
    plot(rows, png)
    text = summary(rows) + "\n\nEvery run:\n\n" + table(rows)
    print(text)
    if args.readme:
        rel = os.path.relpath(png, Path(args.readme).resolve().parent)
        write_readme(Path(args.readme), f"![accuracy against compression]({rel})\n\n{text}")
    print("figure:", png)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300"], choices=MODELS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--no-tune", dest="tune", action="store_false", help="magnitude: no grid, window (1/3, 2/3), lr 1e-3")
    ap.add_argument("--tune-epochs", type=int, default=None, help="magnitude grid runs' epochs (default: --epochs)")
    ap.add_argument("--mag-window", nargs=2, type=float, default=None, metavar=("BEGIN", "END"),
                    help="magnitude without the grid (--no-tune): pruning window, fractions of the run (1/3 2/3)")
    ap.add_argument("--mag-lr", type=float, default=1e-3, help="magnitude without the grid (--no-tune): lr")
    ap.add_argument("--svd-lr", type=float, default=1e-3, help="sparse VD: Adam lr (without --tune-svd)")
    ap.add_argument("--svd-finetune", type=int, default=0,
                    help="sparse VD: fixed-mask fine-tuning epochs at the end (without --tune-svd)")
    ap.add_argument("--svd-pretrain", type=int, default=None,
                    help="sparse VD: dense pre-training epochs of the full run (default: a third)")
    ap.add_argument("--tune-svd", action="store_true",
                    help="sparse VD: choose fine-tuning share x lr on the validation split, as the magnitude grid")
    ap.add_argument("--svd-tune-epochs", type=int, default=None, help="sparse-VD grid runs' epochs (default: --epochs)")
    ap.add_argument("--frequency", type=int, default=100, help="magnitude: prune every N steps")
    ap.add_argument("--subset", type=int, default=None, help="first N training and test images (quick runs)")
    ap.add_argument("--data-dir", default=None, help="default: SPARSEVD_DATA or sparsevd's cache")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/pareto-<date>.json)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", action="store_true", help="draw the figure and the README table from the results")
    ap.add_argument("--report-from", nargs="+", type=Path, default=None)
    ap.add_argument("--readme", type=Path, default=None, help="README to write the table into (--report)")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.report:
        return report(args)
    if any(not (math.isfinite(t) and t > 1) for t in args.targets):
        ap.error(f"--targets: expected compressions > 1, got {args.targets}")
    if args.svd_finetune < 0 or not (math.isfinite(args.svd_lr) and args.svd_lr > 0):
        ap.error("--svd-finetune: expected an int >= 0; --svd-lr: a positive number")
    args.tune_epochs = args.epochs if args.tune_epochs is None else args.tune_epochs
    args.svd_tune_epochs = args.epochs if args.svd_tune_epochs is None else args.svd_tune_epochs
    for name in ("epochs", "tune_epochs", "svd_tune_epochs", "frequency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive int")
    if args.threads:
        torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_dataset("fashion-mnist", args.data_dir, download=False)
    if args.subset:
        xtr, ytr, xte, yte = xtr[:args.subset], ytr[:args.subset], xte[:args.subset], yte[:args.subset]
    run_rows(args, ((xtr, ytr), (xte, yte)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
