// sparsevd::csr_linear on the CPU: y (M, N) = x (M, K) W^T + b, W (N, K) stored as CSR.
//
// Two kernels, both parallel with OpenMP (torch's own libgomp, at::get_num_threads() threads) over
// row ranges balanced by nnz + rows (the SpMM: as many whole batch tiles per thread as divide
// evenly first, each packed and run by one thread, then the rest over row ranges):
//
// * M == 1, SpMV: y[r] = b[r] + sum_{j in row r} v_j x[c_j]. fp32 with AVX2: 8 nonzeros at a time,
//   column indices widened from 16-bit (uint16, or int16) or int32, x gathered (vgatherdps), two accumulators; the last
//   < 8 nonzeros of a row as one masked step (not one scalar step each: 4-20 % faster at 90-99 %).
// * M > 1, tiled SpMM: x is packed, transposed, into tiles xp[t] of shape (K, TM), TM batch rows per
//   tile (zero padded; TM = 8 or 16 for M <= 8 or 16, else 32, or 16 when a (K, 32) tile would
//   fill more than half of L2). Tile by tile (each packed just before it is used, so it is in L2,
//   into a buffer the previous tile of the same thread used, so over lines still in L2), for
//   every row r of W, acc[TM] = sum_j v_j xp[t][c_j, :]: each nonzero is one broadcast and
//   TM/8 (AVX2) or TM/16 (AVX-512) contiguous fused multiply-adds over the batch (an axpy), with
//   the accumulators in registers (U nonzeros in flight for independent FMA chains). Results of 16
//   rows are staged in a small buffer and written to y transposed, 16 contiguous outputs per batch
//   row, with the bias. fp32 packs x and writes y with 8x8 (AVX2) or 16x16 (AVX-512) register
//   transposes. The tiles of 16 batch rows or more run with 512-bit vectors where the CPU has
//   AVX-512F (TM = 8 stays AVX2).
//
// fp64 and int64 column indices run the same algorithms in portable C++ (the compiler vectorizes
// the TM loop); fp16/bf16 are computed in fp32 and rounded once at the end.
//
// Memory safety: the kernels never read outside x, col or values, whatever the index data (the
// tensors may have been edited after any Python-side check, e.g. through .data or numpy views).
// Row pointers: crow[0] = 0, crow[N] = nnz and crow[r] <= crow[r+1] (one O(N) pass before the
// kernels), so every row range [crow[r], crow[r+1]) lies in [0, nnz). Column indices: the SpMV
// gathers with a mask of the lanes whose index is in [0, K) (no access for the others) and checks
// its scalar tails; the SpMM checks every index once in a vectorized pass over col before the
// tiles (unsigned max < K), not in the loop of each tile. A bad index raises an error naming it
// (flags set inside the OpenMP regions, TORCH_CHECK after them).
//
// Non-finite inputs: y is what the dense product with the zero-filled W gives in IEEE arithmetic,
// where 0 * inf = 0 * NaN = NaN. The CSR sum skips the zeros, so for a batch row b with n_b > 0
// non-finite values, y[b, r] is NaN when fewer than n_b of row r's nonzeros read one (a zero weight
// meets a non-finite input), else the CSR sum (which already propagates v * inf and v * NaN).
// n_b is counted by a vectorized bit test of x (M == 1) or flagged while x is packed (M > 1, one
// FMA with 0 per 8 values, exact count only for flagged rows); the fix-up (rare) is scalar, one
// pass over W for up to 64 such rows.
//
// Costs (nnz nonzeros, 4-byte values, 2-byte indices): SpMV reads nnz*6 + 4*(K + N + N) bytes, does
// 2*nnz FLOPs. SpMM reads x once (4*M*K), writes and re-reads the packed copy, streams the CSR once
// per tile (ceil(M/TM) * 6*nnz) plus col once for its check, and does 2*nnz*M FLOPs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEVD_X86 1
#endif

#include "../csr_linear_checks.h"
#include "csr_linear_cpu.h"
#include "denormals.h"
#include "simd/compress8.h"
#include "simd/transpose8.h"

