// sparsevd::csr_linear on the CPU (csr_linear_cpu.cpp): the kernel's entry point, for the ops that
// run their products on a CSR matrix (the deployed layers; the clipped LRT linear, lrt_linear_cpu.cpp), and
// the runtime switch of its instruction set (AVX-512 or AVX2+FMA fp32 kernels, or portable C++).
#pragma once

#include <ATen/ATen.h>

namespace sparsevd {
namespace cpu {

// The instruction set of the fp32 kernels: 0 portable C++, 1 AVX2+FMA, 2 AVX-512F (its SpMM tiles,
// packing and flushing; the SpMV and the index checks stay AVX2).
bool simd_enabled();                   // level >= 1
int set_simd_level(int level);         // clamped to what the CPU runs; returns the previous level

// y (*, N) = x (*, K) Wᵀ + bias, W (N, K) as CSR (crow_indices int32/int64 (N + 1,), col_indices
// uint16/int16/int32/int64 (nnz,), values (nnz,) in x's dtype); checks its arguments
// (csr_linear_checks.h and the index data), raises on bad ones.
at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const c10::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace sparsevd
