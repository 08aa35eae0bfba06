"""sparsevd.allocator: glibc's heap thresholds for CPU training (set once, opt-out, no-op when the
user set glibc's own variables); run in subprocesses, since the setting is process-wide."""
import json
import mmap
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch
import sparsevd
from sparsevd.allocator import keep_freed_memory
applied = keep_freed_memory()
again = keep_freed_memory()
# free and re-allocate 8 MB buffers (below the 32 MiB mmap threshold): with the thresholds set,
# the pages stay in the process and the second round faults (almost) none in
def round_():
    bufs = [torch.ones(2 * 1024 * 1024) for _ in range(4)]
    del bufs
round_()
round_()  # the second warm-up round faults in what the kept heap still had to grow by
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


#: pages one round of SCRIPT allocates (4 buffers of 2**21 fp32 values)
PAGES_PER_ROUND = 4 * 2 * 1024 * 1024 * 4 // mmap.PAGESIZE


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("SPARSEVD_KEEP_FREED_MEMORY", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_removes_the_page_faults_of_reallocation():
    on = _run({})
    assert on["applied"] is True and on["again"] is True
    # A round allocates 4 x 8 MB (PAGES_PER_ROUND). The measurement itself: with every such
    # buffer mmapped (the user's glibc setting, so keep_freed_memory stands back) each round
    # re-faults all of them. (glibc's default, dynamic thresholds re-fault 0-4 buffers a round,
    # depending on the heap's history, so the default is no fixed baseline.)
    mapped = _run({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert mapped["applied"] is False
    assert mapped["faults"] > 0.9 * PAGES_PER_ROUND, mapped
    # kept: next to none (at most one buffer in ten rounds was seen to grow the heap once more)
    assert on["faults"] < 0.1 * PAGES_PER_ROUND, on


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_respects_the_users_glibc_settings():
    assert _run({"MALLOC_TRIM_THRESHOLD_": "131072"})["applied"] is False
    assert _run({"MALLOC_MMAP_THRESHOLD_": "131072"})["applied"] is False
    assert _run({"SPARSEVD_KEEP_FREED_MEMORY": "0"})["applied"] is False
