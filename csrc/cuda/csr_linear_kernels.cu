// CUDA kernels of sparsevd::csr_linear: y (M, N) = x (M, K) W^T + b with W (N, K) in CSR form.
//
// Values fp32, fp16 or bf16 (x, values, bias and y share the dtype); accumulation in fp32.
// Row pointers int32, column indices uint16, int16 or int32 (the bindings narrow int64 indices, which keeps
// the number of template instances, and the compile time, down). Built for sm_80 and sm_90.
//
// * M == 1, SpMV (csr_spmv_kernel): a subwarp of SUB lanes per row (SUB a power of two from the
//   mean row length, 2..32). Lanes stride over the row's nonzeros (coalesced loads of col/values,
//   x gathered through the read-only cache), then a shuffle reduction; lane 0 adds the bias.
// * M > 1, SpMM (csr_spmm_kernel): x is first transposed into xT (K, Mp), Mp = M rounded up to VEC
//   and zero padded (transpose_pad_kernel), so that a nonzero (r, c, v) updates the batch by the
//   contiguous axpy y[:, r] += v * xT[c, :]. A group of G lanes owns one row of W and G*VEC batch
//   columns (VEC elements per lane, one 16-byte vector load of xT per nonzero); the group loads G
//   nonzeros at a time (one per lane, coalesced) and broadcasts them with shuffles. A block of 128
//   threads owns 128/G rows; results are staged in shared memory and written to y with the rows
//   contiguous (coalesced), bias added.
//
// Memory safety without a host sync (the kernels cannot raise): a row whose range is not inside
// [0, nnz] in order (begin <= end), or any row when crow[0] != 0 or crow[N] != nnz, is skipped;
// a column index outside [0, K) is not read. Both make the row's outputs NaN, so a bad CSR never
// gives a plausible result.
//
// Non-finite inputs (the semantics of the CPU kernel, docs/design.md "Deployment"): y is the dense
// product with the zero-filled W in IEEE arithmetic (0 * inf = 0 * NaN = NaN). counts[m] = number
// of non-finite x[m, :] (a zeroed int array; atomics only on the rare non-finite values, in the
// transpose for M > 1, in count_nonfinite_kernel for M == 1); the SpMV/SpMM count the non-finite
// x values they read per (row, batch column) and write NaN where that is below counts[m] (a zero
// weight met a non-finite input). The counting loop runs only where some counts[m] > 0.
//
// Bytes (SpMM): nnz*(s_v + s_i) per batch chunk + M*K*s_v (x) + 2*Mp*K*s_v (xT write/read, the
// gathers hit L2) + M*N*s_v (y); FLOPs 2*nnz*M.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "csr_linear_cuda.h"

namespace sparsevd {
namespace cuda {
namespace {

constexpr int kBlock = 128;  // threads per block of the SpMV and SpMM kernels

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Exponent all ones: ±inf or NaN (a bit test: --use_fast_math does not touch it). Conversions to
// float keep inf and NaN, so the float test serves every value type.
__device__ __forceinline__ bool is_nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

// 0 <= c < K for an index of any signed type (one unsigned compare).
template <typename I>
__device__ __forceinline__ bool col_ok(I c, int64_t K) {
  return static_cast<uint64_t>(static_cast<int64_t>(c)) < static_cast<uint64_t>(K);
}

// Whether row `row` has a range inside [0, nnz] in order, in a CSR that starts at 0 and ends at nnz.
template <typename RI>
__device__ __forceinline__ bool row_ok(const RI* crow, int64_t row, int64_t N, int64_t nnz, int64_t begin,
                                       int64_t end) {
  return crow[0] == 0 && static_cast<int64_t>(crow[N]) == nnz && 0 <= begin && begin <= end && end <= nnz;
}

// VEC elements of T loaded and stored as one 16-byte (or smaller) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ------------------------------------------------------------------------------------- SpMV
// counts[0] = number of non-finite x[k]: grid-stride, an atomic only for those.
template <typename T>
__global__ void count_nonfinite_kernel(const T* __restrict__ x, int64_t K, int* __restrict__ counts) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (is_nonfinite(to_float(x[k]))) atomicAdd(counts, 1);
  }
}

// y[r] = b[r] + sum_{j in row r} v_j x[c_j], a subwarp of SUB lanes per row; NaN for a bad row or
// column, or when the row reads fewer of x's non-finite values than counts[0].
template <typename T, typename RI, typename CI, int SUB>
__global__ void __launch_bounds__(kBlock) csr_spmv_kernel(const T* __restrict__ x, const RI* __restrict__ crow,
                                                          const CI* __restrict__ col, const T* __restrict__ val,
                                                          const T* __restrict__ bias, T* __restrict__ y, int64_t N,
                                                          int64_t K, int64_t nnz, const int* __restrict__ counts) {
  const int lane = threadIdx.x % SUB;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) / SUB;
  if (row >= N) return;  // whole subwarps exit together (N rows, SUB | 32)
  const int64_t begin = static_cast<int64_t>(crow[row]);
  const int64_t end = static_cast<int64_t>(crow[row + 1]);
  const int nonfinite = *counts;  // 0 almost always: the same branch for the whole grid
  bool bad = !row_ok(crow, row, N, nnz, begin, end);
  float acc = 0.f;
  int hits = 0;  // non-finite x values this lane read
  if (!bad) {
    for (int64_t j = begin + lane; j < end; j += SUB) {
      const CI c = col[j];
      if (!col_ok(c, K)) {
        bad = true;
        continue;
      }
      const float xv = to_float(__ldg(x + static_cast<int64_t>(c)));
      acc += to_float(val[j]) * xv;
      if (nonfinite > 0) hits += is_nonfinite(xv);
    }
  }
  const unsigned mask = SUB == 32 ? 0xffffffffu : (((1u << SUB) - 1u) << ((threadIdx.x % 32) / SUB * SUB));
#pragma unroll
  for (int off = SUB / 2; off > 0; off /= 2) acc += __shfl_xor_sync(mask, acc, off, SUB);
  bad = __any_sync(mask, bad);
  if (nonfinite > 0) {
#pragma unroll
    for (int off = SUB / 2; off > 0; off /= 2) hits += __shfl_xor_sync(mask, hits, off, SUB);
  }
  if (lane == 0) {
    if (bias != nullptr) acc += to_float(bias[row]);
    y[row] = from_float<T>(bad || hits < nonfinite ? CUDART_NAN_F : acc);
  }
}