namespace sparsevd {
namespace cpu {

namespace {
// The highest level this CPU runs: 2 AVX-512F, 1 AVX2+FMA, 0 neither (or not x86-64).
int max_simd_level() {
#ifdef SPARSEVD_X86
  static const int level = !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 0
                           : __builtin_cpu_supports("avx512f")                                ? 2
                                                                                               : 1;
  return level;
#else
  return 0;
#endif
}
std::atomic<int> g_simd_level{max_simd_level()};

bool avx512_enabled() { return g_simd_level.load(std::memory_order_relaxed) >= 2; }
}  // namespace

bool simd_enabled() { return g_simd_level.load(std::memory_order_relaxed) >= 1; }

int set_simd_level(int level) { return g_simd_level.exchange(std::clamp(level, 0, max_simd_level())); }

namespace {

constexpr int kRowBlock = 16;             // rows staged per transposed write into y
constexpr int64_t kMinParallelWork = 32768;  // nnz * M below which one thread is faster
constexpr int64_t kPackBlock = 256;       // K-block of the packing transpose
constexpr int64_t kColChunk = 65536;      // column indices per task of the check before the SpMM

#ifdef SPARSEVD_X86
#define SVD_AVX2 __attribute__((target("avx2,fma")))
#endif

// ------------------------------------------------------------------------------- index checks
// The unsigned view of an index: negative values become >= 2^63 (or >= 2^15 / 2^31 for the
// narrow types in the vector checks), so one unsigned compare tests 0 <= c < K.
template <typename I>
inline uint64_t as_unsigned(I c) {
  return static_cast<uint64_t>(static_cast<int64_t>(c));
}

// Whether crow[r] <= crow[r+1] for all r < n (an OR-reduction the compiler vectorizes).
template <typename C>
inline __attribute__((always_inline)) bool rows_ordered_impl(const C* crow, int64_t n) {
  unsigned bad = 0;
  for (int64_t r = 0; r < n; ++r) bad |= static_cast<unsigned>(crow[r] > crow[r + 1]);
  return bad == 0;
}

// max over j < n of the unsigned view of col[j] (int16 -> uint16, int32 -> uint32, int64 -> uint64;
// uint16 as it is): every index is in [0, K) iff it is < K (K <= 32768 for int16 indices, <= 65536
// for uint16).
template <typename I>
inline __attribute__((always_inline)) uint64_t col_umax_impl(const I* col, int64_t n) {
  using U = std::make_unsigned_t<I>;
  U m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, static_cast<U>(col[j]));
  return static_cast<uint64_t>(m);
}

#ifdef SPARSEVD_X86
template <typename C>
SVD_AVX2 bool rows_ordered_avx2(const C* crow, int64_t n) { return rows_ordered_impl(crow, n); }

// Whether every col[j], j in [b, e), is in [0, K): unsigned maxima of 16 (16-bit) or 8 (int32)
// indices per vector, two accumulators, the last vector ending at e (it may reread entries
// before b: column indices too). Needs e >= the vector width. 16-bit indices: uint16, or int16
// read as unsigned (a negative int16 reads as >= 32768 >= K: int16 is used only for K <= 32768).
template <typename I16>
SVD_AVX2 bool cols_ok16_avx2(const I16* col, int64_t b, int64_t e, int64_t K) {
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t j = b;
  for (; j + 32 <= e; j += 32) {
    m0 = _mm256_max_epu16(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j)));
    m1 = _mm256_max_epu16(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j + 16)));
  }
  if (j + 16 <= e) m0 = _mm256_max_epu16(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j)));
  if (j < e) m1 = _mm256_max_epu16(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + e - 16)));
  // K - 1 <= 65535: its low 16 bits, compared unsigned
  const __m256i kmax = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(K - 1)));
  const __m256i m = _mm256_max_epu16(_mm256_max_epu16(m0, m1), kmax);
  return _mm256_movemask_epi8(_mm256_cmpeq_epi16(m, kmax)) == -1;
}
SVD_AVX2 bool cols_ok_avx2(const int16_t* col, int64_t b, int64_t e, int64_t K) {
  return cols_ok16_avx2(col, b, e, K);
}
SVD_AVX2 bool cols_ok_avx2(const uint16_t* col, int64_t b, int64_t e, int64_t K) {
  return cols_ok16_avx2(col, b, e, K);
}
SVD_AVX2 bool cols_ok_avx2(const int32_t* col, int64_t b, int64_t e, int64_t K) {
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t j = b;
  for (; j + 16 <= e; j += 16) {
    m0 = _mm256_max_epu32(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j)));
    m1 = _mm256_max_epu32(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j + 8)));
  }
  if (j + 8 <= e) m0 = _mm256_max_epu32(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j)));
  if (j < e) m1 = _mm256_max_epu32(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + e - 8)));
  const __m256i kmax = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(K - 1, INT32_MAX)));
  const __m256i m = _mm256_max_epu32(_mm256_max_epu32(m0, m1), kmax);
  return _mm256_movemask_epi8(_mm256_cmpeq_epi32(m, kmax)) == -1;
}
#endif

