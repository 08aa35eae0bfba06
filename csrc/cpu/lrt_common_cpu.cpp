// The shared part of the native LRT ops (lrt_common.h states the plan): threads and the product
// runner, argument checks, the fused elementwise passes, and the weight (σ²) pass with its cache,
// compaction, sparse products and occupancy, and the controls that tests and benchmarks set.
#include "lrt_common.h"

#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace sparsevd {
namespace cpu {
namespace lrt {

namespace {

enum class ProductMode { kAuto, kSerial, kConcurrent };

ProductMode parse_mode(const std::string& s) {
  if (s == "auto") return ProductMode::kAuto;
  if (s == "serial") return ProductMode::kSerial;
  if (s == "concurrent") return ProductMode::kConcurrent;
  TORCH_CHECK(false, "mode: expected 'auto', 'serial' or 'concurrent', got '", s, "'");
}

const char* mode_name(ProductMode m) {
  return m == ProductMode::kAuto ? "auto" : m == ProductMode::kSerial ? "serial" : "concurrent";
}

std::atomic<ProductMode>& product_mode() {
  static std::atomic<ProductMode> mode{[] {
    const char* env = std::getenv("SPARSEVD_NATIVE_PRODUCTS");
    return env != nullptr && *env != '\0' ? parse_mode(env) : ProductMode::kAuto;
  }()};
  return mode;
}

}  // namespace

void run_products(const std::vector<std::function<void()>>& jobs, bool nestable) {
  const int64_t n = static_cast<int64_t>(jobs.size());
  const int64_t threads = at::get_num_threads();
  const ProductMode mode = product_mode().load();
  const bool concurrent = nestable && n >= 2 && threads >= 2 && !at::in_parallel_region() &&
                          (mode == ProductMode::kConcurrent || (mode == ProductMode::kAuto && threads <= n));
  if (!concurrent) {
    for (const auto& job : jobs) job();
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    const FlushDenormals flush;
    for (int64_t i = begin; i < end; ++i) jobs[i]();
  });
}

int64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu(), "seed: expected a CPU tensor, got one on ", seed.device());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed: expected a one-element int64 tensor, got ", seed.scalar_type(), " of shape ", seed.sizes());
  return *seed.data_ptr<int64_t>();
}

void check_param(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ",
              t.scalar_type());
}

void check_weights(const at::Tensor& weight, const at::Tensor& log_sigma2, int64_t dim) {
  check_param(weight, "weight");
  check_param(log_sigma2, "log_sigma2");
  TORCH_CHECK(weight.dim() == dim, "weight: expected a ", dim, "-D tensor, got shape ", weight.sizes());
  TORCH_CHECK(log_sigma2.sizes() == weight.sizes(), "log_sigma2: expected shape ", weight.sizes(),
              " (the shape of weight), got ", log_sigma2.sizes());
}

at::Tensor check_bias(const c10::optional<at::Tensor>& bias, int64_t n, at::ScalarType ct) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_param(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias: expected shape (", n, ",), got ", bias->sizes());
  return as_compute(*bias, ct);
}

namespace {

// ∂b in `dtype` from per-thread fp64 partial sums (parts, C), added in thread order.
at::Tensor bias_grad(const at::Tensor& parts, at::ScalarType dtype) {
  const int64_t P = parts.size(0), C = parts.size(1);
  const double* p = parts.data_ptr<double>();
  const at::ScalarType out_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({C}, parts.options().dtype(out_type));
  AT_DISPATCH_FLOATING_TYPES(out_type, "sparsevd_bias_grad", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int64_t i = 0; i < P; ++i) acc += p[i * C + c];
      o[c] = static_cast<scalar_t>(acc);
    }
  });
  return to_dtype(out, dtype);
}

template <typename T>
void square_pass(const at::Tensor& x, const at::Tensor& out) {
  const T* px = x.data_ptr<T>();
  T* po = out.data_ptr<T>();
  const auto& k = elementwise<T>();
  parallel_range(x.numel(), kGrainPlain, [&](int64_t b, int64_t e) { k.square(px + b, po + b, e - b); });
}

}  // namespace

