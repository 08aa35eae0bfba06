// sparsevd::philox_randn_(out, seed, offset): fills a contiguous fp32 CPU tensor with the LRT noise
// ξ[i] = tl.randn(seed, offset + i) (philox.h states the generator) — the numbers the Triton
// kernels draw in registers and the native LRT kernels draw inline. sparsevd/ops/noise.py
// (lrt_noise) calls it to regenerate ξ on CPU and holds the same generator in torch ops (the spec).
// The schema is in csrc/ops.cpp.
// Vectorized (AVX-512 / AVX2, chosen at run time, kernels.h) and parallel over chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "denormals.h"
#include "kernels.h"

namespace sparsevd {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task: ~20-40 µs of work

void philox_randn_(at::Tensor out, int64_t seed, int64_t offset) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  TORCH_CHECK(out.device().is_cpu(), "out: expected a CPU tensor, got one on ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out: expected a float32 tensor, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor");
  const philox::Key key(seed);
  float* p = out.data_ptr<float>();
  const auto randn = kernels().randn;
  // Counter of element i: (offset + i) mod 2^32.
  const uint32_t base = static_cast<uint32_t>(static_cast<uint64_t>(offset));
  auto body = [&](int64_t begin, int64_t end) {
    randn(key, base + static_cast<uint32_t>(begin), p + begin, end - begin);
  };
  const int64_t n = out.numel();
  if (n <= kGrain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    body(0, n);
  } else {
    at::parallel_for(0, n, kGrain, flushing_task(body));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("philox_randn_", &sparsevd::cpu::philox_randn_);
}
