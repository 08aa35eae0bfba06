"""scripts/gpu_check.sh --dry-run: on this (GPU-less) machine every stage's command exists, the GPU
tests it names are collected and every benchmark accepts its arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True
    names = [s["stage"] for s in summary["stages"]]
    assert "tests-collect" in names and "sanitizer-collect" in names
    assert sum(n.startswith("bench_") for n in names) >= 3 and "bench_masked-args" in names
    assert all(s["status"] == "ok" for s in summary["stages"])
    assert "stage tests-collect: ok" in (tmp_path / "gpu_check.log").read_text()