// x2 = x ⊙ x of a contiguous compute-dtype tensor.
at::Tensor square_of(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsevd_square", [&] { square_pass<scalar_t>(x, out); });
  return out;
}

// Forward epilogue over (outer, C, inner) = mu.sizes() view: mu -> y, s2 -> std, in place.
void forward_epilogue(const at::Tensor& mu, const at::Tensor& s2, const at::Tensor& bias, int64_t C,
                      int64_t inner, philox::Key key) {
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sparsevd_lrt_forward", [&] {
    scalar_t* pm = mu.data_ptr<scalar_t>();
    scalar_t* ps = s2.data_ptr<scalar_t>();
    const scalar_t* pb = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const auto& k = elementwise<scalar_t>();
    parallel_range(mu.numel(), kGrainNoise, [&](int64_t b, int64_t e) {
      k.lrt_forward(pm + b, ps + b, pb, C, inner, b, key, e - b);
    });
  });
}

// Backward prologue: g_s2 = g ⊙ ξ / (2 std) (outer, C, inner) and ∂b = Σ g (C,) in gb_dtype (summed
// in fp64).
std::tuple<at::Tensor, at::Tensor> backward_prologue(const at::Tensor& g, const at::Tensor& sd, int64_t C,
                                                     int64_t inner, philox::Key key, at::ScalarType gb_dtype) {
  at::Tensor gs2 = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t n = g.numel();
  const int64_t parts = (n <= kGrainNoise || at::in_parallel_region()) ? 1 : at::get_num_threads();
  at::Tensor gb_parts = at::empty({parts, C}, g.options().dtype(at::kDouble));
  std::fill_n(gb_parts.data_ptr<double>(), parts * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparsevd_lrt_backward", [&] {
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* ps = sd.data_ptr<scalar_t>();
    scalar_t* po = gs2.data_ptr<scalar_t>();
    double* pb = gb_parts.data_ptr<double>();
    const auto& k = elementwise<scalar_t>();
    auto body = [&](int64_t b, int64_t e) {
      const int64_t part = parts == 1 ? 0 : at::get_thread_num();
      k.lrt_backward_gs2(pg + b, ps + b, po + b, pb + part * C, C, inner, b, key, e - b);
    };
    if (parts == 1) {
      body(0, n);
    } else {
      at::parallel_for(0, n, kGrainNoise, flushing_task(body));
    }
  });
  return {gs2, bias_grad(gb_parts, gb_dtype)};
}

// tᵀ (cols, ld) of a contiguous compute-dtype (rows, cols) tensor, each row zero padded from rows
// to ld; parallel over strips of 8 columns of t (ATen's transposing copy is serial and ~4x slower
// at these sizes).
at::Tensor transposed(const at::Tensor& t, int64_t ld) {
  const int64_t rows = t.size(0), cols = t.size(1);
  at::Tensor out = at::empty({cols, ld}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "sparsevd_transpose", [&] {
    const scalar_t* src = t.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto& k = elementwise<scalar_t>();
    const int64_t strips = (cols + 7) / 8;
    parallel_range(strips, std::max<int64_t>(1, kGrainPlain / std::max<int64_t>(8 * ld, 1)), [&](int64_t b, int64_t e) {
      k.transpose(src, rows, cols, dst, ld, 8 * b, std::min(cols, 8 * e));
    });
  });
  return out;
}

// acc = acc + 2x ⊙ t (∂x), all contiguous, same shape.
void add_2x_mul_(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& t) {
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "sparsevd_add_2x_mul", [&] {
    scalar_t* pa = acc.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pt = t.data_ptr<scalar_t>();
    const auto& k = elementwise<scalar_t>();
    parallel_range(acc.numel(), kGrainPlain, [&](int64_t b, int64_t e) { k.add_2x_mul(pa + b, px + b, pt + b, e - b); });
  });
}

// a = a ⊙ b (∂log σ² = σ² ⊙ T3), contiguous, same shape.
void mul_(const at::Tensor& a, const at::Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsevd_mul", [&] {
    scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const auto& k = elementwise<scalar_t>();
    parallel_range(a.numel(), kGrainPlain, [&](int64_t s, int64_t e) { k.mul_inplace(pa + s, pb + s, e - s); });
  });
}

