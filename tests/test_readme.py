"""The README's promises: every dotted name it shows (``sparsevd.models.LeNet300``, ...) resolves
after a plain ``import sparsevd`` in a fresh interpreter, and its two set-up commands are the ones
.ci/run runs."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_name_the_readme_shows_resolves_after_import_sparsevd():
    # subpackages the README names as install locations: imported explicitly (see below)
    subpackages = {"sparsevd._C", "sparsevd.triton_kernels", "sparsevd.benchmarks"}
    names = sorted(set(re.findall(r"\bsparsevd(?:\.[A-Za-z_]\w*)+", README)) - subpackages)
    assert "sparsevd.models.LeNet300" in names and "sparsevd.checkpoint.load_checkpoint" in names
    code = (
        "import json, sys, sparsevd\n"
        "bad = []\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    obj = sparsevd\n"
        "    for part in name.split('.')[1:]:\n"
        "        if not hasattr(obj, part):\n"
        "            bad.append(name); break\n"
        "        obj = getattr(obj, part)\n"
        "print(json.dumps(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [], "names that do not resolve"


def test_ci_runs_the_readme_test_command():
    test_cmd = ".venv/bin/python -m pytest -q tests"
    assert test_cmd in README.split("## ")[1] or test_cmd in README[:2000]
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_subpackages_the_readme_names_import():
    code = "import sparsevd.triton_kernels.lrt_linear, sparsevd.benchmarks.common; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
