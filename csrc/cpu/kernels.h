// The per-chunk CPU kernels of the native backend, behind a table of function pointers chosen at
// run time for the CPU: AVX-512F, AVX2+FMA or portable C++ (kernels.cpp compiles one body,
// kernels_body.h, three times). The ops (lrt_linear_cpu.cpp, lrt_conv2d_cpu.cpp and lrt_common_cpu.cpp, kl_cpu.cpp,
// noise_cpu.cpp) do the argument
// checks, the GEMMs / convolutions and the threading, and call these on contiguous raw pointers.
#pragma once

#include <cstdint>
#include <string>

#include "philox.h"

namespace sparsevd {
namespace cpu {

struct KlPartial {
  double sum;      // Σ KL over the chunk
  bool nonfinite;  // some θ or log σ² of the chunk is NaN or ±inf
  int64_t kept;    // weights of the chunk kept at evaluation (counted when asked; see kl_cpu.cpp)
};

// log of the largest finite T: log σ² at or above it (or NaN) counts as kept, as e^{log σ²} = inf
// makes σ²·0 NaN in the σ² pass of sparsevd.functional.kept_count (the kernels' non-finite rule).
template <typename T>
constexpr T kLogMax = static_cast<T>(88.72283935546875);
template <>
constexpr double kLogMax<double> = 709.782712893384;

// T = float or double. All pointers address n contiguous elements unless stated otherwise.
template <typename T>
struct ElementwiseKernels {
  // The LRT kernels see the output (y, std, g, ...) as a row-major (outer, C, inner) array with the
  // bias along C: (M, N, 1) for the linear layer, (B, C_out, H_out W_out) for the convolution. A
  // call covers the n contiguous elements from flat index `first` on; element first + i has the
  // noise counter (first + i) mod 2^32 and the bias / bias-gradient slot ((first + i) / inner) % C.
  //
  // Forward epilogue: std = sqrt(s² + 1e-8) (in place of s²), y = (μ + b) + std·ξ (in place of μ);
  // bias may be nullptr.
  void (*lrt_forward)(T* mu_y, T* s2_std, const T* bias, int64_t C, int64_t inner, int64_t first,
                      philox::Key key, int64_t n);
  // Backward prologue: g_s2 = g·ξ / (2·std); when gb != nullptr also gb[c] += g (fp64 sums).
  void (*lrt_backward_gs2)(const T* g, const T* std, T* gs2, double* gb, int64_t C, int64_t inner,
                           int64_t first, philox::Key key, int64_t n);
  // σ² pass of the LRT ops (lrt_common.h, "σ² pass"): s2 = exp(ls2). With train-time clipping
  // (state != nullptr) also, per weight, the mask of sparsevd.ops.weights.clip_mask,
  //   m = [clamp(ls2 − log(w·w + 1e-8), −10, 10) < thr]   (w·w and + 1e-8 rounded separately, as
  //   torch's two ops; NaN log α → m = 0; thr is the threshold rounded to T, as torch rounds a
  //   scalar for a comparison with a T tensor),
  // and wm = w·m, s2 = exp(ls2)·m (NaN·0 and inf·0 stay NaN, as in the reference), state = 1 where
  // m = 1, 2 where m = 0 but wm or s2 is not 0 (a non-finite weight: it still occupies its row and
  // column), 0 where the weight is dropped. Without clipping w, wm and state are nullptr and thr unused.
  void (*sigma2)(const T* w, const T* ls2, T thr, T* wm, T* s2, uint8_t* state, int64_t n);
  // Clipped weight-gradient epilogue: gw = gw·[state == 1] (∂θ ⊙ m), t3 = t3·s2m (∂log σ² = σ²m ⊙ T3).
  void (*clip_grads)(T* gw, T* t3, const uint8_t* state, const T* s2m, int64_t n);
  void (*add_2x_mul)(T* acc, const T* x, const T* t, int64_t n);  // acc = acc + (2x)·t
  void (*mul_inplace)(T* a, const T* b, int64_t n);                 // a = a·b
  void (*square)(const T* x, T* out, int64_t n);                    // out = x·x
  // dst (cols, ld) = src (rows, cols)ᵀ, both row-major, for the rows [c0, c1) of dst, whose
  // columns [rows, ld) are set to 0 (ld ≥ rows).
  void (*transpose)(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld, int64_t c0, int64_t c1);
  // Weight gradients of the clipped linear backward on the CSR of the kept weights (lrt_common.h,
  // "sparse products"): for the rows r in [r0, r1) of θ, rows r of gw and t3 (N, K) are written
  // whole, 0 except at the CSR entries j in [crow[r], crow[r + 1]), where with c = col[j]
  //   gw[r, c] = (Σ_b gT[r, b] xT[c, b]) · keep[j],   t3[r, c] = (Σ_b gs2T[r, b] (xT[c, b])²) · s2[j]
  // (∂θ ⊙ m and ∂log σ² = σ²m ⊙ (g_s2ᵀ x2) at the kept weights only); gT, gs2T (N, ld) and xT (K, ld)
  // row-major: g, g_s2 and x (M rows) transposed, each row zero padded from M to ld, a multiple of 8.
  void (*clip_sddmm)(const T* gT, const T* gs2T, const T* xT, int64_t ld, int64_t K, const int64_t* crow,
                     const int32_t* col, const uint8_t* keep, const T* s2, T* gw, T* t3, int64_t r0, int64_t r1);
  // Sparse-VD KL of n weights (eq. 14) and, when gw != nullptr, its gradients (see kl_cpu.cpp);
  // when thr != nullptr also the number of weights kept at evaluation, [log α < *thr] or θ not
  // finite or log σ² not below kLogMax<T> (NaN, +inf, e^{log σ²} = inf): KlPartial::kept.
  KlPartial (*kl)(const T* w, const T* ls2, T* gw, T* gls2, int64_t n, const T* thr);
};

struct Kernels {
  const char* isa;  // "avx512", "avx2" or "scalar"
  void (*randn)(philox::Key key, uint32_t counter, float* out, int64_t n);  // out[i] = ξ(counter + i)
  ElementwiseKernels<float> f32;
  ElementwiseKernels<double> f64;
};

// The kernels in use: the best this CPU supports, unless SPARSEVD_CPU_ISA (read once) or set_isa()
// asked for a lower one.
const Kernels& kernels();
template <typename T>
const ElementwiseKernels<T>& elementwise();
template <>
inline const ElementwiseKernels<float>& elementwise<float>() { return kernels().f32; }
template <>
inline const ElementwiseKernels<double>& elementwise<double>() { return kernels().f64; }

// Use the kernels of `isa` ("avx512", "avx2", "scalar" or "auto" = best); throws if this CPU lacks
// it. Returns the previous choice. For tests and benchmarks.
std::string set_isa(const std::string& isa);
bool isa_supported(const std::string& isa);

}  // namespace cpu
}  // namespace sparsevd