// gw = gw ⊙ [state == 1] (∂θ ⊙ m) and t3 = t3 ⊙ s2m (∂log σ² = σ²m ⊙ T3), contiguous, same shape.
void clip_grads_(const at::Tensor& gw, const at::Tensor& t3, const at::Tensor& state, const at::Tensor& s2m) {
  AT_DISPATCH_FLOATING_TYPES(gw.scalar_type(), "sparsevd_clip_grads", [&] {
    scalar_t* pg = gw.data_ptr<scalar_t>();
    scalar_t* pt = t3.data_ptr<scalar_t>();
    const uint8_t* pst = state.data_ptr<uint8_t>();
    const scalar_t* ps = s2m.data_ptr<scalar_t>();
    const auto& k = elementwise<scalar_t>();
    parallel_range(gw.numel(), kGrainPlain, [&](int64_t b, int64_t e) {
      k.clip_grads(pg + b, pt + b, pst + b, ps + b, e - b);
    });
  });
}

int64_t leading_rows(const at::Tensor& t) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) m *= t.size(d);
  return m;
}

namespace {

enum class CompactMode { kAuto, kNever, kAlways, kSparse };

// Compact (mode auto) when occupied rows × occupied columns <= this fraction of R × S. Measured on
// a 1024×1024 layer at batch 256, forward + backward (benchmarks/NOTES.md, "native train-time clip
// and compaction"): compacted / uncompacted time 0.89 at a block fraction of 0.60, 0.92 at 0.64,
// 1.01 at 0.70, 1.14 at 0.80, 1.11 at 0.95 (1 thread; the 2-thread runs of that shared machine were
// dominated by scheduling stalls, see there).
constexpr double kCompactMaxFraction = 0.65;
// ... and (mode auto, linear) only when x has at least this many rows: the gathers of θ, σ² and the
// scatters of the gradients cost O(N·K) per step whatever the batch, while the GEMM work saved grows
// with it. LeNet-300-100's fc1 at batch 100 (56 % of its rows occupied) ran 1.2x slower compacted;
// the 1024x1024 layer at batch 256 gains (benchmarks/NOTES.md, "bench_masked, full run").
constexpr int64_t kCompactMinRows = 256;
// Sparse products (mode auto, linear) when at most this fraction of the weights is kept (state != 0).
// Measured on the 1024x1024 layer at batch 256 and LeNet-300-100's layers at batch 100, forward +
// backward, 1 thread (benchmarks/NOTES.md, "native sparse products"): see there.
constexpr double kSparseMaxDensity = 0.2;

CompactMode parse_compact(const std::string& s) {
  if (s == "auto") return CompactMode::kAuto;
  if (s == "never") return CompactMode::kNever;
  if (s == "always") return CompactMode::kAlways;
  if (s == "sparse") return CompactMode::kSparse;
  TORCH_CHECK(false, "mode: expected 'auto', 'never', 'always' or 'sparse', got '", s, "'");
}

const char* compact_name(CompactMode m) {
  return m == CompactMode::kAuto ? "auto" : m == CompactMode::kNever ? "never" : m == CompactMode::kAlways ? "always"
                                                                                                      : "sparse";
}

std::atomic<CompactMode>& compact_mode() {
  static std::atomic<CompactMode> mode{[] {
    const char* env = std::getenv("SPARSEVD_NATIVE_COMPACT");
    return env != nullptr && *env != '\0' ? parse_compact(env) : CompactMode::kAuto;
  }()};
  return mode;
}

}  // namespace

void check_clip(const c10::optional<double>& clip) {
  TORCH_CHECK(!clip.has_value() || std::isfinite(*clip), "clip_threshold: expected a finite number or None, got ",
              clip.has_value() ? *clip : 0.0);
}