template <typename C>
bool rows_ordered(const C* crow, int64_t n, bool simd) {
#ifdef SPARSEVD_X86
  if (simd) return rows_ordered_avx2(crow, n);
#endif
  return rows_ordered_impl(crow, n);
}

// Whether every col[j], j in [b, e), is in [0, K).
template <typename I>
bool cols_in_range(const I* col, int64_t b, int64_t e, int64_t K, bool simd) {
  if (e <= b) return true;
#ifdef SPARSEVD_X86
  if constexpr (!std::is_same<I, int64_t>::value) {
    if (simd && e >= 32 / static_cast<int64_t>(sizeof(I))) return cols_ok_avx2(col, b, e, K);
  }
#endif
  return col_umax_impl(col + b, e - b) < static_cast<uint64_t>(K);
}

// The error for the first row pointer out of order (crow[0] = 0 and crow[N] = nnz hold).
template <typename C>
[[noreturn]] void fail_rows(const C* crow, int64_t n, int64_t nnz) {
  int64_t r = 0;
  while (r < n && crow[r] <= crow[r + 1]) ++r;
  const int64_t a = crow[r], b = crow[r + 1];
  TORCH_CHECK(a <= nnz, "csr_linear: crow_indices[", r, "] = ", a, " is outside [0, nnz=", nnz, "]");
  TORCH_CHECK(b >= 0, "csr_linear: crow_indices[", r + 1, "] = ", b, " is outside [0, nnz=", nnz, "]");
  TORCH_CHECK(false, "csr_linear: crow_indices must be non-decreasing, got crow_indices[", r, "] = ", a,
              " > crow_indices[", r + 1, "] = ", b);
  __builtin_unreachable();
}

// The error for the first column index outside [0, K).
template <typename I>
[[noreturn]] void fail_cols(const I* col, int64_t nnz, int64_t K) {
  int64_t j = 0;
  while (j < nnz && as_unsigned(col[j]) < static_cast<uint64_t>(K)) ++j;
  TORCH_CHECK(j == nnz, "csr_linear: col_indices[", j, "] = ", static_cast<int64_t>(col[j]),
              " is outside [0, in_features=", K, ")");
  TORCH_CHECK(false, "csr_linear: col_indices changed during the call (concurrent write?)");
  __builtin_unreachable();
}

