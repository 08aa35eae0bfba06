"""The CUDA kernels (csrc/cuda/*.cu) compile with nvcc for sm_80 and sm_90 (compile only, no GPU).

Runs scripts/compile_cuda.sh; skipped when nvcc is not installed.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "compile_cuda.sh"), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        obj = tmp_path / (cu.stem + ".o")
        assert obj.is_file() and obj.stat().st_size > 0, f"{obj} missing"
