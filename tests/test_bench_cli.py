"""`sparsevd bench`: the quick suite runs on this machine and prints the README's ratio table."""
import pytest

from sparsevd import cli
from sparsevd.benchmarks import suite


def test_ratio_table_by_hand():
    rows = [dict(benchmark="b", shape="s", dtype="float32", mode="full", provider=p, median_ms=ms,
                 threads=1) for p, ms in (("dense", 2.0), ("reference_compiled", 8.0), ("sparsevd", 4.0))]
    table = suite.ratio_table(rows)
    line = next(l for l in table.splitlines() if "| sparsevd |" in l)
    assert "| 4.000 | 2.00 | 0.50 |" in line
    assert table.splitlines()[0].startswith("| benchmark | shape | mode |")


def test_sparsevd_bench_runs_the_quick_suite(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(suite.SUITE, "cpu", [
        ("bench_train_step", ["--workloads", "lenet300", "--providers", "dense", "reference", "sparsevd",
                              "--threads", "{threads}", "--rounds", "1", "--steps", "1"]),
        ("bench_csr_linear", ["--device", "cpu", "--sparsity", "0.98", "--batch", "1",
                              "--threads", "{threads}", "--skip-lenet", "--rounds", "1"]),
    ])
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "--threads", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| lenet300_train_step | batch=100 | full |" in text and "| sparsevd |" in text
    assert "sparse_linear" in text and out.is_file()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "tpu"])


def test_bench_masked_quick_on_tiny_sizes(tmp_path, capsys):
    """benchmarks/bench_masked.py --quick: every part runs and writes rows of the protocol."""
    import json

    from sparsevd.benchmarks import bench_masked

    out = tmp_path / "rows.json"
    assert bench_masked.main(["--quick", "--out", str(out), "--layer", "32", "--sparsity", "0", "0.9",
                              "--infer-sparsity", "0", "0.9", "--batch", "1", "--seq", "4",
                              "--hidden", "16", "--layers", "1", "--heads", "2", "--rounds", "1",
                              "--min-run-time", "0.005", "--threads", "1"]) == 0
    rows = json.loads(out.read_text())
    kinds = {(r["benchmark"], r["provider"]) for r in rows}
    assert {("masked_train_step_layer", "sparsevd"), ("masked_train_step_lenet300", "dense"),
            ("transformer_infer", "eval"), ("transformer_infer", "sparsevd"),
            ("sparse_linear_call", "sparsevd"), ("adam_subnormal", "torch"), ("adam_subnormal", "sparsevd")} <= kinds
    assert {r["moments"] for r in rows if r["benchmark"] == "adam_subnormal"} == {"normal", "subnormal"}
    for r in rows:
        assert r["median_ms"] > 0 and {"shape", "dtype", "mode", "device", "commit"} <= set(r)
        if r["provider"] == "sparsevd" and r["benchmark"].startswith("masked_train"):
            assert r["ratio_to_0"] > 0 and abs(r["actual_sparsity"] - r["sparsity"]) < 0.05
    assert "the 0 % step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_masked.main(["--heads", "5", "--no-save"])


def test_minilm_table_goes_between_the_readme_markers(tmp_path):
    """benchmarks/bench_minilm_deploy.py --readme: the rows become the README's table (bytes, CSR
    layers, a ratio per batch and thread count), between the markers, the rest untouched."""
    from sparsevd.benchmarks import bench_minilm_deploy as bench

    rows = []
    for s, csr, ratio in ((0.1, 0, 1.01), (0.9, 36, 0.34)):
        rows.append({"benchmark": "minilm_deploy_size", "sparsity": s, "threads": 1, "layers": 37,
                     "layers_csr": csr, "deployed_bytes": int(43.1e6 * (1 - s)), "dense_bytes": int(43.1e6),
                     "bytes_ratio": round(1 - s, 4)})
        for b in (1, 32):
            rows.append({"benchmark": "minilm_infer", "provider": "sparsevd", "sparsity": s, "threads": 1,
                         "batch": b, "ratio": ratio + b / 1000})
    rows.append(dict(rows[0], threads=2))
    table = tmp_path / "t.json"
    table.write_text(__import__("json").dumps(rows))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- minilm:begin -->\nold\n<!-- minilm:end -->\nrest\n")
    bench.main(["--readme", str(readme), "--table", str(table), "--table-threads", "1"])
    text = readme.read_text()
    assert text.startswith("intro\n<!-- minilm:begin -->\n| sparsity |") and text.endswith("<!-- minilm:end -->\nrest\n")
    assert "old" not in text and "2 threads" not in text
    assert "| 90 % | 4.3 MB / 43.1 MB (0.100) | 36/37 | 0.34 | 0.37 |" in text  # ratios at B=1, B=32


def test_minilm_table_labels_plans_that_differ_by_thread_count():
    """When the plans on 1 and 2 threads differ, the bytes and CSR cells give each with its thread
    count, in thread order; when they agree, one cell."""
    from sparsevd.benchmarks import bench_minilm_deploy as bench

    rows = []
    for t, csr, nbytes in ((1, 32, 33.2e6), (2, 26, 36.7e6)):
        for s, c, b in ((0.5, csr, nbytes), (0.9, 36, 7.1e6)):
            rows.append({"benchmark": "minilm_deploy_size", "sparsity": s, "threads": t, "layers": 37,
                         "layers_csr": c, "deployed_bytes": int(b), "dense_bytes": int(43.1e6),
                         "bytes_ratio": round(b / 43.1e6, 4)})
    table = bench.markdown_table(rows)
    assert ("| 50 % | 33.2 MB / 43.1 MB (0.770) (1 thread) / 36.7 MB / 43.1 MB (0.852) (2 threads) | "
            "32/37 (1 thread) / 26/37 (2 threads) |") in table
    assert "| 90 % | 7.1 MB / 43.1 MB (0.165) | 36/37 |" in table