namespace {

// t gathered at rows along dim 0 and cols along dim 1 (each skipped when it keeps everything).
at::Tensor gather_block(const at::Tensor& t, const Weights& p) {
  at::Tensor out = p.all_rows() ? t : t.index_select(0, p.rows);
  if (!p.all_cols()) out = out.index_select(1, p.cols);
  return out.contiguous();
}

}  // namespace

// c placed at `index` along `dim` of a zero tensor whose size there is `full` (c itself when the
// index covers it all).
at::Tensor scatter_dim(const at::Tensor& c, int64_t dim, const at::Tensor& index, int64_t full) {
  if (index.size(0) == full) return c;
  std::vector<int64_t> shape = c.sizes().vec();
  shape[dim] = full;
  at::Tensor out = at::zeros(shape, c.options());
  out.index_copy_(dim, index, c);
  return out;
}

// The weight-shaped (R, S[, kH, kW]) tensor `full` that is c (n, k[, kH, kW]) at the occupied rows
// and columns of p and 0 elsewhere, in one pass that writes every element once.
at::Tensor scatter_block(const at::Tensor& c, const Weights& p, at::IntArrayRef full) {
  if (p.all_rows() && p.all_cols()) return c;
  at::Tensor out = at::empty(full, c.options());
  const int64_t R = p.R, S = p.S, ka = p.cols.size(0);
  const int64_t win = R * S == 0 ? 0 : out.numel() / (R * S);
  std::vector<int64_t> pos(R, -1);  // row r of out <- row pos[r] of c
  const int64_t* prows = p.rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.rows.size(0); ++i) pos[prows[i]] = i;
  const int64_t* pcols = p.cols.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "sparsevd_scatter_block", [&] {
    const scalar_t* pc = c.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t row = S * win;
    at::parallel_for(0, R, std::max<int64_t>(1, kGrainPlain / std::max<int64_t>(row, 1)), [&](int64_t r0, int64_t r1) {
      const FlushDenormals flush;
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dst = po + r * row;
        std::fill(dst, dst + row, scalar_t(0));
        if (pos[r] < 0) continue;
        const scalar_t* src = pc + pos[r] * ka * win;
        for (int64_t j = 0; j < ka; ++j) std::copy(src + j * win, src + (j + 1) * win, dst + pcols[j] * win);
      }
    });
  });
  return out;
}

namespace {

at::Tensor indices_of_nonzero(const at::Tensor& count) {
  const int64_t n = count.size(0);
  const int64_t* c = count.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) k += c[i] != 0;
  at::Tensor out = at::empty({k}, count.options());  // no at::tensor(vector): a dispatched copy
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (c[i] != 0) *o++ = i;
  return out;
}

// The CSR of the clipped weights of a linear layer (Weights::sparse), from the σ² pass's states,
// θ ⊙ m and σ² ⊙ m and row counts; frees the full-size buffers.
void build_csr(Weights& p) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "build_csr reads 8 states as a little-endian word");
  const int64_t R = p.R, S = p.S;
  p.crow = at::empty({R + 1}, p.row_count.options());
  int64_t* crow = p.crow.data_ptr<int64_t>();
  const int64_t* counts = p.row_count.data_ptr<int64_t>();
  crow[0] = 0;
  for (int64_t r = 0; r < R; ++r) crow[r + 1] = crow[r] + counts[r];
  const int64_t nnz = crow[R];
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(), "weight: in_features ", S, " exceeds int32");
  p.col = at::empty({nnz}, p.row_count.options().dtype(at::kInt));
  p.wv = at::empty({nnz}, p.w.options());
  p.s2v = at::empty({nnz}, p.w.options());
  p.keep = at::empty({nnz}, p.state.options());
  AT_DISPATCH_FLOATING_TYPES(p.w.scalar_type(), "sparsevd_clip_csr", [&] {
    const scalar_t* pw = p.w.data_ptr<scalar_t>();
    const scalar_t* ps = p.s2.data_ptr<scalar_t>();
    const uint8_t* pst = p.state.data_ptr<uint8_t>();
    int32_t* col = p.col.data_ptr<int32_t>();
    scalar_t* wv = p.wv.data_ptr<scalar_t>();
    scalar_t* sv = p.s2v.data_ptr<scalar_t>();
    uint8_t* keep = p.keep.data_ptr<uint8_t>();
    parallel_range(R, std::max<int64_t>(1, kGrainPlain / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* st = pst + r * S;
        int64_t q = crow[r];
        auto take = [&](int64_t c) {
          col[q] = static_cast<int32_t>(c);
          wv[q] = pw[r * S + c];
          sv[q] = ps[r * S + c];
          keep[q] = st[c] == 1;
          ++q;
        };
        int64_t c = 0;
        for (; c + 8 <= S; c += 8) {  // 8 states at a time: most words of a sparse row are all 0
          uint64_t word;
          std::memcpy(&word, st + c, 8);
          // bit 0 of each byte: its state (0, 1 or 2) is not 0; then one step per kept weight
          uint64_t live = (word | (word >> 1)) & 0x0101010101010101ULL;
          for (; live != 0; live &= live - 1) take(c + (__builtin_ctzll(live) >> 3));
        }
        for (; c < S; ++c)
          if (st[c] != 0) take(c);
      }
    });
  });
  p.w = p.s2 = p.state = at::Tensor();  // the products need only the CSR
}

}  // namespace

