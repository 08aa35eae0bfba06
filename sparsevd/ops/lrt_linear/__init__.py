"""The op family ``lrt_linear``: the training forward and backward of a linear layer with the local
reparameterization trick (Molchanov, Ashukha, Vetrov, ICML 2017, sec. 4.2; docs/design.md, "The
math").

    y = x θᵀ + b + sqrt((x ⊙ x)(σ²)ᵀ + 1e-8) ⊙ ξ,   x (*, in_features) → y (*, out_features)

Each piece one hop away:

- :mod:`.naive`: the math in plain PyTorch (:func:`naive_lrt_linear`,
  :func:`naive_lrt_linear_backward`), with the ops' signatures: the ``reference`` backend and the
  tests' oracle;
- :mod:`.op`: the custom ops ``torch.ops.sparsevd.lrt_linear`` / ``lrt_linear_backward`` (schema,
  fake, autograd) and :func:`run_lrt_linear`, the eager-or-custom-op path of the layers;
- :mod:`.native`: the ``native`` backend (csrc/cpu/lrt_linear_cpu.cpp);
- :mod:`.triton`: the ``triton`` backend (triton_kernels/lrt_linear.py).

Tests: tests/test_lrt_linear.py (every backend and device), tests/test_lrt_linear_native.py,
tests/test_lrt_linear_triton.py; benchmark: benchmarks/bench_lrt_linear.py. The checked
user-facing function is :func:`sparsevd.functional.lrt_linear`.
"""
from .naive import naive_lrt_linear, naive_lrt_linear_backward
from .op import lrt_linear, lrt_linear_backward, run_lrt_linear

__all__ = ["lrt_linear", "lrt_linear_backward", "naive_lrt_linear", "naive_lrt_linear_backward",
           "run_lrt_linear"]
