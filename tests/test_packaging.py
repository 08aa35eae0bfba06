"""Packaging: the sdist carries everything a build needs, and `pip install .` (not editable)
installs a working package, with the Triton kernels and the compiled library, usable from
outside the repository. (The wheel build links sparsevd._C from the objects the editable install
left in build/, setup.py's persistent build directory, in seconds; from nothing it compiles for
about two minutes on 2 cores.)"""
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def test_sdist_carries_the_sources(tmp_path):
    pytest.importorskip("build")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)])
    (sdist,) = tmp_path.glob("sparsevd-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for required in ("setup.py", "pyproject.toml", "README.md", "docs/design.md", "csrc/ops.cpp",
                     "csrc/csr_linear_checks.h", "csrc/cpu/csr_linear_cpu.cpp", "csrc/cuda/csr_linear_kernels.cu",
                     "triton_kernels/lrt_linear.py", "benchmarks/common.py", "sparsevd/train.py",
                     "scripts/setup.sh"):
        assert required in names, required
    assert not any(n.endswith(".so") for n in names)


def test_non_editable_install_works_outside_the_repository(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
          str(tmp_path / "wheel"), str(ROOT)], env={**os.environ, "MAX_JOBS": "2"})
    (wheel,) = (tmp_path / "wheel").glob("sparsevd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("sparsevd/_C") and n.endswith(".so") for n in names)
    assert "sparsevd/triton_kernels/lrt_linear.py" in names and "sparsevd/benchmarks/common.py" in names
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)])
    code = textwrap.dedent("""
        import os, torch, sparsevd
        assert os.path.dirname(sparsevd.__file__).startswith(os.environ["SITE"]), sparsevd.__file__
        from sparsevd.ops import library
        assert library.available(), library.unavailable_reason()
        w = torch.randn(6, 10) * (torch.rand(6, 10) < 0.3)
        layer = sparsevd.nn.SparseLinear.from_dense(w)
        x = torch.randn(4, 10)
        torch.testing.assert_close(layer(x), x @ w.t())
        os.environ["SPARSEVD_BACKEND"] = "triton"  # the Triton kernels, in the interpreter
        from sparsevd.triton_kernels import lrt_linear
        svd = sparsevd.nn.LinearSVDO(10, 6)
        y = svd(x)
        y.sum().backward()
        assert y.shape == (4, 6) and svd.log_sigma2.grad is not None
        assert sparsevd.train.backend_name(torch.nn.Sequential(svd), "cpu") == "triton"
        import sparsevd.benchmarks.bench_csr_linear
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(site), "SITE": str(site), "TRITON_INTERPRET": "1"}
    r = _run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    assert r.stdout.strip().endswith("ok")