// --------------------------------------------------------------------------- non-finite inputs
inline bool is_nonfinite(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7f800000u) == 0x7f800000u;  // exponent all ones: ±inf or NaN
}
inline bool is_nonfinite(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// Number of non-finite values among x[k * sxk], k < K.
template <typename T>
int64_t count_nonfinite(const T* x, int64_t K, int64_t sxk) {
  int64_t n = 0;
  if (sxk == 1) {
    for (int64_t k = 0; k < K; ++k) n += is_nonfinite(x[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) n += is_nonfinite(x[k * sxk]);
  }
  return n;
}

#ifdef SPARSEVD_X86
// count_nonfinite of K contiguous floats: 8 at a time, (bits & exp) == exp, counted per lane.
SVD_AVX2 int64_t count_nonfinite_avx2(const float* x, int64_t K) {
  const __m256i e = _mm256_set1_epi32(0x7f800000);
  __m256i acc = _mm256_setzero_si256();  // lane counts (subtracting the all-ones compare masks)
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    acc = _mm256_sub_epi32(acc, _mm256_cmpeq_epi32(_mm256_and_si256(v, e), e));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int64_t n = 0;
  for (int q = 0; q < 8; ++q) n += lanes[q];
  for (; k < K; ++k) n += is_nonfinite(x[k]);
  return n;
}
#endif

// Batch rows rows[i] (x[m, k] at x[m * sxm + k * sxk]) hold nb[i] > 0 non-finite values each:
// y[rows[i], r] becomes NaN where row r of W reads fewer than nb[i] of them (a zero weight of the
// dense W meets one; 0 * inf = NaN). Assumes the column indices of a row are distinct (to_csr
// writes them so); the indices are checked before. Up to 64 batch rows per pass over W:
// bits[k] has bit i set when x[rows[i], k] is non-finite, almost always 0, so a nonzero costs one
// load for all of them.
template <typename T, typename I, typename C>
void nan_fixup(const T* x, int64_t K, int64_t sxm, int64_t sxk, const std::vector<int64_t>& rows,
               const std::vector<int64_t>& nb, const C* crow, const I* col, T* y, int64_t N) {
  std::vector<uint64_t> bits(K);
  for (size_t i0 = 0; i0 < rows.size(); i0 += 64) {
    const int n = static_cast<int>(std::min<size_t>(64, rows.size() - i0));
    std::fill(bits.begin(), bits.end(), 0);
    for (int i = 0; i < n; ++i) {
      const T* xb = x + rows[i0 + i] * sxm;
      for (int64_t k = 0; k < K; ++k) {
        if (is_nonfinite(xb[k * sxk])) bits[k] |= uint64_t(1) << i;
      }
    }
    int64_t hits[64];
    for (int64_t r = 0; r < N; ++r) {
      std::fill_n(hits, n, 0);
      for (int64_t j = crow[r], e = crow[r + 1]; j < e; ++j) {
        for (uint64_t m = bits[static_cast<int64_t>(col[j])]; m != 0; m &= m - 1) ++hits[__builtin_ctzll(m)];
      }
      for (int i = 0; i < n; ++i) {
        if (hits[i] < nb[i0 + i]) y[rows[i0 + i] * N + r] = std::numeric_limits<T>::quiet_NaN();
      }
    }
  }
}

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
// Rows [r0, r1); returns false when some column index is outside [0, K) (those terms are skipped:
// x[0] is read in their place).
template <typename T, typename I, typename C>
bool spmv_generic(const T* x, int64_t K, const C* crow, const I* col, const T* val, const T* bias, T* y,
                  int64_t r0, int64_t r1) {
  const uint64_t uk = static_cast<uint64_t>(K);
  bool ok = true;
  auto at = [&](int64_t j) {  // x[c_j], or x[0] for a bad index
    const uint64_t c = as_unsigned(col[j]);
    ok &= c < uk;
    return x[c < uk ? c : 0];
  };
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = crow[r];
    const int64_t e = crow[r + 1];
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (; j + 4 <= e; j += 4) {
      a0 += val[j] * at(j);
      a1 += val[j + 1] * at(j + 1);
      a2 += val[j + 2] * at(j + 2);
      a3 += val[j + 3] * at(j + 3);
    }
    for (; j < e; ++j) a0 += val[j] * at(j);
    T s = (a0 + a1) + (a2 + a3);
    if (bias) s += bias[r];
    y[r] = s;
  }
  return ok;
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

// acc[0:TM] = sum_{j in [j, e)} v_j * xp[c_j, 0:TM]   (column indices checked before)
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

// Rows [r0, r1) of one tile (column indices checked before).
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
SVD_AVX2 inline __m256i load_idx8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SVD_AVX2 inline __m256i load_idx8(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SVD_AVX2 inline __m256i load_idx8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// All-ones lanes where 0 <= c < K, i.e. (unsigned) c <= kmax = K - 1 (kmax < 2^31).
SVD_AVX2 inline __m256i in_range(__m256i c, __m256i kmax) {
  return _mm256_cmpeq_epi32(_mm256_min_epu32(c, kmax), c);
}

// x[c] for the lanes of `ok`, 0 for the others (not accessed).
SVD_AVX2 inline __m256 gather_ok(const float* x, __m256i c, __m256i ok) {
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, c, _mm256_castsi256_ps(ok), 4);
}

SVD_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [r0, r1) with 8-wide masked gathers of x (lanes whose index is outside [0, K) are not read);
// returns false when some index is bad. The last < 8 nonzeros of a row run as one masked step
// too (lanes < e - j; its other lanes hold indices of later rows, so checking them is right), or
// as scalars where those 8 would pass the end of col.
template <typename I, typename C>
SVD_AVX2 bool spmv_avx2(const float* x, int64_t K, const C* crow, const I* col, const float* val,
                        const float* bias, float* y, int64_t r0, int64_t r1, int64_t nnz) {
  const __m256i kmax = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(K - 1, INT32_MAX)));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const uint64_t uk = static_cast<uint64_t>(K);
  __m256i ok = _mm256_set1_epi32(-1);  // AND of the lane masks
  bool ok_tail = true;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = crow[r];
    const int64_t e = crow[r + 1];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= e; j += 16) {
      const __m256i c0 = load_idx8(col + j), c1 = load_idx8(col + j + 8);
      const __m256i ok0 = in_range(c0, kmax), ok1 = in_range(c1, kmax);
      ok = _mm256_and_si256(ok, _mm256_and_si256(ok0, ok1));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + j), gather_ok(x, c0, ok0), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + j + 8), gather_ok(x, c1, ok1), a1);
    }
    if (j + 8 <= e) {
      const __m256i c0 = load_idx8(col + j);
      const __m256i ok0 = in_range(c0, kmax);
      ok = _mm256_and_si256(ok, ok0);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + j), gather_ok(x, c0, ok0), a0);
      j += 8;
    }
    if (j < e && j + 8 <= nnz) {
      const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(e - j)), iota);
      const __m256i c0 = load_idx8(col + j);
      const __m256i ok0 = in_range(c0, kmax);
      ok = _mm256_and_si256(ok, ok0);
      a1 = _mm256_fmadd_ps(_mm256_maskload_ps(val + j, lanes), gather_ok(x, c0, _mm256_and_si256(ok0, lanes)), a1);
      j = e;
    }
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; j < e; ++j) {
      const uint64_t c = as_unsigned(col[j]);
      if (c < uk) s += val[j] * x[c]; else ok_tail = false;
    }
    if (bias) s += bias[r];
    y[r] = s;
  }
  return ok_tail && _mm256_movemask_epi8(ok) == -1;
}

