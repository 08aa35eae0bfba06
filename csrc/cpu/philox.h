// The LRT noise generator: ξ[i] = tl.randn(seed, i), i.e. Box–Muller of the first two words of
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with
// key = (seed mod 2^32, seed >> 32) and counter = (i mod 2^32, 0, 0, 0):
//
//   (c0, c1) = Philox4x32-10(key, counter)            (uint32 words, bit for bit Triton's)
//   u1 = max(1e-7, uniform(c0)), u2 = uniform(c1)      uniform(u) = int32(u) or ~int32(u) if < 0,
//                                                       times 4.6566127342e-10 (fp32)
//   ξ  = sqrt(-2 log u1) · cos(6.2831855 · u2)         (fp32 math, as tl.randn)
//
// The spec is sparsevd/ops/noise.py::randn_torch. This header holds the portable scalar form; the
// vectorized form (AVX2 / AVX-512, 8 or 16 lanes, own log/cos polynomials, equal to this one up to
// an ulp or two of log/cos) is simd/philox_vec.h, which the fused LRT kernels (kernels_body.h) call
// per chunk of output elements so that ξ only ever lives in an L1-resident buffer.
#pragma once

#include <cmath>
#include <cstdint>

namespace sparsevd {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;      // Weyl increments of the key
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;  // round multipliers
constexpr int kRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // (2^31 - 1) * this < 1 in fp32
constexpr float kMinU1 = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

// The 64-bit seed as the two 32-bit key words.
struct Key {
  uint32_t k0, k1;
  explicit Key(int64_t seed)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu)),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
};

inline uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// uint32 -> [0, 1) as Triton's uint_to_uniform_float: bitcast to int32, ~x for negatives, scale.
inline float to_uniform(uint32_t u) {
  int32_t s = static_cast<int32_t>(u);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

// (c0, c1) of Philox4x32-10 on the counter (counter, 0, 0, 0).
inline void philox_c0c1(Key key, uint32_t counter, uint32_t& out0, uint32_t& out1) {
  uint32_t k0 = key.k0, k1 = key.k1;
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t n0 = mulhi(kRoundB, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi(kRoundA, c0) ^ c3 ^ k1;
    c1 = kRoundB * c2;
    c3 = kRoundA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out0 = c0;
  out1 = c1;
}

// ξ for one counter, with the C library's logf / cosf.
inline float randn_scalar(Key key, uint32_t counter) {
  uint32_t c0, c1;
  philox_c0c1(key, counter, c0, c1);
  const float u1 = std::fmax(kMinU1, to_uniform(c0));
  const float u2 = to_uniform(c1);
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(kTwoPi * u2);
}

// out[i] = ξ(counter + i mod 2^32), i < n.
inline void randn_fill_scalar(Key key, uint32_t counter, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = randn_scalar(key, counter + static_cast<uint32_t>(i));
}

}  // namespace philox
}  // namespace sparsevd