// ------------------------------------------------------------------------------- transpose
// xT[k, m] = x[m, k] for m < M, 0 for M <= m < Mp; 32x32 tiles through shared memory. counts[m]
// (zeroed before) += the non-finite values of row m.
template <typename T>
__global__ void transpose_pad_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t ldx, int64_t Mp,
                                     T* __restrict__ xT, int* __restrict__ counts) {
  __shared__ T tile[32][33];
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * 32, m0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {  // read rows m0 + i, columns k0 + threadIdx.x
    const int64_t m = m0 + i, k = k0 + threadIdx.x;
    const bool in = m < M && k < K;
    const T v = in ? x[m * ldx + k] : from_float<T>(0.f);
    if (in && is_nonfinite(to_float(v))) atomicAdd(counts + m, 1);
    tile[i][threadIdx.x] = v;
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {  // write rows k0 + i, columns m0 + threadIdx.x
    const int64_t k = k0 + i, m = m0 + threadIdx.x;
    if (k < K && m < Mp) xT[k * Mp + m] = tile[threadIdx.x][i];
  }
}

// ------------------------------------------------------------------------------------- SpMM
// acc[i] += v * xT[c, mcol + i] over the nonzeros [begin, end) of a group's row: G lanes fetch G
// nonzeros at a time (coalesced) and broadcast them. A bad column index (fetched as -1) is not
// read and sets `bad`. kCount: also hits[i] += the non-finite values read (the block has a batch
// row with non-finite values).
template <bool kCount, typename T, typename CI, int G, int VEC>
__device__ __forceinline__ void spmm_row(const T* __restrict__ xT, int64_t Mp, const CI* __restrict__ col,
                                         const T* __restrict__ val, int64_t K, int64_t begin, int64_t end,
                                         int64_t mcol, bool active, unsigned mask, int lane, float (&acc)[VEC],
                                         int (&hits)[VEC], bool& bad) {
  for (int64_t base = begin; base < end; base += G) {
    const int64_t j = base + lane;
    int64_t c_mine = 0;
    float v_mine = 0.f;
    if (j < end) {
      const CI c = col[j];
      c_mine = col_ok(c, K) ? static_cast<int64_t>(c) : -1;
      v_mine = to_float(val[j]);
    }
    const int n = static_cast<int>((end - base < G ? end - base : static_cast<int64_t>(G)));
    for (int t = 0; t < n; ++t) {
      const int64_t c = G == 1 ? c_mine : __shfl_sync(mask, c_mine, t, G);
      const float v = G == 1 ? v_mine : __shfl_sync(mask, v_mine, t, G);
      if (c < 0) {
        bad = true;
      } else if (active) {
        const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(xT + c * Mp + mcol);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xv = to_float(p.v[i]);
          acc[i] += v * xv;
          if (kCount) hits[i] += is_nonfinite(xv);
        }
      }
    }
  }
}

