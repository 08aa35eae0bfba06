// sparsevd::csr_linear on the CPU: y (M, N) = x (M, K) W^T + b, W (N, K) stored as CSR.
//
// Two kernels, both parallel with OpenMP (torch's own libgomp, at::get_num_threads() threads) over
// row ranges balanced by nnz + rows:
//
// * M == 1, SpMV: y[r] = b[r] + sum_{j in row r} v_j x[c_j]. fp32 with AVX2: 8 nonzeros at a time,
//   column indices widened from int16/int32, x gathered (vgatherdps), two accumulators.
// * M > 1, tiled SpMM: x is packed, transposed, into tiles xp[t] of shape (K, TM), TM batch rows per
//   tile (zero padded; TM = 8 or 16 for M <= 8 or 16, else 32, or 16 when a (K, 32) tile would
//   fill more than half of L2). For every tile and row r of W, acc[TM] = sum_j v_j xp[t][c_j, :]:
//   each nonzero is one broadcast and TM/8 contiguous fused multiply-adds over the batch (an
//   axpy), with the accumulators in registers (U nonzeros in flight for TM/8 * U independent FMA
//   chains). Results of 16 rows are staged in a small buffer and written to y transposed, 16
//   contiguous outputs per batch row, with the bias. fp32 packs x and writes y with 8x8 AVX2
//   register transposes.
//
// fp64 and int64 column indices run the same algorithms in portable C++ (the compiler vectorizes
// the TM loop); fp16/bf16 are computed in fp32 and rounded once at the end.
//
// Costs (nnz nonzeros, 4-byte values, 2-byte indices): SpMV reads nnz*6 + 4*(K + N + N) bytes, does
// 2*nnz FLOPs. SpMM reads x once (4*M*K), writes and re-reads the packed copy, streams the CSR once
// per tile (ceil(M/TM) * 6*nnz) and does 2*nnz*M FLOPs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEVD_X86 1
#endif

#include "../csr_checks.h"
#include "csr_simd.h"

namespace sparsevd {
namespace cpu {

namespace {
std::atomic<bool> g_simd_on{true};
}  // namespace

bool simd_available() {
#ifdef SPARSEVD_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool simd_enabled() { return simd_available() && g_simd_on.load(); }

bool set_simd_enabled(bool enabled) { return g_simd_on.exchange(enabled); }

namespace {

constexpr int kRowBlock = 16;             // rows staged per transposed write into y
constexpr int64_t kMinParallelWork = 32768;  // nnz * M below which one thread is faster
constexpr int64_t kPackBlock = 256;       // K-block of the packing transpose

// Boundaries of at most `parts` row ranges of about equal cost nnz + rows (crow[r] + r is strictly
// increasing, so a binary search finds each boundary).
template <typename C>
std::vector<int64_t> row_parts(const C* crow, int64_t n, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, n));
  std::vector<int64_t> b(parts + 1, 0);
  const int64_t total = static_cast<int64_t>(crow[n]) + n;
  int64_t r = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    int64_t lo = r, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(crow[mid]) + mid < target) lo = mid + 1; else hi = mid;
    }
    r = lo;
    b[p] = r;
  }
  b[parts] = n;
  return b;
}

// ------------------------------------------------------------------------------ portable kernels
template <typename T, typename I, typename C>
void spmv_generic(const T* x, const C* crow, const I* col, const T* val, const T* bias, T* y,
                  int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = crow[r];
    const int64_t e = crow[r + 1];
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (; j + 4 <= e; j += 4) {
      a0 += val[j] * x[col[j]];
      a1 += val[j + 1] * x[col[j + 1]];
      a2 += val[j + 2] * x[col[j + 2]];
      a3 += val[j + 3] * x[col[j + 3]];
    }
    for (; j < e; ++j) a0 += val[j] * x[col[j]];
    T s = (a0 + a1) + (a2 + a3);
    if (bias) s += bias[r];
    y[r] = s;
  }
}

