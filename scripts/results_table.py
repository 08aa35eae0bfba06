#!/usr/bin/env python3
"""Collect ``sparsevd train`` JSON summaries and render the README's results table.

    # append summaries (written by `sparsevd train --json FILE`) to
    # benchmarks/results/cpu-train-<YYYYMMDD>.json (date of each run; a list of rows)
    python scripts/results_table.py --add runs/dense.json runs/svd.json

    # print the markdown table of all cpu-train-*.json rows (the latest row per configuration)
    python scripts/results_table.py

    # ... and write it into README.md between the results markers
    python scripts/results_table.py --readme README.md

    # the recipe search (rows in benchmarks/results/recipe-search-<YYYYMMDD>.json)
    python scripts/results_table.py --add runs/x.json --to recipe-search-20261121.json

Accuracy deltas are against the dense row of the same model, data set and epoch count (recipe
search: and the same seed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PATTERN = "cpu-train-*.json"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SEARCH_PATTERN = "recipe-search-*.json"
SEARCH_BEGIN, SEARCH_END = "<!-- recipe:begin -->", "<!-- recipe:end -->"
REQUIRED = ("model", "dataset", "svd", "epochs", "test_accuracy", "compression",
            "per_layer_sparsity", "train_seconds", "device", "date")


def _key(row: dict) -> tuple:
    return (row["model"], row["dataset"], row["epochs"], bool(row["svd"]), row.get("subset"),
            row["device"], row.get("device_name"))


def add(paths, results_dir: Path, to: str = None) -> None:
    """Append each summary to results_dir/cpu-train-<date of the run>.json (a JSON list), or to
    results_dir/``to`` when given."""
    for p in paths:
        row = json.loads(Path(p).read_text())
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            sys.exit(f"{p}: not a sparsevd train summary (missing {', '.join(missing)})")
        prefix = "cpu" if row["device"] == "cpu" else row["device"]
        day = row["date"][:10].replace("-", "")
        target = results_dir / (to or f"{prefix}-train-{day}.json")
        rows = json.loads(target.read_text()) if target.is_file() else []
        rows = [r for r in rows if not (r.get("date") == row["date"] and _key(r) == _key(row))]
        rows.append(row)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{p} -> {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")


def load_rows(results_dir: Path) -> list:
    """All rows of the results files; for each configuration only the latest run."""
    latest = {}
    for f in sorted(results_dir.glob(PATTERN)) + sorted(results_dir.glob("cuda-train-*.json")):
        for row in json.loads(f.read_text()):
            row = dict(row, _file=f.name)
            k = _key(row)
            if k not in latest or row["date"] > latest[k]["date"]:
                latest[k] = row
    order = {"lenet300": 0, "lenet5": 1}
    return sorted(latest.values(), key=lambda r: (order.get(r["model"], 9), r["dataset"],
                                                   -r["epochs"], r["svd"]))


def _model_name(row: dict) -> str:
    return {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}.get(row["model"], row["model"])


def _recipe(row: dict) -> str:
    lr = f"Adam {row.get('lr', 1e-3):g}, {row.get('lr_decay', 'none')} decay, batch {row.get('batch_size')}"
    if not row["svd"]:
        return lr
    return (f"{row.get('pretrain_epochs') or 0} dense + {row['epochs'] - (row.get('pretrain_epochs') or 0)} "
            f"sparse-VD epochs, KL warm-up {round(row.get('kl_warmup_epochs'), 1):g}; {lr}")


def table(rows: list) -> str:
    """Markdown table of the rows."""
    dense = {(r["model"], r["dataset"], r["epochs"]): r for r in rows if not r["svd"]}
    lines = [
        "| model | data set | method | epochs | recipe | test accuracy | Δ vs dense | compression "
        "| per-layer sparsity | train time | s/epoch | threads | machine | backend | commit |",
        "|---|---|---|--:|---|--:|--:|--:|---|--:|--:|--:|---|---|---|",
    ]
    for r in rows:
        d = dense.get((r["model"], r["dataset"], r["epochs"]))
        delta = (f"{100 * (r['test_accuracy'] - d['test_accuracy']):+.2f} pp"
                 if r["svd"] and d is not None else "")
        sparsity = " / ".join(f"{100 * s:.1f}%" for s in r["per_layer_sparsity"])
        comp = r["compression"]
        machine = f"{r.get('device_name', r['device'])}, {r.get('cpu_count', '?')} cores"
        lines.append(
            f"| {_model_name(r)} | {r['dataset']} | {'sparse VD' if r['svd'] else 'dense'} "
            f"| {r['epochs']} | {_recipe(r)} | {100 * r['test_accuracy']:.2f}% | {delta} "
            f"| {'inf' if comp is None else f'{comp:.1f}x'} | {sparsity} "
            f"| {r['train_seconds'] / 60:.1f} min | {r['train_seconds'] / r['epochs']:.1f} "
            f"| {r.get('num_threads', '')} | {machine} | {r.get('backend') or '-'} "
            f"| {r.get('commit') or ''} |")
    files = sorted({r["_file"] for r in rows})
    lines.append("")
    lines.append(f"Generated by `python scripts/results_table.py --readme README.md` from "
                 f"{', '.join(f'`benchmarks/results/{f}`' for f in files)}.")
    return "\n".join(lines)


def search_table(rows: list) -> str:
    """Markdown table of the recipe-search rows (LeNet-300-100 variants, one line per run, by
    epochs)."""
    dense = {(r["model"], r["dataset"], r["epochs"], r.get("seed")): r for r in rows if not r["svd"]}
    lines = [
        "| epochs | method | seed | dense pre-training | KL warm-up | lr decay | test accuracy "
        "| Δ vs dense (same seed) | compression | per-layer sparsity | threads | commit |",
        "|--:|---|--:|--:|--:|---|--:|--:|--:|---|--:|---|",
    ]

    def order(r):
        return (r["epochs"], r["svd"], r.get("pretrain_epochs") or 0,
                r.get("kl_warmup_epochs") or 0, r.get("seed") or 0)

    for r in sorted(rows, key=order):
        d = dense.get((r["model"], r["dataset"], r["epochs"], r.get("seed")))
        delta = (f"{100 * (r['test_accuracy'] - d['test_accuracy']):+.2f} pp"
                 if r["svd"] and d is not None else "")
        sparsity = " / ".join(f"{100 * s:.1f}%" for s in r["per_layer_sparsity"])
        lines.append(
            f"| {r['epochs']} | {'sparse VD' if r['svd'] else 'dense'} | {r.get('seed', '')} "
            f"| {r.get('pretrain_epochs') or 0 if r['svd'] else ''} "
            f"| {'' if not r['svd'] else format(r.get('kl_warmup_epochs'), 'g')} "
            f"| {r.get('lr_decay', '')} | {100 * r['test_accuracy']:.2f}% | {delta} "
            f"| {r['compression']:.1f}x | {sparsity} | {r.get('num_threads', '')} "
            f"| {r.get('commit') or ''} |")
    return "\n".join(lines)


def update_readme(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    doc = path.read_text()
    if begin not in doc or end not in doc:
        sys.exit(f"{path}: markers {begin} / {end} not found")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--add", nargs="+", metavar="SUMMARY", help="summaries to append first")
    ap.add_argument("--to", metavar="NAME", help="results file name for --add (default "
                    "cpu-train-<date of the run>.json)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, help="write the table into this file's markers")
    args = ap.parse_args(argv)
    if args.add:
        add(args.add, args.results_dir, args.to)
    rows = load_rows(args.results_dir)
    if not rows:
        sys.exit(f"no rows in {args.results_dir}/{PATTERN}")
    text = table(rows)
    print(text)
    search = [r for f in sorted(args.results_dir.glob(SEARCH_PATTERN))
              for r in json.loads(f.read_text())]
    if search:
        stext = search_table(search)
        print()
        print(stext)
    if args.readme:
        update_readme(args.readme, text)
        if search:
            update_readme(args.readme, stext, SEARCH_BEGIN, SEARCH_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