// Block: kBlock / G groups of G lanes, one row each; batch columns [m0, m0 + G*VEC).
// y[m, r] = b[r] + sum_{j in row r} v_j xT[c_j, m]; NaN for a bad row or column, or where the row
// reads fewer of x[m, :]'s non-finite values than counts[m].
template <typename T, typename RI, typename CI, int G, int VEC>
__global__ void __launch_bounds__(kBlock) csr_spmm_kernel(const T* __restrict__ xT, int64_t Mp, int64_t M,
                                                          const RI* __restrict__ crow, const CI* __restrict__ col,
                                                          const T* __restrict__ val, const T* __restrict__ bias,
                                                          T* __restrict__ y, int64_t N, int64_t K, int64_t nnz,
                                                          const int* __restrict__ counts) {
  constexpr int kGroups = kBlock / G;   // rows per block
  constexpr int kCols = G * VEC;        // batch columns per block
  __shared__ float stage[kGroups][kCols + 1];  // [rows, batch columns], +1 against bank conflicts

  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGroups;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t row = r0 + group;
  const int64_t mcol = m0 + static_cast<int64_t>(lane) * VEC;  // this lane's first batch column
  const unsigned mask = G == 32 ? 0xffffffffu : (((1u << G) - 1u) << ((threadIdx.x % 32) / G * G));

  float acc[VEC];
  int hits[VEC], need[VEC];  // non-finite values read / in x[mcol + i, :]
  bool any = false;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    acc[i] = 0.f;
    hits[i] = 0;
    need[i] = mcol + i < M ? counts[mcol + i] : 0;
    any = any || need[i] > 0;
  }
  const bool count = __syncthreads_or(any) != 0;  // rare: the counting loop for the whole block
  bool bad = false;

  if (row < N) {
    const int64_t begin = static_cast<int64_t>(crow[row]);
    const int64_t end = static_cast<int64_t>(crow[row + 1]);
    bad = !row_ok(crow, row, N, nnz, begin, end);
    const bool active = mcol < Mp;  // Mp is a multiple of VEC: a lane's columns are all in or all out
    if (!bad) {
      if (count) {
        spmm_row<true, T, CI, G, VEC>(xT, Mp, col, val, K, begin, end, mcol, active, mask, lane, acc, hits, bad);
      } else {
        spmm_row<false, T, CI, G, VEC>(xT, Mp, col, val, K, begin, end, mcol, active, mask, lane, acc, hits, bad);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    stage[group][lane * VEC + i] = bad || hits[i] < need[i] ? CUDART_NAN_F : acc[i];
  }
  __syncthreads();

  // Write the (kGroups rows) x (kCols batch columns) tile: consecutive threads take consecutive rows.
  const int64_t rows = N - r0 < kGroups ? N - r0 : static_cast<int64_t>(kGroups);
  const int64_t cols = M - m0 < kCols ? M - m0 : static_cast<int64_t>(kCols);
  for (int idx = threadIdx.x; idx < kGroups * kCols; idx += kBlock) {
    const int rl = idx % kGroups, ml = idx / kGroups;
    if (rl < rows && ml < cols) {
      float out = stage[rl][ml];
      if (bias != nullptr) out += to_float(bias[r0 + rl]);
      y[(m0 + ml) * N + r0 + rl] = from_float<T>(out);
    }
  }
}

// ------------------------------------------------------------------------------------ launch
int pow2_at_least(int64_t v, int lo, int hi) {
  int p = lo;
  while (p < hi && p < v) p *= 2;
  return p;
}

template <typename T>
constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }  // 16-byte vectors

template <typename T, typename RI, typename CI, int SUB>
void spmv_launch(const CsrLinearArgs& a, const int* counts, cudaStream_t s) {
  const int64_t threads = a.N * SUB;
  const unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  csr_spmv_kernel<T, RI, CI, SUB><<<blocks, kBlock, 0, s>>>(
      static_cast<const T*>(a.x), static_cast<const RI*>(a.crow), static_cast<const CI*>(a.col),
      static_cast<const T*>(a.values), static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.N, a.K, a.nnz,
      counts);
}

template <typename T, typename RI, typename CI, int G>
void spmm_launch(const CsrLinearArgs& a, const T* xT, int64_t Mp, const int* counts, cudaStream_t s) {
  constexpr int VEC = vec_of<T>();
  constexpr int kGroups = kBlock / G, kCols = G * VEC;
  const dim3 grid(static_cast<unsigned>((a.N + kGroups - 1) / kGroups),
                  static_cast<unsigned>((a.M + kCols - 1) / kCols));
  csr_spmm_kernel<T, RI, CI, G, VEC><<<grid, kBlock, 0, s>>>(
      xT, Mp, a.M, static_cast<const RI*>(a.crow), static_cast<const CI*>(a.col), static_cast<const T*>(a.values),
      static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.N, a.K, a.nnz, counts);
}