// Writes nr staged rows (buf[rr * TM + i]) of one tile into y: y[i, rr] = buf[rr, i] + b[rr].
template <typename T>
inline void flush_rows(const T* buf, int nr, int tm, int64_t mt, T* y, int64_t ldy, const T* b) {
  for (int64_t i = 0; i < mt; ++i) {
    T* yr = y + i * ldy;
    if (b) {
      for (int rr = 0; rr < nr; ++rr) yr[rr] = buf[rr * tm + i] + b[rr];
    } else {
      for (int rr = 0; rr < nr; ++rr) yr[rr] = buf[rr * tm + i];
    }
  }
}

// acc[0:TM] = sum_{j in [j, e)} v_j * xp[c_j, 0:TM]
template <typename T, int TM, typename I>
inline void row_tile_generic(const T* xp, const I* col, const T* val, int64_t j, int64_t e, T* out) {
  T acc[TM];
  for (int i = 0; i < TM; ++i) acc[i] = 0;
  for (; j < e; ++j) {
    const T v = val[j];
    const T* p = xp + static_cast<int64_t>(col[j]) * TM;  // [TM]
#pragma omp simd
    for (int i = 0; i < TM; ++i) acc[i] += v * p[i];
  }
  for (int i = 0; i < TM; ++i) out[i] = acc[i];
}

template <typename T, int TM, typename I, typename C>
void spmm_part_generic(const T* xpt, const C* crow, const I* col, const T* val, const T* bias, T* y,
                       int64_t ldy, int64_t mt, int64_t r0, int64_t r1) {
  alignas(64) T buf[kRowBlock * TM];
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, r1 - rb));
    for (int rr = 0; rr < nr; ++rr) {
      row_tile_generic<T, TM>(xpt, col, val, crow[rb + rr], crow[rb + rr + 1], buf + rr * TM);
    }
    flush_rows(buf, nr, TM, mt, y + rb, ldy, bias ? bias + rb : nullptr);
  }
}

// ------------------------------------------------------------------------ AVX2 + FMA fp32 kernels
#ifdef SPARSEVD_X86
#define SVD_AVX2 __attribute__((target("avx2,fma")))

SVD_AVX2 inline __m256i load_idx8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SVD_AVX2 inline __m256i load_idx8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

SVD_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// In-register 8x8 transpose: r[i][j] -> r[j][i].
SVD_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// flush_rows for fp32 with 8x8 register transposes: y[i, rr] = buf[rr, i] + b[rr].
SVD_AVX2 inline void flush_rows_avx2(const float* buf, int nr, int tm, int64_t mt, float* y, int64_t ldy,
                                     const float* b) {
  if (mt != tm || nr % 8 != 0) {
    flush_rows(buf, nr, tm, mt, y, ldy, b);
    return;
  }
  for (int r0 = 0; r0 < nr; r0 += 8) {
    const __m256 bias = b ? _mm256_loadu_ps(b + r0) : _mm256_setzero_ps();
    for (int i0 = 0; i0 < tm; i0 += 8) {
      __m256 r[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(buf + (r0 + q) * tm + i0);
      transpose8(r);  // r[c] = buf[r0 .. r0+8, i0 + c]
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + (i0 + c) * ldy + r0, _mm256_add_ps(r[c], bias));
    }
  }
}

