// What the native LRT ops share: lrt_linear (lrt_linear_cpu.cpp, native_lrt_linear[_backward]) and
// lrt_conv2d (lrt_conv2d_cpu.cpp, native_lrt_conv2d[_backward]), defined in lrt_common_cpu.cpp. The
// ops have the signatures and return conventions of the families' naive math
// (sparsevd/ops/<family>/naive.py; docs/design.md, "The math") plus an `input_grad` flag on the
// backward ops: false skips the two products of ∂x.
//
// Plan of every op: the products go to ATen (at::mm -> MKL/oneDNN GEMM; at::convolution /
// at::convolution_backward -> oneDNN), every elementwise step runs in one fused, vectorized pass
// (kernels.h) with ξ generated inline, chunk by chunk, from the seed:
//
//   forward   x2 = x ⊙ x                                     (pass 1, over x)
//             μ = x θᵀ,  s² = x2 (σ²)ᵀ                        (2 products)
//             std = sqrt(s² + 1e-8), y = μ + b + std ⊙ ξ      (pass 2, over y)
//   backward  g_s2 = g ⊙ ξ / (2 std),  ∂b = Σ g               (pass 1, over y)
//             x2 = x ⊙ x                                      (pass 2, over x)
//             ∂θ = gᵀ x,  T3 = g_s2ᵀ x2,  [T1 = g θ,  T2 = g_s2 σ²]   (2 or 4 products)
//             ∂log σ² = σ² ⊙ T3,  [∂x = T1 + 2x ⊙ T2]        (passes 3, 4)
//
// (convolution: conv(x, θ), conv(x2, σ²) and their input / weight gradients instead.) σ² =
// exp(log σ²) comes from the weight (σ²) pass over the parameters (below), which under train-time
// clipping (clip_threshold) also forms θ ⊙ m, σ² ⊙ m and the occupancy of the rows and columns of θ;
// the products then use θ ⊙ m and σ² ⊙ m, on the occupied rows and columns only when enough are dead
// ("compaction"), and the backward's epilogue multiplies ∂θ by m (∂log σ² = σ²m ⊙ T3 is zero there
// already). The forward files what the σ² pass made under its std output, so the backward reuses
// it (weights_remember). ξ is
// regenerated in the backward rather than kept (benchmarks/NOTES.md, "Native CPU backend", has the
// measurements behind both choices). GEMMs run one after the other, each on all of torch's
// threads, or — with 2 <= threads <= number of GEMMs — concurrently, one single-threaded GEMM per
// thread (MKL runs sequentially inside a parallel region), which is faster for the small GEMMs of
// LeNet-sized layers. Convolutions always run one after the other: oneDNN's backward-weights
// kernels deadlock inside an OpenMP parallel region (their reduction waits at a barrier for
// threads that a nested region never starts; seen with torch 2.13 / oneDNN 3.12).
//
// Dtypes: the math runs in fp64 for fp64 and in fp32 otherwise (bf16/fp16 inputs are widened once,
// outputs rounded once). Shapes may be empty anywhere (K = 0 gives y = b + 1e-4 ξ); inputs of any
// strides are copied to contiguous buffers when needed; flat offsets are int64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "denormals.h"
#include "kernels.h"