int value_size(ValueType t) { return t == ValueType::kFloat32 ? 4 : 2; }

// Workspace: xT (Mp, K) for M > 1, then counts (M ints), each at a 16-byte aligned offset.
int64_t align16(int64_t b) { return (b + 15) / 16 * 16; }
int64_t xt_bytes(int64_t M, int64_t K, ValueType vt) {
  if (M <= 1) return 0;
  const int vec = 16 / value_size(vt);
  return align16((M + vec - 1) / vec * vec * K * value_size(vt));
}

template <typename T, typename RI, typename CI>
void launch_typed(const CsrLinearArgs& a, cudaStream_t s) {
  int* counts = reinterpret_cast<int*>(static_cast<char*>(a.workspace) + xt_bytes(a.M, a.K, a.value_type));
  cudaMemsetAsync(counts, 0, static_cast<size_t>(a.M) * sizeof(int), s);
  if (a.M == 1) {  // x contiguous (the caller)
    const unsigned cblocks = static_cast<unsigned>(std::min<int64_t>((a.K + 255) / 256, 1024));
    count_nonfinite_kernel<T><<<cblocks, 256, 0, s>>>(static_cast<const T*>(a.x), a.K, counts);
    const int64_t mean = a.N > 0 ? (a.nnz + a.N - 1) / a.N : 1;
    switch (pow2_at_least(mean, 2, 32)) {
      case 2: spmv_launch<T, RI, CI, 2>(a, counts, s); break;
      case 4: spmv_launch<T, RI, CI, 4>(a, counts, s); break;
      case 8: spmv_launch<T, RI, CI, 8>(a, counts, s); break;
      case 16: spmv_launch<T, RI, CI, 16>(a, counts, s); break;
      default: spmv_launch<T, RI, CI, 32>(a, counts, s); break;
    }
    return;
  }
  constexpr int VEC = vec_of<T>();
  const int64_t Mp = (a.M + VEC - 1) / VEC * VEC;
  T* xT = static_cast<T*>(a.workspace);
  const dim3 tgrid(static_cast<unsigned>((a.K + 31) / 32), static_cast<unsigned>((Mp + 31) / 32));
  transpose_pad_kernel<T><<<tgrid, dim3(32, 8), 0, s>>>(static_cast<const T*>(a.x), a.M, a.K, a.ldx, Mp, xT,
                                                        counts);
  // G lanes cover G*VEC batch columns; a wider batch runs more blocks along grid.y.
  switch (pow2_at_least((a.M + VEC - 1) / VEC, 1, 32)) {
    case 1: spmm_launch<T, RI, CI, 1>(a, xT, Mp, counts, s); break;
    case 2: spmm_launch<T, RI, CI, 2>(a, xT, Mp, counts, s); break;
    case 4: spmm_launch<T, RI, CI, 4>(a, xT, Mp, counts, s); break;
    case 8: spmm_launch<T, RI, CI, 8>(a, xT, Mp, counts, s); break;
    case 16: spmm_launch<T, RI, CI, 16>(a, xT, Mp, counts, s); break;
    default: spmm_launch<T, RI, CI, 32>(a, xT, Mp, counts, s); break;
  }
}

// Row pointers int32, column indices uint16, int16 or int32 (the bindings narrow wider indices
// first). col_ok reads a uint16 index zero-extended.
template <typename T>
void launch_value(const CsrLinearArgs& a, cudaStream_t s) {
  if (a.col_type == IndexType::kInt16) launch_typed<T, int32_t, int16_t>(a, s);
  else if (a.col_type == IndexType::kUInt16) launch_typed<T, int32_t, uint16_t>(a, s);
  else launch_typed<T, int32_t, int32_t>(a, s);
}

}  // namespace

int64_t csr_linear_workspace_bytes(int64_t M, int64_t K, ValueType value_type) {
  return xt_bytes(M, K, value_type) + align16(M * static_cast<int64_t>(sizeof(int)));
}

int launch_csr_linear(const CsrLinearArgs& a, void* stream) {
  if (a.M == 0 || a.N == 0) return static_cast<int>(cudaSuccess);
  if (a.K == 0 || a.workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);  // handled by the caller
  if (a.crow_type != IndexType::kInt32 || a.col_type == IndexType::kInt64) {
    return static_cast<int>(cudaErrorInvalidValue);  // narrowed by the caller (csr_linear_cuda.cpp)
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.value_type) {
    case ValueType::kFloat32: launch_value<float>(a, s); break;
    case ValueType::kFloat16: launch_value<__half>(a, s); break;
    default: launch_value<__nv_bfloat16>(a, s); break;
  }
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace cuda
}  // namespace sparsevd