TransposedCsr transpose_csr(const Weights& p) {
  const int64_t R = p.R, S = p.S, nnz = p.col.size(0);
  TransposedCsr t;
  t.ptr = at::empty({S + 1}, p.crow.options());
  t.row = at::empty({nnz}, p.col.options());
  t.wv = at::empty({nnz}, p.wv.options());
  t.s2v = at::empty({nnz}, p.wv.options());
  int64_t* ptr = t.ptr.data_ptr<int64_t>();
  const int64_t* counts = p.col_count.data_ptr<int64_t>();
  std::vector<int64_t> next(S);
  ptr[0] = 0;
  for (int64_t c = 0; c < S; ++c) {
    next[c] = ptr[c];
    ptr[c + 1] = ptr[c] + counts[c];
  }
  TORCH_CHECK(ptr[S] == nnz, "clipped CSR: column counts do not match the entries");
  const int64_t* crow = p.crow.data_ptr<int64_t>();
  const int32_t* col = p.col.data_ptr<int32_t>();
  int32_t* row = t.row.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(p.wv.scalar_type(), "sparsevd_clip_csc", [&] {
    const scalar_t* wv = p.wv.data_ptr<scalar_t>();
    const scalar_t* sv = p.s2v.data_ptr<scalar_t>();
    scalar_t* tw = t.wv.data_ptr<scalar_t>();
    scalar_t* ts = t.s2v.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
        const int64_t q = next[col[j]]++;
        row[q] = static_cast<int32_t>(r);
        tw[q] = wv[j];
        ts[q] = sv[j];
      }
    }
  });
  return t;
}