// One block of pack_block for fp32 rows with unit stride: 8x8 blocks transposed in registers.
SVD_AVX2 void pack_block_avx2(const float* x, int64_t M, int64_t K, int64_t sxm, int tm, float* xp, int64_t t,
                              int64_t kb) {
  const int64_t k0 = kb * kPackBlock, k1 = std::min(K, k0 + kPackBlock);
  float* dst = xp + t * K * tm;
  for (int i0 = 0; i0 < tm; i0 += 8) {
    const float* src[8];
    bool full = true;
    for (int q = 0; q < 8; ++q) {
      const int64_t m = t * tm + i0 + q;
      src[q] = m < M ? x + m * sxm : nullptr;
      full = full && m < M;
    }
    int64_t k = k0;
    if (full) {
      for (; k + 8 <= k1; k += 8) {
        __m256 r[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src[q] + k);
        transpose8(r);  // r[c] = x[m0 .. m0+8, k + c]
        for (int c = 0; c < 8; ++c) _mm256_store_ps(dst + (k + c) * tm + i0, r[c]);
      }
    }
    for (; k < k1; ++k) {
      for (int q = 0; q < 8; ++q) dst[k * tm + i0 + q] = src[q] ? src[q][k] : 0.f;
    }
  }
}

template <typename I, typename C>
SVD_AVX2 void spmv_avx2(const float* x, const C* crow, const I* col, const float* val,
                        const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = crow[r];
    const int64_t e = crow[r + 1];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= e; j += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + j), _mm256_i32gather_ps(x, load_idx8(col + j), 4), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + j + 8), _mm256_i32gather_ps(x, load_idx8(col + j + 8), 4),
                           a1);
    }
    if (j + 8 <= e) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + j), _mm256_i32gather_ps(x, load_idx8(col + j), 4), a0);
      j += 8;
    }
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; j < e; ++j) s += val[j] * x[col[j]];
    if (bias) s += bias[r];
    y[r] = s;
  }
}

// acc[0:8V] = sum_j v_j * xp[c_j, 0:8V]; U nonzeros per step, V vectors of 8 floats per nonzero.
template <int V, int U, typename I>
SVD_AVX2 inline void row_tile_avx2(const float* xp, const I* col, const float* val, int64_t j, int64_t e,
                                   float* out) {
  constexpr int TM = 8 * V;
  __m256 acc[U][V];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[u][v] = _mm256_setzero_ps();
  }
  for (; j + U <= e; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const float* p = xp + static_cast<int64_t>(col[j + u]) * TM;  // [TM], 32-byte aligned
      const __m256 w = _mm256_broadcast_ss(val + j + u);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(w, _mm256_load_ps(p + 8 * v), acc[u][v]);
    }
  }
  for (; j < e; ++j) {
    const float* p = xp + static_cast<int64_t>(col[j]) * TM;
    const __m256 w = _mm256_broadcast_ss(val + j);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(w, _mm256_load_ps(p + 8 * v), acc[0][v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    __m256 s = acc[0][v];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][v]);
    _mm256_store_ps(out + 8 * v, s);
  }
}

template <int V, int U, typename I, typename C>
SVD_AVX2 void spmm_part_avx2(const float* xpt, const C* crow, const I* col, const float* val,
                             const float* bias, float* y, int64_t ldy, int64_t mt, int64_t r0, int64_t r1) {
  constexpr int TM = 8 * V;
  alignas(64) float buf[kRowBlock * TM];
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, r1 - rb));
    for (int rr = 0; rr < nr; ++rr) {
      row_tile_avx2<V, U>(xpt, col, val, crow[rb + rr], crow[rb + rr + 1], buf + rr * TM);
    }
    flush_rows_avx2(buf, nr, TM, mt, y + rb, ldy, bias ? bias + rb : nullptr);
  }
}
#endif  // SPARSEVD_X86