// The SpMM's packing, row tiles and flushing, once per vector ISA (csr_spmm_tile.h): avx2:: (8 floats
// per vector, 8x8 transposes) and avx512:: (16, 16x16 transposes).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "simd/isa_avx2.h"
__attribute__((always_inline)) inline void transpose_tile(__m256 r[8]) { transpose8x8(r); }
#include "csr_spmm_tile.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
#include "simd/isa_avx512.h"
// r[i][j] -> r[j][i] for 16 rows of 16 floats: 64 shuffles (unpack pairs, shufps quadruples, then
// two rounds of 128-bit lane shuffles).
__attribute__((always_inline)) inline void transpose_tile(__m512 r[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // u[i + c], 128-bit lane L: rows i .. i + 4 of column 4L + c
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 e01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of each
    const __m512 e23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 o01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);  // lanes 1, 3 of each
    const __m512 o23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(e01, e23, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(e01, e23, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(o01, o23, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(o01, o23, 0xDD);
  }
}
#include "csr_spmm_tile.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // SPARSEVD_X86

// ------------------------------------------------------------------------------------ drivers
// dst[k][i] = x[t*TM + i, k] (zero for t*TM + i >= M) for k in K-block kb of tile t, dst a (K, TM)
// tile buffer. flags[g]: bit q set when batch row t*tm + 8g + q has a non-finite value in the block.
template <typename T>
void pack_block(const T* x, int64_t M, int64_t K, int64_t sxm, int64_t sxk, int tm, T* dst, int64_t t,
                int64_t kb, unsigned* flags) {
  const int64_t k0 = kb * kPackBlock, k1 = std::min(K, k0 + kPackBlock);
  for (int g = 0; g < tm / 8; ++g) flags[g] = 0;
  for (int i = 0; i < tm; ++i) {
    const int64_t m = t * tm + i;
    if (m < M) {
      const T* src = x + m * sxm;
      unsigned nf = 0;
      if (sxk == 1) {
        for (int64_t k = k0; k < k1; ++k) {
          dst[k * tm + i] = src[k];
          nf |= is_nonfinite(src[k]);
        }
      } else {
        for (int64_t k = k0; k < k1; ++k) {
          dst[k * tm + i] = src[k * sxk];
          nf |= is_nonfinite(src[k * sxk]);
        }
      }
      flags[i / 8] |= nf << (i % 8);
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

// y (M, N) for valid row pointers (checked by the caller) and any column indices (checked here).
template <typename T, typename I, typename C>
void csr_linear_kernel(const T* x, int64_t M, int64_t K, int64_t sxm, int64_t sxk, const C* crow,
                       const I* col, const T* val, const T* bias, T* y, int64_t N) {
  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t nnz = static_cast<int64_t>(crow[N]);
  const bool parallel = nthreads > 1 && nnz * M >= kMinParallelWork;
  constexpr bool kSimdTypes = std::is_same<T, float>::value && !std::is_same<I, int64_t>::value;
  const bool simd = kSimdTypes && simd_enabled();
  const bool simd512 = simd && avx512_enabled();
  const bool check_simd = simd_enabled();  // the vector checks run for any T and I
  std::atomic<bool> cols_ok{true};

  if (M == 1) {
    std::vector<T> xbuf;
    const T* xv = x;
    if (sxk != 1) {
      xbuf.resize(K);
      for (int64_t k = 0; k < K; ++k) xbuf[k] = x[k * sxk];
      xv = xbuf.data();
    }
    int64_t nonfinite = 0;
#ifdef SPARSEVD_X86
    if constexpr (std::is_same<T, float>::value) {
      nonfinite = check_simd ? count_nonfinite_avx2(xv, K) : count_nonfinite(xv, K, 1);
    } else {
      nonfinite = count_nonfinite(xv, K, 1);
    }
#else
    nonfinite = count_nonfinite(xv, K, 1);
#endif
    const auto parts = row_parts(crow, N, parallel ? int64_t(nthreads) * 8 : 1);
    const int64_t P = static_cast<int64_t>(parts.size()) - 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
    for (int64_t p = 0; p < P; ++p) {
      const FlushDenormals flush;  // per task: OpenMP's workers have their own MXCSR (denormals.h)
      bool ok;
#ifdef SPARSEVD_X86
      if constexpr (kSimdTypes) {
        if (simd) {
          ok = spmv_avx2(xv, K, crow, col, val, bias, y, parts[p], parts[p + 1], nnz);
        } else {
          ok = spmv_generic(xv, K, crow, col, val, bias, y, parts[p], parts[p + 1]);
        }
      } else
#endif
      {
        ok = spmv_generic(xv, K, crow, col, val, bias, y, parts[p], parts[p + 1]);
      }
      if (!ok) cols_ok.store(false, std::memory_order_relaxed);
    }
    if (!cols_ok.load()) fail_cols(col, nnz, K);
    if (nonfinite > 0) nan_fixup(xv, K, 0, 1, {0}, {nonfinite}, crow, col, y, N);
    return;
  }

  const int tm = choose_tile(M, K, static_cast<int64_t>(sizeof(T)), simd);
  const int64_t nt = (M + tm - 1) / tm;
  // Tiles [0, nt_own): one thread each, packed and run by that thread (the tile stays in its own
  // L2 and no barrier separates tiles); the others shared by all threads (pack, barrier, row parts).
  const int64_t nt_own = parallel ? nt / nthreads * nthreads : 0;
  // Tile buffers, reused tile after tile so that a tile is packed over lines the previous one left
  // in L2 (a buffer per tile: 4 % slower at M = 64, NOTES): one per thread for its own tiles (its
  // tiles are consecutive under schedule(static)); for the shared tiles one, two on several threads
  // (tile t + 1 is packed while the rows of tile t may still run; the barrier after its packing
  // ends every run of tile t - 1, which used the same buffer).
  const int64_t own_bufs = nt_own > 0 ? nthreads : 0;
  const int64_t shared_bufs = std::min<int64_t>(nt - nt_own, parallel ? 2 : 1);
  at::Tensor xp_t = at::empty({(own_bufs + shared_bufs) * K * tm},
                              at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  auto tile_buf = [&, xp = xp_t.data_ptr<T>()](int64_t t) {
    const int64_t b = t < nt_own ? t / (nt_own / nthreads) : own_bufs + (t - nt_own) % shared_bufs;
    return xp + b * K * tm;
  };
  const int64_t nkb = (K + kPackBlock - 1) / kPackBlock;
  const int groups = tm / 8;  // groups of 8 batch rows per tile
  // flags[(t * nkb + kb) * groups + g]: non-finite bits of rows t*tm + 8g .. +8 in K-block kb
  std::vector<unsigned> flags(static_cast<size_t>(nt * nkb * groups));
  const auto parts = row_parts(crow, N, parallel ? int64_t(nthreads) * 4 : 1);
  const int64_t P = static_cast<int64_t>(parts.size()) - 1;
  const int64_t nchunks = (nnz + kColChunk - 1) / kColChunk;
  // Rows [r0, r1) of tile t.
  auto run_rows = [&](int64_t t, int64_t r0, int64_t r1) {
    const T* xpt = tile_buf(t);
    T* yt = y + t * tm * N;
    const int64_t mt = std::min<int64_t>(tm, M - t * tm);
#ifdef SPARSEVD_X86
    if constexpr (kSimdTypes) {
      if (simd512 && tm >= 16) {  // U chosen by measurement (benchmarks/NOTES.md, AVX-512 on a Xeon)
        switch (tm) {
          case 16: avx512::spmm_part<1, 4>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
          case 32: avx512::spmm_part<2, 2>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
          default: avx512::spmm_part<4, 1>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
        }
      }
      if (simd) {
        switch (tm) {
          case 8: avx2::spmm_part<1, 8>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
          case 16: avx2::spmm_part<2, 2>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
          case 32: avx2::spmm_part<4, 2>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
          default: avx2::spmm_part<8, 1>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
        }
      }
    }
#endif
    switch (tm) {
      case 8: spmm_part_generic<T, 8>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
      case 16: spmm_part_generic<T, 16>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
      default: spmm_part_generic<T, 32>(xpt, crow, col, val, bias, yt, N, mt, r0, r1); return;
    }
  };
  // K-block kb of tile t.
  auto pack = [&](int64_t t, int64_t kb) {
    unsigned* f = flags.data() + (t * nkb + kb) * groups;
    T* dst = tile_buf(t);
#ifdef SPARSEVD_X86
    if constexpr (kSimdTypes) {
      if (simd512 && tm % 16 == 0 && sxk == 1) return avx512::pack_tile_block(x, M, K, sxm, tm, dst, t, kb, f);
      if (simd && sxk == 1) return avx2::pack_tile_block(x, M, K, sxm, tm, dst, t, kb, f);
    }
#endif
    pack_block(x, M, K, sxm, sxk, tm, dst, t, kb, f);
  };
  // One parallel region (one fork/join): check the column indices, then the threads' own tiles
  // (each packed, then all its rows run), then the shared tiles one by one: pack (barrier) and run
  // its row parts. Rows are skipped after a bad index (the error is raised after the region). A
  // tile packed just before its rows run is still in L2 (packing all tiles first: 1-4 % slower);
  // own tiles: 1.2-1.5x faster on 2 threads than sharing each tile (NOTES, "CSR SpMM against
  // torch.sparse"). The check is one vectorized pass over col before any tile (2 bytes per nonzero
  // streamed once more); checking inside the tile loops cost more (NOTES, "Bounds checks").
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    const FlushDenormals flush;  // each thread of the region (denormals.h)
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t j0 = c * kColChunk;
      if (!cols_in_range(col, j0, std::min(nnz, j0 + kColChunk), K, check_simd)) {
        cols_ok.store(false, std::memory_order_relaxed);
      }
    }
    if (nt_own > 0) {
#pragma omp barrier
      // cols_ok: one value for all threads after a barrier (every chunk was checked)
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < nt_own; ++t) {
        for (int64_t kb = 0; kb < nkb; ++kb) pack(t, kb);
        if (cols_ok.load(std::memory_order_relaxed)) run_rows(t, 0, N);
      }
    }
    for (int64_t t = nt_own; t < nt; ++t) {
#pragma omp for schedule(static)
      for (int64_t kb = 0; kb < nkb; ++kb) pack(t, kb);
      // cols_ok is final here (the barrier after the packing, or the one before the own tiles)
      if (cols_ok.load(std::memory_order_relaxed)) {
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t p = 0; p < P; ++p) run_rows(t, parts[p], parts[p + 1]);
      }
    }
  }
  if (!cols_ok.load()) fail_cols(col, nnz, K);
  // Rare path: batch rows flagged while packing get their exact count and the fix-up.
  std::vector<int64_t> rows, nb;
  for (int64_t t = 0; t < nt; ++t) {
    for (int g = 0; g < groups; ++g) {
      unsigned nf = 0;
      for (int64_t kb = 0; kb < nkb; ++kb) nf |= flags[(t * nkb + kb) * groups + g];
      for (int q = 0; nf != 0 && q < 8; ++q) {
        const int64_t m = t * tm + 8 * g + q;
        if (!((nf >> q) & 1u) || m >= M) continue;
        const int64_t n = count_nonfinite(x + m * sxm, K, sxk);
        if (n > 0) {
          rows.push_back(m);
          nb.push_back(n);
        }
      }
    }
  }
  if (!rows.empty()) nan_fixup(x, K, sxm, sxk, rows, nb, crow, col, y, N);
}

template <typename F>
void dispatch_indices(const at::Tensor& crow, const at::Tensor& col, F&& f) {
  auto with_col = [&](auto* crow_ptr) {
    switch (col.scalar_type()) {
      case at::kShort: f(crow_ptr, col.data_ptr<int16_t>()); break;
      case at::kUInt16: f(crow_ptr, col.data_ptr<uint16_t>()); break;
      case at::kInt: f(crow_ptr, col.data_ptr<int32_t>()); break;
      default: f(crow_ptr, col.data_ptr<int64_t>()); break;
    }
  };
  if (crow.scalar_type() == at::kInt) with_col(crow.data_ptr<int32_t>());
  else with_col(crow.data_ptr<int64_t>());
}

}  // namespace

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const at::Tensor& values, const c10::optional<at::Tensor>& bias) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
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
  dispatch_indices(crow, col, [&](auto* crow_ptr, auto* col_ptr) {
    const int64_t first = crow_ptr[0], last = crow_ptr[N];
    TORCH_CHECK(first == 0 && last == nnz, "csr_linear: crow_indices must start at 0 and end at nnz = ", nnz,
                ", got ", first, " and ", last);
    if (!rows_ordered(crow_ptr, N, simd_enabled())) fail_rows(crow_ptr, N, nnz);
    if (K == 0 && nnz > 0) fail_cols(col_ptr, nnz, K);
  });
  if (nnz == 0 || K == 0) {  // y = b, NaN in the rows of non-finite inputs (0 * inf)
    if (has_bias) y.copy_(b.unsqueeze(0).expand({M, N})); else y.zero_();
    if (K > 0) y.masked_fill_(at::isfinite(x2).all(-1, /*keepdim=*/true).logical_not(),
                             std::numeric_limits<double>::quiet_NaN());
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

}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("csr_linear", &sparsevd::cpu::csr_linear_cpu); }
