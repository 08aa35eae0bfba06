// Argument checks of sparsevd::csr_linear shared by the CPU and CUDA implementations.
//
// The checks here are O(1) (metadata only, no reads of index data). The kernels check the index
// data themselves, whatever reaches them (CPU: a RuntimeError naming the bad entry; CUDA: NaN in
// the affected outputs, no host sync); sparsevd.ops.csr_linear (sparsevd/ops/csr_linear/op.py, its
// checks in format.py) and the deployed layers validate it in Python before (a ValueError naming
// the argument).
#pragma once

#include <ATen/ATen.h>

namespace sparsevd {

// Checks dtypes, ranks, lengths and devices; returns the number of output features N.
inline int64_t check_csr_linear_args(
    const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
    const at::Tensor& values, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "csr_linear: x must have at least 1 dimension (*, in_features), got a 0-dim tensor");
  TORCH_CHECK(crow_indices.dim() == 1, "csr_linear: crow_indices must be 1-D (out_features + 1,), got shape ",
              crow_indices.sizes());
  TORCH_CHECK(col_indices.dim() == 1, "csr_linear: col_indices must be 1-D (nnz,), got shape ",
              col_indices.sizes());
  TORCH_CHECK(values.dim() == 1, "csr_linear: values must be 1-D (nnz,), got shape ", values.sizes());
  TORCH_CHECK(crow_indices.numel() >= 1, "csr_linear: crow_indices must have out_features + 1 >= 1 entries");
  TORCH_CHECK(col_indices.numel() == values.numel(), "csr_linear: col_indices has ", col_indices.numel(),
              " entries but values has ", values.numel());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), "csr_linear: values must be floating point, got ",
              values.scalar_type());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "csr_linear: x has dtype ", x.scalar_type(),
              " but values has dtype ", values.scalar_type(), "; they must match");
  const auto ct = crow_indices.scalar_type();
  TORCH_CHECK(ct == at::kInt || ct == at::kLong, "csr_linear: crow_indices must be int32 or int64, got ", ct);
  const auto it = col_indices.scalar_type();
  TORCH_CHECK(it == at::kUInt16 || it == at::kShort || it == at::kInt || it == at::kLong,
              "csr_linear: col_indices must be uint16, int16, int32 or int64, got ", it);
  TORCH_CHECK(crow_indices.device() == x.device() && col_indices.device() == x.device() &&
                  values.device() == x.device(),
              "csr_linear: x, crow_indices, col_indices and values must be on one device, got ", x.device(),
              ", ", crow_indices.device(), ", ", col_indices.device(), ", ", values.device());
  const int64_t n = crow_indices.numel() - 1;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n, "csr_linear: bias must have shape (", n,
                ",) (out_features), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == values.scalar_type(), "csr_linear: bias has dtype ", bias->scalar_type(),
                " but values has dtype ", values.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "csr_linear: bias is on ", bias->device(), " but x is on ",
                x.device());
  }
  TORCH_CHECK(it != at::kShort || x.size(-1) <= 32768,
              "csr_linear: int16 col_indices address at most 32768 input features, x has ", x.size(-1));
  TORCH_CHECK(it != at::kUInt16 || x.size(-1) <= 65536,
              "csr_linear: uint16 col_indices address at most 65536 input features, x has ", x.size(-1));
  return n;
}

}  // namespace sparsevd
