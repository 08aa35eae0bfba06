// The lane-compression table of the ISA wrappers' V::compress_lanes (simd/isa_avx2.h,
// simd/isa_avx512.h), shared by every file that includes them.
#pragma once

#include <cstdint>

namespace sparsevd {
namespace cpu {

// For V::compress_lanes: for each 8-bit mask b, the positions of its set bits in increasing order,
// one per byte of lanes[b] (the rest 0), and how many there are.
struct Compress8 {
  uint64_t lanes[256];
  uint8_t count[256];
};
constexpr Compress8 make_compress8() {
  Compress8 t{};
  for (int b = 0; b < 256; ++b) {
    int k = 0;
    for (int j = 0; j < 8; ++j)
      if (b >> j & 1) t.lanes[b] |= static_cast<uint64_t>(j) << (8 * k++);
    t.count[b] = static_cast<uint8_t>(k);
  }
  return t;
}
inline constexpr Compress8 kCompress8 = make_compress8();

}  // namespace cpu
}  // namespace sparsevd
