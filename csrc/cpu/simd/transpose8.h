// In-register 8x8 transpose of fp32, shared by the backward's transposes (kernels_body.h) and the
// SpMM's packing and flushing (csr_linear_cpu.cpp). Written with GCC's generic vector shuffles, so
// it takes any 8-float vector type (__m256, or a vector_size(32) typedef) and compiles to the ISA
// of its caller once inlined: under AVX2 the shuffles become vunpcklps/vunpckhps, vshufps and
// vperm2f128 (the classic 24-shuffle network); under the portable build GCC lowers them to SSE.
#pragma once

#include <cstdint>

namespace sparsevd {
namespace cpu {

// r[i][j] -> r[j][i] for i, j in [0, 8).
template <typename V8>
__attribute__((always_inline)) inline void transpose8x8(V8 r[8]) {
  static_assert(sizeof(V8) == 32, "transpose8x8 takes vectors of 8 floats");
  typedef int32_t I8 __attribute__((vector_size(32)));
  V8 t[8];
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved, per 128-bit half
    t[i] = __builtin_shuffle(r[i], r[i + 1], I8{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], I8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  V8 u[8];
  for (int i = 0; i < 8; i += 4) {  // then quadruples: u[i + j] holds column j (and j + 4) of rows i .. i + 4
    u[i] = __builtin_shuffle(t[i], t[i + 2], I8{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], I8{2, 3, 10, 11, 6, 7, 14, 15});
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], I8{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], I8{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit halves of rows 0 .. 4 and 4 .. 8 joined
    r[j] = __builtin_shuffle(u[j], u[j + 4], I8{0, 1, 2, 3, 8, 9, 10, 11});
    r[j + 4] = __builtin_shuffle(u[j], u[j + 4], I8{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

}  // namespace cpu
}  // namespace sparsevd