// The σ² pass over weight / log_sigma2 (θ's shape) in compute dtype ct; `reduced`: what else than
// the full weights the op can run its clipped products on.
Weights weights_pass(const at::Tensor& weight, const at::Tensor& log_sigma2, at::ScalarType ct,
                     const c10::optional<double>& clip, Reduced reduced, int64_t rows_of_x) {
  Weights p;
  p.clip = clip.has_value();
  p.R = weight.dim() >= 1 ? weight.size(0) : 1;
  p.S = weight.dim() >= 2 ? weight.size(1) : 1;
  const at::Tensor ls2 = as_compute(log_sigma2, ct);
  p.s2 = at::empty_like(ls2, at::MemoryFormat::Contiguous);
  const int64_t n = ls2.numel();
  if (!p.clip) {
    AT_DISPATCH_FLOATING_TYPES(ct, "sparsevd_sigma2", [&] {
      const scalar_t* pl = ls2.data_ptr<scalar_t>();
      scalar_t* ps = p.s2.data_ptr<scalar_t>();
      const auto& k = elementwise<scalar_t>();
      parallel_range(n, kGrainNoise, [&](int64_t b, int64_t e) {
        k.sigma2(nullptr, pl + b, scalar_t(0), nullptr, ps + b, nullptr, e - b);
      });
    });
    return p;
  }
  const at::Tensor w = as_compute(weight, ct);
  p.w = at::empty_like(w, at::MemoryFormat::Contiguous);
  p.state = at::empty(w.sizes(), w.options().dtype(at::kByte));
  p.row_count = at::empty({p.R}, w.options().dtype(at::kLong));
  const int64_t R = p.R, S = p.S;
  const int64_t L = R == 0 ? 0 : n / R;  // weights per row
  const int64_t win = S == 0 ? 0 : L / S;  // per (row, column): the kernel window
  const int64_t threads = at::get_num_threads();
  const int64_t parts = (n <= kGrainNoise || threads == 1 || at::in_parallel_region()) ? 1 : threads;
  // int32 counters (the linear loop below vectorizes 8 to 16 states per instruction at the baseline ISA)
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max() && R * win <= std::numeric_limits<int32_t>::max(),
              "weight: more than 2^31 - 1 weights in one row or column, too many for the clipped occupancy counts");
  std::vector<int32_t> col_parts(static_cast<size_t>(parts * S), 0);
  AT_DISPATCH_FLOATING_TYPES(ct, "sparsevd_sigma2_clip", [&] {
    const scalar_t* pw = w.data_ptr<scalar_t>();
    const scalar_t* pl = ls2.data_ptr<scalar_t>();
    scalar_t* pwm = p.w.data_ptr<scalar_t>();
    scalar_t* ps = p.s2.data_ptr<scalar_t>();
    uint8_t* pst = p.state.data_ptr<uint8_t>();
    int64_t* prow = p.row_count.data_ptr<int64_t>();
    int32_t* pcol = col_parts.data();
    const scalar_t thr = static_cast<scalar_t>(*clip);  // torch rounds the scalar to the tensor's dtype
    const auto& k = elementwise<scalar_t>();
    auto body = [&](int64_t r0, int64_t r1) {
      int32_t* col = pcol + (parts == 1 ? 0 : at::get_thread_num()) * S;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * L;
        k.sigma2(pw + o, pl + o, thr, pwm + o, ps + o, pst + o, L);
        const uint8_t* st = pst + o;
        int32_t total = 0;
        if (win == 1) {  // linear: one weight per (row, column)
          for (int64_t c = 0; c < S; ++c) {
            const int32_t occ = st[c] != 0;
            col[c] += occ;
            total += occ;
          }
        } else {
          for (int64_t c = 0; c < S; ++c) {
            int32_t occ = 0;
            for (int64_t j = 0; j < win; ++j) occ += st[c * win + j] != 0;
            col[c] += occ;
            total += occ;
          }
        }
        prow[r] = total;
      }
    };
    if (parts == 1) {
      body(0, R);
    } else {
      at::parallel_for(0, R, std::max<int64_t>(1, kGrainNoise / std::max<int64_t>(L, 1)), flushing_task(body));
    }
  });
  p.col_count = at::empty({S}, p.row_count.options());  // Σ over the parts, in int64
  int64_t* pcc = p.col_count.data_ptr<int64_t>();
  for (int64_t c = 0; c < S; ++c) {
    int64_t total = 0;
    for (int64_t q = 0; q < parts; ++q) total += col_parts[q * S + c];
    pcc[c] = total;
  }
  p.rows = indices_of_nonzero(p.row_count);
  p.cols = indices_of_nonzero(p.col_count);
  const CompactMode mode = compact_mode().load();
  if (reduced == Reduced::kBlocksOrSparse && R > 0 && S > 0) {
    int64_t kept = 0;
    const int64_t* prow = p.row_count.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) kept += prow[r];
    p.sparse = mode == CompactMode::kSparse ||
               (mode == CompactMode::kAuto && static_cast<double>(kept) <= kSparseMaxDensity * static_cast<double>(n));
  }
  if (p.sparse) {
    build_csr(p);
    return p;
  }
  if (reduced != Reduced::kNone && (!p.all_rows() || !p.all_cols())) {
    p.compact = mode == CompactMode::kAlways || mode == CompactMode::kSparse ||
                (mode == CompactMode::kAuto && rows_of_x >= kCompactMinRows &&
                 static_cast<double>(p.rows.size(0)) * p.cols.size(0) <=
                     kCompactMaxFraction * static_cast<double>(R) * S);
  }
  if (p.compact) {
    p.wc = gather_block(p.w, p);
    p.s2c = gather_block(p.s2, p);
    p.statec = gather_block(p.state, p);
    p.w = p.s2 = p.state = at::Tensor();  // the products need only the blocks
  }
  return p;
}

