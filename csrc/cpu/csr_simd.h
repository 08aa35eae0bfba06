// Runtime switch of the CPU kernels' instruction set (AVX2+FMA fp32 kernels or portable C++).
#pragma once

namespace sparsevd {
namespace cpu {

bool simd_available();                 // the CPU runs AVX2 and FMA (and the build is x86-64)
bool simd_enabled();                   // available and not switched off
bool set_simd_enabled(bool enabled);   // returns the previous setting

}  // namespace cpu
}  // namespace sparsevd
