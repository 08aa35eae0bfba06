"""Compiling a family's Triton kernels for a GPU on a machine without one (the
test_<family>_triton.py tests): each kernel variant lowers to a cubin for sm_90 with Triton's
bundled ptxas, which catches the type and lowering errors the interpreter cannot.

A family's test passes the body of a script that calls ``build(fn, types, consts, warps, stages)``
for each variant (``types``: the pointer and scalar argument types, the others i32; ``consts``:
the constexpr arguments); :func:`compile_for_gpu` runs it in fresh processes with the interpreter
off (the kernels must be imported that way), the variants split over ``parts`` processes, and
returns how many compiled.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PREAMBLE = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cap, part, parts = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    jobs = []

    def build(fn, types, consts, warps, stages):
        jobs.append((fn, types, consts, warps, stages))
    """
)
_RUN = textwrap.dedent(
    """
    for fn, types, consts, warps, stages in jobs[part::parts]:
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
                 if sig[n].startswith("*")}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
        assert "cubin" in c.asm
        print("compiled", fn.__name__, {k: v for k, v in consts.items() if k.isupper() and "BLOCK" not in k},
              flush=True)
    """
)


def compile_for_gpu(body: str, parts: int = 1, capability: int = 90, timeout: float = 900) -> int:
    """Run ``body`` (its ``build`` calls) in ``parts`` processes for sm_<capability>; returns the
    number of kernels compiled. Skips the test when Triton has no bundled ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(capability).path
    except Exception as exc:  # pragma: no cover - no bundled ptxas
        pytest.skip(f"no ptxas: {exc}")
    script = _PREAMBLE + textwrap.dedent(body) + _RUN
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(capability), str(part), str(parts)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for part in range(parts)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    return sum(stdout.count("compiled") for stdout, _ in outs)
