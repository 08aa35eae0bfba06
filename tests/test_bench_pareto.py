"""benchmarks/bench_pareto.py on tiny synthetic data: the rows of both methods (the magnitude
baseline tuned on a validation split and pruned to exactly its target), the figure and the README
table between the markers."""
import argparse
import json

import pytest
import torch

from sparsevd.benchmarks import bench_pareto


def synthetic(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.3
    x[torch.arange(n), 0, y, y] = 1.0  # a learnable pixel per class
    return x, y


def args(tmp_path, **kw):
    base = dict(models=["lenet300"], methods=["magnitude", "sparse_vd"], targets=[4.0], epochs=1, seeds=[0],
                tune=True, tune_epochs=1, frequency=2, out=tmp_path / "pareto.json", no_save=False,
                svd_lr=1e-3, svd_finetune=0, tune_svd=False, svd_tune_epochs=6, mag_window=None, mag_lr=1e-3)
    base.update(kw)
    return argparse.Namespace(**base)


def test_rows_figure_and_readme_table(tmp_path, monkeypatch):
    data = (synthetic(300, 0), synthetic(100, 1))
    rows = bench_pareto.run_rows(args(tmp_path), data)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"magnitude", "sparse_vd"}
    for r in rows:
        assert {"model", "method", "epochs", "compression", "test_accuracy", "seed"} <= set(r)
        assert r["model"] == "lenet300" and r["epochs"] == 1 and r["seed"] == 0 and 0 <= r["test_accuracy"] <= 1
    mag = by["magnitude"]
    total = 784 * 300 + 300 * 100 + 100 * 10
    assert mag["compression"] == pytest.approx(total / (total - round(0.75 * total)))
    assert len(mag["grid"]) == len(bench_pareto.WINDOWS) * len(bench_pareto.LRS)
    best = max(mag["grid"], key=lambda g: g["val_accuracy"])
    assert (mag["window"], mag["lr"]) == (best["window"], best["lr"])
    if bench_pareto.fit_accepts_target():
        assert by["sparse_vd"]["target"] == 4.0
    else:
        assert by["sparse_vd"]["target"] is None

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_pareto.BEGIN}\nold\n{bench_pareto.END}\noutro\n")
    png = tmp_path / "pareto.png"
    assert bench_pareto.main(["--report", "--report-from", str(tmp_path / "pareto.json"), "--readme", str(readme),
                              "--png", str(png)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| lenet300 | magnitude | 4× |" in text and "pareto.png" in text
    mag_line = next(line for line in text.splitlines() if line.startswith("| lenet300 | magnitude | 4× |"))
    svd_line = next(line for line in text.splitlines() if line.startswith("| lenet300 | sparse_vd |"))
    assert mag_line.endswith("(validation grid) |") and svd_line.endswith("(given) |")
    assert png.stat().st_size > 1000


def test_sparse_vd_tuned_on_the_validation_split_as_the_baseline(tmp_path):
    """--tune-svd: the grid fine-tuning share × lr, scored on the validation split; the full run
    takes the best cell (its share rounded to the run's epochs)."""
    data = (synthetic(300, 0), synthetic(100, 1))
    rows = bench_pareto.run_rows(args(tmp_path, methods=["sparse_vd"], epochs=6, tune_svd=True), data)
    (row,) = rows
    grid = row["grid"]
    assert len(grid) == len(bench_pareto.FINETUNES) * len(bench_pareto.LRS)
    assert sorted({g["finetune_epochs"] for g in grid}) == sorted({bench_pareto.finetune_epochs(6, f)
                                                                   for f in bench_pareto.FINETUNES})
    best = max(grid, key=lambda g: g["val_accuracy"])
    assert row["lr"] == best["lr"]
    assert row["finetune_epochs"] == bench_pareto.finetune_epochs(6, best["finetune_share"])
    assert row["tuned"].startswith("fine-tuning share x lr") and row["tune_epochs"] == 6
    # the untuned row: the options as given
    (plain,) = bench_pareto.run_rows(args(tmp_path, methods=["sparse_vd"], epochs=6, svd_finetune=2,
                                          svd_lr=2e-3), data)
    assert (plain["finetune_epochs"], plain["lr"], plain["tuned"]) == (2, 2e-3, None)
    assert bench_pareto.finetune_epochs(30, 1 / 3) == 10 and bench_pareto.finetune_epochs(3, 1.0) == 1


def test_errors_name_the_option(tmp_path):
    with pytest.raises(SystemExit):
        bench_pareto.main(["--targets", "1", "--no-save"])
    readme = tmp_path / "R.md"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="readme: .* markers"):
        bench_pareto.write_readme(readme, "x")


def test_summary_averages_the_seeds_of_each_point():
    def row(method, target, seed, acc, **kw):
        return dict(model="lenet300", method=method, target=target, seed=seed, test_accuracy=acc,
                    compression=target, epochs=30, lr=1e-3, window=[0.0, 0.5], **kw)

    rows = [row("magnitude", 20.0, 0, 0.80), row("magnitude", 20.0, 1, 0.90),
            row("magnitude", 20.0, 1, 0.70),  # a rerun of seed 1 replaces the row before it
            row("sparse_vd", 20.0, 0, 0.76), row("sparse_vd", 20.0, 1, 0.78), row("sparse_vd", 50.0, 0, 0.60)]
    text = bench_pareto.summary(rows)
    assert "| lenet300 | 20× | 75.00 % (2, 70.00–80.00) | 77.00 % (2, 76.00–78.00) | +2.00 |" in text
    assert "| lenet300 | 50× | — | 60.00 % (1, 60.00–60.00) | — |" in text
