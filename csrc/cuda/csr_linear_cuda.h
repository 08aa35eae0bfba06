// Host interface of the CUDA kernels of sparsevd::csr_linear (csr_linear_kernels.cu).
//
// Plain C++ on purpose: no torch and no CUDA headers, so the .cu files compile quickly with nvcc and
// the torch bindings (csr_linear_cuda.cpp) compile with the host compiler.
#pragma once

#include <cstdint>

namespace sparsevd {
namespace cuda {

enum class ValueType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class IndexType : int { kInt16 = 0, kInt32 = 1, kInt64 = 2, kUInt16 = 3 };

// y (M, N) = x (M, K) W^T + bias, W (N, K) in CSR form. All pointers are device pointers. The index
// data is not trusted: bad row ranges and columns are skipped, their outputs set to NaN.
struct CsrLinearArgs {
  const void* x = nullptr;     // (M, K), element (m, k) at x[m * ldx + k]; contiguous when M == 1
  int64_t M = 0, K = 0, ldx = 0;  // K >= 1
  const void* crow = nullptr;  // (N + 1,), crow_type: int32 (kInt32) only
  const void* col = nullptr;   // (nnz,), col_type: uint16, int16 or int32, sorted or not (distinct in a row)
  const void* values = nullptr;  // (nnz,), value_type
  const void* bias = nullptr;  // (N,), value_type, or nullptr
  void* y = nullptr;           // (M, N) contiguous, value_type
  int64_t N = 0, nnz = 0;
  ValueType value_type = ValueType::kFloat32;
  IndexType crow_type = IndexType::kInt64;
  IndexType col_type = IndexType::kInt32;
  // Scratch of at least csr_linear_workspace_bytes(M, K, value_type) bytes, 16-byte aligned
  // (x transposed for M > 1, and the non-finite count of each batch row).
  void* workspace = nullptr;
};

// Bytes of scratch launch_csr_linear needs for a batch of M rows of K features.
int64_t csr_linear_workspace_bytes(int64_t M, int64_t K, ValueType value_type);

// Enqueues the kernels on `stream` (a cudaStream_t); returns the cudaError_t of the launch (0: ok).
int launch_csr_linear(const CsrLinearArgs& args, void* stream);

// The message of a cudaError_t returned by launch_csr_linear.
const char* error_string(int error);

}  // namespace cuda
}  // namespace sparsevd
