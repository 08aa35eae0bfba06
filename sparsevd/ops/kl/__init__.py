"""The op family ``kl``: the sparse-VD KL divergence of many layers, its gradients, and log α
(Molchanov, Ashukha, Vetrov, ICML 2017, eqs. 8 and 14; docs/design.md, "The math").

    KL = Σ_layers Σ_weights −(k1·σ(k2 + k3·log α) − ½·log1p(e^(−log α)) − k1),
    log α = clamp(log σ² − log(θ² + 1e-8), −10, 10)

Each piece one hop away:

- :mod:`.naive`: the math in plain PyTorch (:func:`naive_kl_sparse_vd`, the op's signature): the
  ``reference`` backend and the tests' oracle; the per-weight rules and constants live in
  :mod:`sparsevd.ops.weights`;
- :mod:`.op`: the custom ops ``torch.ops.sparsevd.kl_sparse_vd``, ``kl_sparse_vd_kept`` (the same
  KL plus the per-layer count of the weights kept at evaluation, from the same pass) and
  ``log_alpha`` (schema, fake, autograd), :func:`run_kl_sparse_vd` and :func:`run_kl_sparse_vd_kept`;
- :mod:`.native`: the ``native`` backend (csrc/cpu/kl_cpu.cpp);
- :mod:`.triton`: the ``triton`` backend (triton_kernels/kl.py).

Tests: tests/test_kl.py (every backend and device), tests/test_kl_native.py,
tests/test_kl_triton.py; benchmark: benchmarks/bench_kl.py. The checked user-facing functions are
:func:`sparsevd.functional.kl_sparse_vd`, ``kl_sparse_vd_many`` and ``log_alpha``.
"""
from .naive import naive_kept_count, naive_kl_sparse_vd
from .op import kl_sparse_vd, kl_sparse_vd_kept, log_alpha, run_kl_sparse_vd, run_kl_sparse_vd_kept

__all__ = ["kl_sparse_vd", "kl_sparse_vd_kept", "log_alpha", "naive_kept_count", "naive_kl_sparse_vd",
           "run_kl_sparse_vd", "run_kl_sparse_vd_kept"]