// ------------------------------------------------------------------------------------ drivers
// xp[t][k][i] = x[t*TM + i, k] (zero for t*TM + i >= M) for k in K-block kb of tile t; xp holds
// ceil(M/TM) tiles of (K, TM).
template <typename T>
void pack_block(const T* x, int64_t M, int64_t K, int64_t sxm, int64_t sxk, int tm, T* xp, int64_t t,
                int64_t kb) {
  const int64_t k0 = kb * kPackBlock, k1 = std::min(K, k0 + kPackBlock);
  T* dst = xp + t * K * tm;
  for (int i = 0; i < tm; ++i) {
    const int64_t m = t * tm + i;
    if (m < M) {
      const T* src = x + m * sxm;
      if (sxk == 1) {
        for (int64_t k = k0; k < k1; ++k) dst[k * tm + i] = src[k];
      } else {
        for (int64_t k = k0; k < k1; ++k) dst[k * tm + i] = src[k * sxk];
      }
    } else {
      for (int64_t k = k0; k < k1; ++k) dst[k * tm + i] = T(0);
    }
  }
}

// Per-core L2 bytes (sysconf where glibc knows it, else 512 KiB).
int64_t l2_bytes() {
  static const int64_t v = [] {
    int64_t b = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    b = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return b > 0 ? b : int64_t(512) * 1024;
  }();
  return v;
}

// Batch-tile width TM: 8 or 16 for small batches; else 32 when a packed tile (K, 32) fills at
// most half of L2 (the other half streams the CSR), else 16 (K = 4096 fp32: 16, 5-8 % faster).
// Env SPARSEVD_CSR_TILE (8, 16, 32 or 64) overrides, for tuning.
int choose_tile(int64_t M, int64_t K, int64_t elem_bytes, bool simd) {
  static const int forced = [] {
    const char* s = std::getenv("SPARSEVD_CSR_TILE");
    const int v = s ? std::atoi(s) : 0;
    return (v == 8 || v == 16 || v == 32 || v == 64) ? v : 0;
  }();
  if (forced) return simd ? forced : std::min(forced, 32);
  if (M <= 8) return 8;
  if (M <= 16) return 16;
  return K * 32 * elem_bytes <= l2_bytes() / 2 ? 32 : 16;
}

template <typename T, typename I, typename C>
void csr_linear_kernel(const T* x, int64_t M, int64_t K, int64_t sxm, int64_t sxk, const C* crow,
                       const I* col, const T* val, const T* bias, T* y, int64_t N) {
  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t nnz = static_cast<int64_t>(crow[N]);
  const bool parallel = nthreads > 1 && nnz * M >= kMinParallelWork;
  constexpr bool kSimdTypes = std::is_same<T, float>::value && !std::is_same<I, int64_t>::value;
  const bool simd = kSimdTypes && simd_enabled();

  if (M == 1) {
    std::vector<T> xbuf;
    const T* xv = x;
    if (sxk != 1) {
      xbuf.resize(K);
      for (int64_t k = 0; k < K; ++k) xbuf[k] = x[k * sxk];
      xv = xbuf.data();
    }
    const auto parts = row_parts(crow, N, parallel ? int64_t(nthreads) * 8 : 1);
    const int64_t P = static_cast<int64_t>(parts.size()) - 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
    for (int64_t p = 0; p < P; ++p) {
#ifdef SPARSEVD_X86
      if constexpr (kSimdTypes) {
        if (simd) {
          spmv_avx2(xv, crow, col, val, bias, y, parts[p], parts[p + 1]);
          continue;
        }
      }
#endif
      spmv_generic(xv, crow, col, val, bias, y, parts[p], parts[p + 1]);
    }
    return;
  }

  const int tm = choose_tile(M, K, static_cast<int64_t>(sizeof(T)), simd);
  const int64_t nt = (M + tm - 1) / tm;
  at::Tensor xp_t = at::empty({nt * K * tm}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* xp = xp_t.data_ptr<T>();
  const int64_t nkb = (K + kPackBlock - 1) / kPackBlock;
  const auto parts = row_parts(crow, N, parallel ? int64_t(nthreads) * 4 : 1);
  const int64_t P = static_cast<int64_t>(parts.size()) - 1;
  // One parallel region (one fork/join): pack the tiles, barrier, then the tiles x row parts.
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t kb = 0; kb < nkb; ++kb) {
#ifdef SPARSEVD_X86
        if constexpr (kSimdTypes) {
          if (simd && sxk == 1) {
            pack_block_avx2(x, M, K, sxm, tm, xp, t, kb);
            continue;
          }
        }
#endif
        pack_block(x, M, K, sxm, sxk, tm, xp, t, kb);
      }
    }
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t p = 0; p < P; ++p) {
        const T* xpt = xp + t * K * tm;
        T* yt = y + t * tm * N;
        const int64_t mt = std::min<int64_t>(tm, M - t * tm);
        const int64_t r0 = parts[p], r1 = parts[p + 1];
#ifdef SPARSEVD_X86
        if constexpr (kSimdTypes) {
          if (simd) {
            switch (tm) {
              case 8: spmm_part_avx2<1, 8>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
              case 16: spmm_part_avx2<2, 2>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
              case 32: spmm_part_avx2<4, 2>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
              default: spmm_part_avx2<8, 1>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
            }
            continue;
          }
        }
#endif
        switch (tm) {
          case 8: spmm_part_generic<T, 8>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
          case 16: spmm_part_generic<T, 16>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
          default: spmm_part_generic<T, 32>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); break;
        }
      }
    }
  }
}