namespace {

// ------------------------------------------------------------------------------------ σ² cache
// The σ² pass runs once per training step: the forward files its result (Weights) under the std
// tensor it returns; the backward, which receives that std (saved by autograd), finds it here
// instead of recomputing it — σ², and under clipping θ ⊙ m, the states and the occupancy with the
// forward's compaction decision. An entry lives as long as that std tensor (held weakly: when
// autograd frees the graph, the entry expires and is dropped), and is used only if log σ² — and,
// under clipping, θ and the threshold — are still the same tensors at the same versions (storage,
// pointer, offset, sizes, strides, dtypes, version counters), which autograd itself guarantees for
// saved tensors.
//
// Why not also reuse σ² across forwards until the optimizer step (keyed on the version counter
// alone): writes through `.data` do not bump the version counter, and torch.autograd.gradcheck
// perturbs its inputs exactly that way; a version-keyed cache would serve it a stale σ².
struct TensorKey {
  const c10::StorageImpl* storage = nullptr;  // compared only while the entry's std is alive
  const void* data = nullptr;
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  int64_t version = -1;

  static TensorKey of(const at::Tensor& t) {
    return {t.storage().unsafeGetStorageImpl(), t.data_ptr(), t.storage_offset(), t.sizes().vec(),
            t.strides().vec(), t.scalar_type(), t._version()};
  }
  bool matches(const at::Tensor& t) const {
    return storage == t.storage().unsafeGetStorageImpl() && data == t.data_ptr() && offset == t.storage_offset() &&
           dtype == t.scalar_type() && version == t._version() && t.sizes().equals(sizes) &&
           t.strides().equals(strides);
  }
};

struct Sigma2Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> std_storage{
      c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>())};
  const void* std_data = nullptr;
  TensorKey ls2, weight;  // weight: clipped entries only
  at::ScalarType dst = at::kFloat;
  c10::optional<double> clip;
  Weights value;
};

struct Sigma2Cache {
  static constexpr size_t kMaxEntries = 64;  // live forward-backward pairs (layers x micro-batches)
  std::mutex mu;
  std::vector<Sigma2Entry> entries;
  int64_t hits = 0, misses = 0;
  bool enabled = true;
};

Sigma2Cache& sigma2_cache() {
  static Sigma2Cache* cache = new Sigma2Cache();  // leaked: no destruction order issue at exit
  return *cache;
}

bool cacheable(const at::Tensor& t) { return t.has_storage() && !t.is_inference(); }

}  // namespace

// Files the forward's σ² pass under its std output.
void weights_remember(const at::Tensor& std_out, const at::Tensor& weight, const at::Tensor& log_sigma2,
                      at::ScalarType ct, const c10::optional<double>& clip, const Weights& value) {
  if (!cacheable(std_out) || !cacheable(log_sigma2) || (clip.has_value() && !cacheable(weight))) return;
  Sigma2Cache& cache = sigma2_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  if (!cache.enabled) return;
  auto& v = cache.entries;
  v.erase(std::remove_if(v.begin(), v.end(), [](const Sigma2Entry& e) { return e.std_storage.expired(); }),
          v.end());
  if (v.size() >= Sigma2Cache::kMaxEntries) v.erase(v.begin());  // the oldest
  Sigma2Entry e;
  e.std_storage = std_out.storage().getWeakStorageImpl();
  e.std_data = std_out.data_ptr();
  e.ls2 = TensorKey::of(log_sigma2);
  if (clip.has_value()) e.weight = TensorKey::of(weight);
  e.dst = ct;
  e.clip = clip;
  e.value = value;
  v.push_back(std::move(e));
}

