// The sparsevd op library: schemas (TORCH_LIBRARY) and the Python module sparsevd._C.
//
// This is the only TORCH_LIBRARY(sparsevd, ...) block of the project: the Python side defines its
// own ops in the same namespace with torch.library.custom_op, which registers FRAGMENT libraries,
// so both coexist (tests/test_csr.py imports both in either order). Further C++ schemas go here or
// in TORCH_LIBRARY_FRAGMENT blocks; kernels register with TORCH_LIBRARY_IMPL(sparsevd, CPU|CUDA, m).
#include <torch/extension.h>

#include "cpu/csr_linear_cpu.h"

TORCH_LIBRARY(sparsevd, m) {
  // The fake (meta) implementation lives in Python, in sparsevd/ops/csr.py.
  m.set_python_module("sparsevd.ops.csr");
  // y (*, N) = x (*, K) @ W^T + bias with W (N, K) in CSR form (crow (N+1,), col (nnz,), values (nnz,)).
  m.def("csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsevd native op library: registers torch.ops.sparsevd.csr_linear (CPU, and CUDA when built).";
#ifdef SPARSEVD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_simd_available", &sparsevd::cpu::simd_available,
        "True when the AVX2+FMA fp32 kernels can run on this CPU.");
  m.def("cpu_simd_enabled", &sparsevd::cpu::simd_enabled, "True when the AVX2+FMA fp32 kernels are in use.");
  m.def("set_cpu_simd", &sparsevd::cpu::set_simd_enabled,
        "Use (True) or bypass (False) the AVX2+FMA fp32 kernels; returns the previous setting. For tests.");
}
