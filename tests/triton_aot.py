"""Compiling the families' Triton kernels for a GPU on a machine without one (the
test_<family>_triton.py tests): each kernel variant lowers to a cubin for sm_90 with Triton's
bundled ptxas, which catches the type and lowering errors the interpreter cannot.

A family's test module registers, at import, the body of a script that calls
``build(fn, types, consts, warps, stages)`` for each variant (``types``: the pointer and scalar
argument types, the others i32; ``consts``: the constexpr arguments). The first
:func:`compiled_for_gpu` call compiles the variants of every registered family at once, in fresh
processes with the interpreter off (the kernels must be imported that way), split over two
processes: one startup of torch and Triton for all of them.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional

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
    family = None

    def build(fn, types, consts, warps, stages):
        jobs.append((family, fn, types, consts, warps, stages))
    """
)
_RUN = textwrap.dedent(
    """
    for family, fn, types, consts, warps, stages in jobs[part::parts]:
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
                 if sig[n].startswith("*")}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
        assert "cubin" in c.asm
        print("compiled", family, fn.__name__, flush=True)
    """
)
_BODIES: Dict[str, str] = {}
_COUNTS: Optional[Dict[str, int]] = None


def register(family: str, body: str) -> None:
    """Register ``family``'s script body (its ``build`` calls)."""
    _BODIES[family] = textwrap.dedent(body)


def compiled_for_gpu(family: str, capability: int = 90, parts: int = 2, timeout: float = 900) -> int:
    """The number of ``family``'s kernel variants that compiled for sm_<capability> (every
    registered family compiles on the first call). Skips the test when Triton has no bundled
    ptxas."""
    global _COUNTS
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(capability).path
    except Exception as exc:  # pragma: no cover - no bundled ptxas
        pytest.skip(f"no ptxas: {exc}")
    if _COUNTS is None:
        script = _PREAMBLE + "".join(f"\nfamily = {name!r}\n{body}" for name, body in _BODIES.items()) + _RUN
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
        root = Path(__file__).resolve().parents[1]
        procs = [subprocess.Popen([sys.executable, "-c", script, str(capability), str(part), str(parts)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
                 for part in range(parts)]
        outs = [p.communicate(timeout=timeout) for p in procs]
        for p, (_, stderr) in zip(procs, outs):
            assert p.returncode == 0, stderr[-3000:]
        lines = [line.split() for stdout, _ in outs for line in stdout.splitlines() if line.startswith("compiled ")]
        _COUNTS = {name: sum(1 for line in lines if line[1] == name) for name in _BODIES}
    return _COUNTS[family]