// The σ² pass for the backward that received `std`: the forward's, or run afresh.
Weights weights_for_backward(const at::Tensor& std, const at::Tensor& weight, const at::Tensor& log_sigma2,
                             at::ScalarType ct, const c10::optional<double>& clip, Reduced reduced,
                             int64_t rows_of_x) {
  if (cacheable(std) && cacheable(log_sigma2) && (!clip.has_value() || cacheable(weight))) {
    Sigma2Cache& cache = sigma2_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    if (cache.enabled) {
      for (const auto& e : cache.entries) {
        if (!e.std_storage.expired() && e.std_storage._unsafe_get_target() == std.storage().unsafeGetStorageImpl() &&
            e.std_data == std.data_ptr() && e.dst == ct && e.clip == clip && e.ls2.matches(log_sigma2) &&
            (!clip.has_value() || e.weight.matches(weight))) {
          ++cache.hits;
          return e.value;
        }
      }
      ++cache.misses;
    }
  }
  return weights_pass(weight, log_sigma2, ct, clip, reduced, rows_of_x);
}

// Switches the cache on or off (off: every backward reruns the σ² pass); clears it and its counters.
bool set_sigma2_cache(bool enabled) {
  Sigma2Cache& cache = sigma2_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  const bool previous = cache.enabled;
  cache.enabled = enabled;
  cache.entries.clear();
  cache.hits = cache.misses = 0;
  return previous;
}

std::vector<int64_t> sigma2_cache_stats() {
  Sigma2Cache& cache = sigma2_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  return {cache.hits, cache.misses, static_cast<int64_t>(cache.entries.size())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_epilogue(
    at::Tensor gw, at::Tensor t3, at::Tensor t1, const at::Tensor& t2, const at::Tensor& xk, const at::Tensor& gb,
    const Weights& p, const at::Tensor& s2k, int64_t in_size, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& log_sigma2, bool input_grad) {
  if (p.clip) {
    clip_grads_(gw, t3, p.compact ? p.statec : p.state, s2k);
  } else {
    mul_(t3, s2k);
  }
  if (p.compact) {
    gw = scatter_block(gw, p, weight.sizes());
    t3 = scatter_block(t3, p, weight.sizes());
  }
  at::Tensor gx;
  if (input_grad) {
    add_2x_mul_(t1, xk, t2);
    if (p.compact) t1 = scatter_dim(t1, 1, p.cols, in_size);
    gx = to_dtype(t1, x.scalar_type()).view(x.sizes());
  } else {
    gx = at::empty({0}, x.options());
  }
  return {gx, to_dtype(gw, weight.scalar_type()), to_dtype(t3, log_sigma2.scalar_type()), gb};
}

// ------------------------------------------------------------------------------------ test hook
// The occupancy of the σ² pass: weight / log_sigma2 (R, S) or (R, S, kH, kW), a finite threshold
//   -> (per-row counts (R,), per-column counts (S,)), int64: the weights of each row / column of θ
//   that are kept (m = 1 of sparsevd.ops.weights.clip_mask) or dropped but non-finite (θ·0 or σ²·0
//   NaN), computed in the compute dtype of the parameters (fp32, or fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> clip_occupancy(const at::Tensor& weight, const at::Tensor& log_sigma2,
                                                  double clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_param(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 4, "weight: expected a 2-D or 4-D tensor, got shape ",
              weight.sizes());
  check_weights(weight, log_sigma2, weight.dim());
  check_clip(clip);
  const at::ScalarType ct = compute_type(at::promote_types(weight.scalar_type(), log_sigma2.scalar_type()));
  const Weights p = weights_pass(weight, log_sigma2, ct, clip, Reduced::kNone, 0);
  return {p.row_count, p.col_count};
}

// ------------------------------------------------------------------------------------ controls
std::string set_products(const std::string& mode) {
  return mode_name(product_mode().exchange(parse_mode(mode)));
}
std::string set_compact(const std::string& mode) {
  return compact_name(compact_mode().exchange(parse_compact(mode)));
}

}  // namespace lrt
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("native_clip_occupancy", &sparsevd::cpu::lrt::clip_occupancy); }
