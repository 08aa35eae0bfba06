// torch bindings of the CUDA kernels of sparsevd::csr_linear (csr_linear_kernels.cu).
//
// Validates the arguments (metadata: the kernels check the index data themselves, without a host
// sync), narrows int64 indices to the kernels' int32 (row pointers) and uint16/int16/int32 (columns) after
// clamping them, so that a bad value stays bad, allocates the scratch (x transposed, counts of
// non-finite inputs) and launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../csr_linear_checks.h"
#include "csr_linear_cuda.h"

namespace sparsevd {
namespace cuda {
namespace {

ValueType value_type_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return ValueType::kFloat32;
    case at::kHalf: return ValueType::kFloat16;
    case at::kBFloat16: return ValueType::kBFloat16;
    default: TORCH_CHECK(false, "csr_linear (CUDA): values must be float32, float16 or bfloat16, got ", st);
  }
  return ValueType::kFloat32;
}

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                           const at::Tensor& values, const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_csr_linear_args(x, crow_indices, col_indices, values, bias);
  TORCH_CHECK(x.is_cuda(), "csr_linear (CUDA): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = values.scalar_type();
  const ValueType vt = value_type_of(st);
  const bool has_bias = bias.has_value() && bias->defined();

  const int64_t K = x.size(-1);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  if (x2.stride(1) != 1 || (M == 1 && !x2.is_contiguous())) x2 = x2.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);

  const int64_t nnz = col_indices.numel();
  if (K == 0) {  // no inputs: y = b, NaN in the rows that claim nonzeros (their columns are bad)
    if (has_bias) y.copy_(bias->unsqueeze(0).expand({M, N})); else y.zero_();
    const at::Tensor c = crow_indices.contiguous();
    y.masked_fill_(c.slice(0, 0, N).ne(0).logical_or(c.slice(0, 1, N + 1).ne(0)).unsqueeze(0),
                   std::numeric_limits<double>::quiet_NaN());
    return y.view(out_shape);
  }
  TORCH_CHECK(nnz < std::numeric_limits<int32_t>::max(),
              "csr_linear (CUDA): at most 2^31 - 2 nonzeros are supported, got ", nnz);
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(),
              "csr_linear (CUDA): at most 2^31 - 1 input features are supported, got ", K);
  // Narrowing clamps first: out-of-range values stay out of range (-1, nnz + 1, K), never wrap.
  const at::Tensor crow = crow_indices.scalar_type() == at::kInt
                              ? crow_indices.contiguous()
                              : crow_indices.clamp(-1, nnz + 1).to(at::kInt).contiguous();
  const at::Tensor col = col_indices.scalar_type() == at::kLong ? col_indices.clamp(-1, K).to(at::kInt).contiguous()
                                                                : col_indices.contiguous();
  const at::Tensor val = values.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t ws_bytes = csr_linear_workspace_bytes(M, K, vt);
  const at::Tensor ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));

  CsrLinearArgs a;
  a.x = x2.data_ptr();
  a.M = M;
  a.K = K;
  a.ldx = x2.stride(0);
  a.crow = crow.data_ptr();
  a.col = col.data_ptr();
  a.values = val.data_ptr();
  a.bias = has_bias ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.N = N;
  a.nnz = nnz;
  a.value_type = vt;
  a.crow_type = IndexType::kInt32;
  a.col_type = col.scalar_type() == at::kShort    ? IndexType::kInt16
               : col.scalar_type() == at::kUInt16 ? IndexType::kUInt16
                                                  : IndexType::kInt32;
  a.workspace = ws.data_ptr();
  const int err = launch_csr_linear(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "csr_linear (CUDA): kernel launch failed: ", error_string(err));
  return y.view(out_shape);
}

}  // namespace
}  // namespace cuda
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CUDA, m) { m.impl("csr_linear", &sparsevd::cuda::csr_linear_cuda); }