namespace sparsevd {
namespace cpu {
namespace lrt {

// ------------------------------------------------------------------------------------ threading
// Below these sizes a pass runs on the calling thread (a fork/join of the OpenMP team costs a few
// µs): the noise passes cost ~1-2 ns per element, the plain ones ~0.1-0.3 ns.
constexpr int64_t kGrainNoise = 8192;
constexpr int64_t kGrainPlain = 32768;

template <typename Fn>
void parallel_range(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  if (n <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    fn(int64_t{0}, n);
    return;
  }
  at::parallel_for(0, n, grain, flushing_task(fn));  // each task flushes subnormals (denormals.h)
}

// Runs the independent products of one op (see the plan above); `nestable`: the jobs may run
// inside a parallel region (MKL GEMMs: yes; oneDNN convolutions: no).
void run_products(const std::vector<std::function<void()>>& jobs, bool nestable);

// ------------------------------------------------------------------------------------ helpers
// Every op runs its ATen calls (products, exp, casts) with autocast off: a kernel still sees the
// caller's autocast state, which would recast the fp32 products to bf16 (the reference backend
// does the same in Python, sparsevd.ops.backend.no_autocast, at ~5 µs per call).
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

inline at::ScalarType compute_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// t in dtype ct, contiguous; no ATen call (dispatcher round trip) when it already is.
inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct ? t.contiguous() : t.to(ct).contiguous();
}

inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

int64_t seed_value(const at::Tensor& seed);
void check_param(const at::Tensor& t, const char* name);
void check_weights(const at::Tensor& weight, const at::Tensor& log_sigma2, int64_t dim);
at::Tensor check_bias(const c10::optional<at::Tensor>& bias, int64_t n, at::ScalarType ct);
void check_clip(const c10::optional<double>& clip);
int64_t leading_rows(const at::Tensor& t);

// ------------------------------------------------------------------------------ fused passes
// x2 = x ⊙ x of a contiguous compute-dtype tensor.
at::Tensor square_of(const at::Tensor& x);
// Forward epilogue over (outer, C, inner) = mu.sizes() view: mu -> y, s2 -> std, in place.
void forward_epilogue(const at::Tensor& mu, const at::Tensor& s2, const at::Tensor& bias, int64_t C,
                      int64_t inner, philox::Key key);
// Backward prologue: g_s2 = g ⊙ ξ / (2 std) (outer, C, inner) and ∂b = Σ g (C,) in gb_dtype (summed
// in fp64).
std::tuple<at::Tensor, at::Tensor> backward_prologue(const at::Tensor& g, const at::Tensor& sd, int64_t C,
                                                     int64_t inner, philox::Key key, at::ScalarType gb_dtype);
// tᵀ (cols, ld) of a contiguous compute-dtype (rows, cols) tensor, each row zero padded to ld.
at::Tensor transposed(const at::Tensor& t, int64_t ld);
// acc = acc + 2x ⊙ t (∂x), all contiguous, same shape.
void add_2x_mul_(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& t);
// a = a ⊙ b (∂log σ² = σ² ⊙ T3), contiguous, same shape.
void mul_(const at::Tensor& a, const at::Tensor& b);
// gw = gw ⊙ [state == 1] (∂θ ⊙ m) and t3 = t3 ⊙ s2m (∂log σ² = σ²m ⊙ T3), contiguous, same shape.
void clip_grads_(const at::Tensor& gw, const at::Tensor& t3, const at::Tensor& state, const at::Tensor& s2m);

// ------------------------------------------------------------------------------------ σ² pass
// Every op starts with one pass over its parameters (kernels.h, sigma2): σ² = exp(log σ²) and,
// under train-time clipping (clip_threshold; sparsevd.ops.weights.clip_parameters), in the same pass
// the clipped θ ⊙ m and σ² ⊙ m (m = sparsevd.ops.weights.clip_mask, computed in the compute dtype
// with the reference's roundings), a state byte per weight (1: m = 1; 2: dropped, but θ·0 or σ²·0
// is NaN, so the weight still takes part, as in the reference; 0: dropped) and the occupancy: how
// many weights of each output row (dim 0 of θ: out_features / C_out) and of each input column
// (dim 1: in_features / C_in, summed over the kernel window) are not state 0.
//
// The occupancy is computed every step, in the forward's σ² pass, so it is exact for the
// parameters this forward sees. The KL pass (kl_cpu.cpp) also reads every θ and log σ², but it
// runs after the forward of its step (in the loss), so its map would describe the parameters
// before the last optimizer step: one step stale, hence inexact (a weight that crossed the
// threshold in that step would be computed on the wrong side). That is why it is not used.
//
// Compaction: when whole rows or columns are dead, the products run on the gathered occupied rows
// and columns only (linear; conv2d with groups = 1, by output / input channel) and the results are
// scattered back: dead output rows get μ = s² = 0, so y = b + sqrt(1e-8)·ξ with ξ at its index
// in the full output, as the reference gives; dead input columns get ∂x = 0, dead weights ∂θ =
// ∂log σ² = 0. Exact, up to the order of the sums, for finite x and gradients; a non-finite x in a
// dead column (or gradient in a dead row) does not reach the outputs, where the reference's
// 0·inf = NaN would. It pays when the products shrink enough to cover the gathers and scatters
// (benchmarks/NOTES.md, "native train-time clip and compaction"): see kCompactMaxFraction.
//
// Sparse products (linear only): when few weights are kept (kSparseMaxDensity), the products run on
// the CSR of the kept weights instead (state != 0, row-major; values θ ⊙ m and σ² ⊙ m): the forward
// μ = x (θm)ᵀ and s² = x2 (σ²m)ᵀ and the backward's T1 = g θm, T2 = g_s2 σ²m through the CSR SpMM of
// the deployed layers (csr_linear_cpu.h; the backward on the transposed CSR, built from the CSR in
// one O(nnz) pass), ∂θ and ∂log σ² as sampled products (one dot over the batch per kept weight,
// kernels.h clip_sddmm), zero elsewhere. Exact up to the order of the sums; μ, s² and ∂x keep the
// dense products' NaN where a dropped weight meets a non-finite input (the SpMM's rule); ∂θ and
// ∂log σ² of dropped weights are 0 even then, as under compaction.
//
// Weights of one op after the σ² pass; θ's shape (R, S[, kH, kW]).
struct Weights {
  bool clip = false;
  at::Tensor s2;                 // σ² (or σ² ⊙ m), compute dtype, contiguous; undefined if compact
  at::Tensor w;                  // clip: θ ⊙ m; undefined if compact (the ops use θ itself without clip)
  at::Tensor state;              // clip: uint8 per weight; undefined if compact
  at::Tensor row_count, col_count;  // clip: int64 (R,), (S,): occupied weights per row / column
  at::Tensor rows, cols;         // clip: int64 indices of the occupied rows / columns
  int64_t R = 0, S = 0;
  bool compact = false;          // the products use the gathered (rows, cols) blocks below
  at::Tensor wc, s2c, statec;    // compact: θm, σ²m, state at (rows, cols[, kH, kW]), contiguous
  bool sparse = false;           // the products use the CSR below (linear only)
  at::Tensor crow, col;          // sparse: int64 (R + 1,) row pointers, int32 (nnz,) columns
  at::Tensor wv, s2v, keep;      // sparse: θm, σ²m (compute dtype) and [state == 1] (uint8) per entry
  bool all_rows() const { return rows.size(0) == R; }
  bool all_cols() const { return cols.size(0) == S; }
};

// What an op can run its clipped products on besides the full weights: nothing (the occupancy
// hook), the gathered blocks (conv2d with groups = 1) or the blocks or the CSR (linear).
enum class Reduced { kNone, kBlocks, kBlocksOrSparse };

// The convolutions are not limited (their GEMMs run over N·H_out·W_out positions; not measured).
constexpr int64_t kNoRowLimit = std::numeric_limits<int64_t>::max();

// The σ² pass over weight / log_sigma2 (θ's shape) in compute dtype ct; `reduced`: what else than
// the full weights the op can run its clipped products on; `rows_of_x`: the rows of a linear
// layer's x (compaction pays from kCompactMinRows on).
Weights weights_pass(const at::Tensor& weight, const at::Tensor& log_sigma2, at::ScalarType ct,
                     const c10::optional<double>& clip, Reduced reduced, int64_t rows_of_x);
// Files the forward's σ² pass under its std output (the σ² cache, lrt_common_cpu.cpp).
void weights_remember(const at::Tensor& std_out, const at::Tensor& weight, const at::Tensor& log_sigma2,
                      at::ScalarType ct, const c10::optional<double>& clip, const Weights& value);
// The σ² pass for the backward that received `std`: the forward's, or run afresh.
Weights weights_for_backward(const at::Tensor& std, const at::Tensor& weight, const at::Tensor& log_sigma2,
                             at::ScalarType ct, const c10::optional<double>& clip, Reduced reduced,
                             int64_t rows_of_x);
// c placed at `index` along `dim` of a zero tensor whose size there is `full` (c itself when the
// index covers it all).
at::Tensor scatter_dim(const at::Tensor& c, int64_t dim, const at::Tensor& index, int64_t full);
// The weight-shaped (R, S[, kH, kW]) tensor `full` that is c (n, k[, kH, kW]) at the occupied rows
// and columns of p and 0 elsewhere.
at::Tensor scatter_block(const at::Tensor& c, const Weights& p, at::IntArrayRef full);

// The transposed CSR (columns of θ) of Weights::sparse, for the backward's ∂x products: column
// pointers (S + 1,) int64, row indices (nnz,) int32, θm and σ²m by column (rows ascending).
struct TransposedCsr {
  at::Tensor ptr, row, wv, s2v;
};
TransposedCsr transpose_csr(const Weights& p);

// The epilogue of both backward ops, after their products: ∂θ ⊙ m (under clipping) and
// ∂log σ² = σ²(⊙ m) ⊙ T3 from gw and t3 (on the occupied block when p.compact: scattered back to
// θ's shape); with input_grad, ∂x = T1 + 2x ⊙ T2 from t1, t2 and xk (on the occupied entries of
// dim 1 when p.compact: scattered back to `in_size`), in x's shape and dtype, else an empty tensor;
// gb (∂b) as it is. The gradients in the parameters' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_epilogue(
    at::Tensor gw, at::Tensor t3, at::Tensor t1, const at::Tensor& t2, const at::Tensor& xk, const at::Tensor& gb,
    const Weights& p, const at::Tensor& s2k, int64_t in_size, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& log_sigma2, bool input_grad);

// ---------------------------------------------------------------------------------- controls
// For tests and benchmarks; schemas in csrc/ops.cpp (native_set_products, native_set_compact,
// native_sigma2_cache, native_sigma2_cache_stats, native_clip_occupancy).
std::string set_products(const std::string& mode);
std::string set_compact(const std::string& mode);
bool set_sigma2_cache(bool enabled);
std::vector<int64_t> sigma2_cache_stats();
std::tuple<at::Tensor, at::Tensor> clip_occupancy(const at::Tensor& weight, const at::Tensor& log_sigma2,
                                                  double clip);

}  // namespace lrt
}  // namespace cpu
}  // namespace sparsevd
