// sparsevd::philox_randn_(out, seed, offset): fills a contiguous fp32 CPU tensor with the LRT noise
// ξ[i] = tl.randn(seed, offset + i), i.e. Box–Muller of the first two words of Philox4x32-10 with
// key = seed and counter = (offset + i mod 2^32, 0, 0, 0) (Salmon et al., SC 2011) — the numbers
// the Triton kernels draw in registers. The reference backend on CPU uses it to regenerate ξ fast;
// sparsevd/ops/noise.py holds the same generator in torch ops, the fallback and the spec.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace sparsevd {
namespace cpu {
namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;

inline uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

inline float to_uniform(uint32_t u) {
  int32_t s = static_cast<int32_t>(u);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * 4.6566127342e-10f;
}

inline float philox_randn(uint32_t k0, uint32_t k1, uint32_t counter) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint32_t n0 = mulhi(kRoundB, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi(kRoundA, c0) ^ c3 ^ k1;
    c1 = kRoundB * c2;
    c3 = kRoundA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  const float u1 = std::fmax(1.0e-7f, to_uniform(c0));
  const float u2 = to_uniform(c1);
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(6.283185307179586f * u2);
}

void philox_randn_(at::Tensor out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out: expected a float32 tensor, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor");
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(key & 0xffffffffu);
  const uint32_t k1 = static_cast<uint32_t>(key >> 32);
  float* p = out.data_ptr<float>();
  const uint64_t base = static_cast<uint64_t>(offset);
  at::parallel_for(0, out.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      p[i] = philox_randn(k0, k1, static_cast<uint32_t>(base + static_cast<uint64_t>(i)));
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_FRAGMENT(sparsevd, m) {
  m.def("philox_randn_(Tensor(a!) out, int seed, int offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("philox_randn_", &sparsevd::cpu::philox_randn_);
}
