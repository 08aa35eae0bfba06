// sparsevd::csr_linear on the CPU (csr_linear_cpu.cpp): the kernel's entry point, for the ops that
// run their products on a CSR matrix (the deployed layers; the clipped LRT linear, lrt_linear_cpu.cpp), and
// the runtime switch of its instruction set (AVX2+FMA fp32 kernels or portable C++).
#pragma once

#include <ATen/ATen.h>

namespace sparsevd {
namespace cpu {

bool simd_available();                 // the CPU runs AVX2 and FMA (and the build is x86-64)
bool simd_enabled();                   // available and not switched off
bool set_simd_enabled(bool enabled);   // returns the previous setting

// y (*, N) = x (*, K) Wᵀ + bias, W (N, K) as CSR (crow_indices int32/int64 (N + 1,), col_indices
// uint16/int16/int32/int64 (nnz,), values (nnz,) in x's dtype); checks its arguments
// (csr_linear_checks.h and the index data), raises on bad ones.
at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const c10::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace sparsevd