template <typename F>
void dispatch_indices(const at::Tensor& crow, const at::Tensor& col, F&& f) {
  auto with_col = [&](auto* crow_ptr) {
    switch (col.scalar_type()) {
      case at::kShort: f(crow_ptr, col.data_ptr<int16_t>()); break;
      case at::kInt: f(crow_ptr, col.data_ptr<int32_t>()); break;
      default: f(crow_ptr, col.data_ptr<int64_t>()); break;
    }
  };
  if (crow.scalar_type() == at::kInt) with_col(crow.data_ptr<int32_t>());
  else with_col(crow.data_ptr<int64_t>());
}

template <typename C>
int64_t crow_at(const at::Tensor& crow, int64_t i) {
  return static_cast<int64_t>(crow.data_ptr<C>()[i]);
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_csr_linear_args(x, crow_indices, col_indices, values, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto st = values.scalar_type();
  if (st == at::kHalf || st == at::kBFloat16) {  // fp32 compute, one rounding at the end
    c10::optional<at::Tensor> b32;
    if (has_bias) b32 = bias->to(at::kFloat);
    return csr_linear_cpu(x.to(at::kFloat), crow_indices, col_indices, values.to(at::kFloat), b32).to(st);
  }
  const int64_t K = x.size(-1);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);

  const at::Tensor crow = crow_indices.contiguous();
  const at::Tensor col = col_indices.contiguous();
  const at::Tensor val = values.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t nnz = col.numel();
  const int64_t first = crow.scalar_type() == at::kInt ? crow_at<int32_t>(crow, 0) : crow_at<int64_t>(crow, 0);
  const int64_t last = crow.scalar_type() == at::kInt ? crow_at<int32_t>(crow, N) : crow_at<int64_t>(crow, N);
  TORCH_CHECK(first == 0 && last == nnz, "csr_linear: crow_indices must start at 0 and end at nnz = ", nnz,
              ", got ", first, " and ", last);
  if (nnz == 0 || K == 0) {
    if (has_bias) y.copy_(b.unsqueeze(0).expand({M, N})); else y.zero_();
    return y.view(out_shape);
  }
  AT_DISPATCH_FLOATING_TYPES(st, "csr_linear_cpu", [&] {
    dispatch_indices(crow, col, [&](auto* crow_ptr, auto* col_ptr) {
      csr_linear_kernel<scalar_t>(x2.data_ptr<scalar_t>(), M, K, x2.stride(0), x2.stride(1), crow_ptr, col_ptr,
                                  val.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr,
                                  y.data_ptr<scalar_t>(), N);
    });
  });
  return y.view(out_shape);
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("csr_linear", &sparsevd::cpu::csr_linear_cpu); }
