// Builds the kernel table of kernels.h three times from one body: for AVX-512F, for AVX2+FMA (each
// inside a `#pragma GCC target` region, so the auto-vectorized loops and the intrinsics of
// simd/*.h use that ISA) and portable C++; kernels() picks one at run time with
// __builtin_cpu_supports. Only intrinsics, plain loops and <cmath> live inside the regions: every
// library function they call is defined outside, for the baseline ISA.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEVD_X86 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "simd/compress8.h"
#include "simd/transpose8.h"

// The SIMD builds need GCC or Clang (target pragmas, __builtin_cpu_supports) on x86-64; elsewhere
// only the portable build exists.
#if defined(SPARSEVD_X86) && !defined(__GNUC__)
#undef SPARSEVD_X86
#endif

namespace sparsevd {
namespace cpu {

#ifdef SPARSEVD_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
#include "simd/isa_avx512.h"
constexpr int kRandnGroups = 3;  // 3 x 16 lanes in flight: 24 zmm of Philox state
#include "simd/vec_math.h"
#include "simd/philox_vec.h"
#include "kernels_body.h"
#include "simd/kl_vec.h"
#include "simd/sigma2_vec.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "simd/isa_avx2.h"
constexpr int kRandnGroups = 2;  // 2 x 8 lanes: 8 ymm of Philox state
#include "simd/vec_math.h"
#include "simd/philox_vec.h"
#include "kernels_body.h"
#include "simd/kl_vec.h"
#include "simd/sigma2_vec.h"
}  // namespace avx2
#pragma GCC pop_options
#endif  // SPARSEVD_X86

namespace scalar {
inline void randn_fill(philox::Key key, uint32_t counter, float* out, int64_t n) {
  philox::randn_fill_scalar(key, counter, out, n);
}
#include "kernels_body.h"
inline KlPartial kl_f32(const float* w, const float* ls2, float* gw, float* gls2, int64_t n, const float* thr) {
  return kl_libm<float>(w, ls2, gw, gls2, n, thr);
}
inline void sigma2_f32(const float* w, const float* ls2, float thr, float* wm, float* s2, uint8_t* state,
                       int64_t n) {
  sigma2_libm<float>(w, ls2, thr, wm, s2, state, n);
}
}  // namespace scalar

namespace {

const Kernels kScalar = scalar::make_kernels("scalar");

// The SIMD tables are built on first use, after the CPU check: make_kernels is compiled for its ISA,
// so running it at load time (a namespace-scope constant) would execute AVX-512 instructions on a
// CPU without them and kill the process with SIGILL on `import sparsevd`.
const Kernels* lookup(const std::string& isa) {
#ifdef SPARSEVD_X86
  if (isa == "avx512") {
    if (!__builtin_cpu_supports("avx512f")) return nullptr;
    static const Kernels k = avx512::make_kernels("avx512");
    return &k;
  }
  if (isa == "avx2") {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return nullptr;
    static const Kernels k = avx2::make_kernels("avx2");
    return &k;
  }
#endif
  if (isa == "scalar") return &kScalar;
  if (isa == "auto") {
    for (const char* name : {"avx512", "avx2", "scalar"})
      if (const Kernels* k = lookup(name)) return k;
  }
  return nullptr;
}

const Kernels* initial() {
  const char* env = std::getenv("SPARSEVD_CPU_ISA");  // e.g. avx2 on an AVX-512 machine, for tests
  if (env != nullptr && *env != '\0') {
    if (const Kernels* k = lookup(env)) return k;
  }
  return lookup("auto");
}

std::atomic<const Kernels*> g_kernels{nullptr};

}  // namespace

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = initial();
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

bool isa_supported(const std::string& isa) { return lookup(isa) != nullptr; }

std::string set_isa(const std::string& isa) {
  const Kernels* k = lookup(isa);
  if (k == nullptr)
    throw std::invalid_argument("isa: expected one of auto, avx512, avx2, scalar supported by this CPU, got '" +
                                isa + "'");
  const std::string previous = kernels().isa;
  g_kernels.store(k, std::memory_order_release);
  return previous;
}

}  // namespace cpu
}  // namespace sparsevd
