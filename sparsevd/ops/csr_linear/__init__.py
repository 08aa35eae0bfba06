"""The op family ``csr_linear``: y = x Wᵀ + b with W (out_features, in_features) stored in CSR form,
the deployed layers' matmul (the deployment of Molchanov, Ashukha, Vetrov, ICML 2017: weights with
log α ≥ 3 dropped, the rest stored sparse; docs/design.md, "Deployment").

Each piece one hop away:

- :mod:`.format`: the CSR format: :func:`to_csr` (building it), :func:`validate_csr` and
  :func:`check_input` (checking it, errors naming the argument), :func:`csr_to_dense` (the
  zero-filled dense weight in traceable ops: the ONNX form);
- :mod:`.naive`: the math in plain PyTorch (:func:`naive_csr_linear`, torch.sparse): the fallback
  without the compiled library;
- :mod:`.op`: the op's fake implementation (its schema is C++, csrc/ops.cpp) and :func:`csr_linear`,
  the checked entry point that picks the compiled kernels or the fallback;
- :mod:`.native`: the compiled kernels (csrc/cpu/csr_linear_cpu.cpp, csrc/cuda/csr_linear_kernels.cu),
  imported by :mod:`.op` only.

``csr_linear`` is no ``SPARSEVD_BACKEND`` op: the compiled kernels run wherever the library runs on
the input's device. Tests: tests/test_csr_linear.py (every implementation and device, from
tests/sample_inputs.py); benchmark: benchmarks/bench_csr_linear.py.

``sparsevd.ops.csr_linear`` is the function :func:`csr_linear` (its public name); the package's
modules are reached as ``from sparsevd.ops.csr_linear import format, op``.
"""
from .format import (CROW_DTYPES, INDEX_DTYPES, INT16_MAX_FEATURES, UINT16_MAX_FEATURES, check_input,
                     csr_to_dense, to_csr, validate_csr)
from .naive import naive_csr_linear
from .op import csr_linear, warn_fallback

__all__ = ["CROW_DTYPES", "INDEX_DTYPES", "INT16_MAX_FEATURES", "UINT16_MAX_FEATURES", "check_input",
           "csr_linear", "csr_to_dense", "naive_csr_linear", "to_csr", "validate_csr", "warn_fallback"]
