// sparsevd::native_kl_sparse_vd(weights, log_sigma2s, with_grad, thresholds=None) -> (kl, grads_weight,
// grads_log_sigma2, nonfinite, kept): the `native` CPU backend of sparsevd::kl_sparse_vd and
// kl_sparse_vd_kept (sparsevd/ops/kl/), with the return convention of its naive math
// (sparsevd/ops/kl/naive.py) plus a per-layer flag vector.
//
// Math (eq. 14 of Molchanov et al. 2017; the fp64 spec is sparsevd/ops/kl/naive.py, _kl_terms), per weight:
//   raw = log σ² − log(θ² + 1e-8),  la = clamp(raw, −10, 10),  z = k2 + k3·la,
//   KL = k1·σ(−z) + ½·log1p(e^{−la})                  (= −(k1 σ(z) − ½ softplus(−la) − k1), no cancellation)
//   ∂KL/∂log σ² = ∂la = −(k1 k3 σ(z)σ(−z) + ½ σ(−la)) · [−10 < raw < 10]
//   ∂KL/∂θ     = ∂la · (−2θ / (θ² + 1e-8))
// ONE pass over all layers: every θ and log σ² is read once and both gradients written once
// (16 B per fp32 weight with gradients, 8 B without). The pass also reports, per layer, whether
// some θ or log σ² is NaN or ±inf (`nonfinite`, a (num_layers,) bool tensor), so no separate
// isnan() reduction or per-layer host sync is needed. With `thresholds` (one per layer) it also
// counts, per layer, the weights kept at evaluation (`kept`, int64 (num_layers,); empty without):
// log α < threshold, or θ / e^{log σ²} not finite (the rule of sparsevd.functional.kept_count),
// from the log α the KL computes anyway (a compare and a popcount per vector: issue 23 item 7).
//
// fp32 runs the vectorized kernel of simd/kl_vec.h (own log/exp polynomials, ~1 ulp; one reciprocal
// for 1/(1+e^{−z}), 1/(1+e^{−la}) and the log1p correction, one for 1/(θ²+1e-8)), fp64 the C
// library's functions; bf16/fp16 parameters are computed in fp32 and the gradients rounded once.
// The sum is accumulated per chunk in fp64 and the chunks are added in a fixed order: the result
// does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "denormals.h"
#include "kernels.h"

namespace sparsevd {
namespace cpu {
namespace {

constexpr int64_t kBlock = 16384;          // weights per chunk (one task of the parallel loop)
constexpr int64_t kParallelMin = 65536;    // fewer weights in all: one thread

struct Chunk {
  int64_t layer, begin, end;
};

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> kl_sparse_vd(
    at::TensorList weights, at::TensorList log_sigma2s, bool with_grad, std::optional<at::ArrayRef<double>> thresholds) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // casts stay casts
  TORCH_CHECK(weights.size() == log_sigma2s.size(), "log_sigma2s: expected ", weights.size(),
              " tensors (one per weight), got ", log_sigma2s.size());
  const int64_t L = static_cast<int64_t>(weights.size());
  const bool count = thresholds.has_value();
  if (count) {
    TORCH_CHECK(static_cast<int64_t>(thresholds->size()) == L, "thresholds: expected ", L,
                " values (one per weight), got ", thresholds->size());
    for (int64_t i = 0; i < L; ++i)
      TORCH_CHECK(std::isfinite((*thresholds)[i]), "thresholds[", i, "]: expected a finite value, got ",
                  (*thresholds)[i]);
  }
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& s = log_sigma2s[i];
    TORCH_CHECK(w.device().is_cpu() && s.device().is_cpu(), "weights[", i, "], log_sigma2s[", i,
                "]: expected CPU tensors, got ", w.device(), " and ", s.device());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "weights[", i, "]: expected a floating-point tensor, got ",
                w.scalar_type());
    TORCH_CHECK(s.scalar_type() == w.scalar_type(), "log_sigma2s[", i, "]: expected dtype ", w.scalar_type(),
                " (the dtype of weights[", i, "]), got ", s.scalar_type());
    TORCH_CHECK(s.sizes() == w.sizes(), "log_sigma2s[", i, "]: expected shape ", w.sizes(),
                " (the shape of weights[", i, "]), got ", s.sizes());
  }
  const at::ScalarType kl_dtype =
      L == 0 ? at::kFloat : at::promote_types(weights[0].scalar_type(), at::kFloat);

  // Contiguous compute-dtype views (copies only for bf16/fp16 or strided parameters).
  std::vector<at::Tensor> wc(L), lc(L), gwc(L), glc(L);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t i = 0; i < L; ++i) {
    const at::ScalarType ct = weights[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    wc[i] = weights[i].to(ct).contiguous();
    lc[i] = log_sigma2s[i].to(ct).contiguous();
    if (with_grad) {
      gwc[i] = at::empty(wc[i].sizes(), wc[i].options());
      glc[i] = at::empty(wc[i].sizes(), wc[i].options());
    }
    const int64_t n = wc[i].numel();
    for (int64_t b = 0; b < n; b += kBlock) chunks.push_back({i, b, std::min(n, b + kBlock)});
    total += n;
  }

  std::vector<double> sums(chunks.size(), 0.0);
  std::vector<uint8_t> bad(chunks.size(), 0);
  std::vector<int64_t> kept(chunks.size(), 0);
  auto run = [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t n = ch.end - ch.begin;
      KlPartial r;
      if (wc[ch.layer].scalar_type() == at::kDouble) {
        const double thr = count ? (*thresholds)[ch.layer] : 0.0;
        double* gw = with_grad ? gwc[ch.layer].data_ptr<double>() + ch.begin : nullptr;
        double* gl = with_grad ? glc[ch.layer].data_ptr<double>() + ch.begin : nullptr;
        r = kernels().f64.kl(wc[ch.layer].data_ptr<double>() + ch.begin, lc[ch.layer].data_ptr<double>() + ch.begin,
                             gw, gl, n, count ? &thr : nullptr);
      } else {
        // the threshold rounded to fp32, as torch rounds the scalar of a comparison with an fp32 tensor
        const float thr = count ? static_cast<float>((*thresholds)[ch.layer]) : 0.0f;
        float* gw = with_grad ? gwc[ch.layer].data_ptr<float>() + ch.begin : nullptr;
        float* gl = with_grad ? glc[ch.layer].data_ptr<float>() + ch.begin : nullptr;
        r = kernels().f32.kl(wc[ch.layer].data_ptr<float>() + ch.begin, lc[ch.layer].data_ptr<float>() + ch.begin,
                             gw, gl, n, count ? &thr : nullptr);
      }
      sums[c] = r.sum;
      kept[c] = r.kept;
      bad[c] = r.nonfinite ? 1 : 0;
    }
  };
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (total < kParallelMin || at::get_num_threads() == 1 || at::in_parallel_region()) {
    run(0, nchunks);
  } else {
    at::parallel_for(0, nchunks, 1, flushing_task(run));
  }

  double kl = 0.0;
  at::Tensor nonfinite = at::zeros({L}, at::TensorOptions().dtype(at::kBool));
  bool* flags = nonfinite.data_ptr<bool>();
  at::Tensor kept_out = at::zeros({count ? L : 0}, at::TensorOptions().dtype(at::kLong));
  int64_t* kept_per_layer = kept_out.data_ptr<int64_t>();
  for (int64_t c = 0; c < nchunks; ++c) {
    kl += sums[c];
    flags[chunks[c].layer] |= bad[c] != 0;
    if (count) kept_per_layer[chunks[c].layer] += kept[c];
  }

  std::vector<at::Tensor> gw_out, gl_out;
  if (with_grad) {
    for (int64_t i = 0; i < L; ++i) {
      // In the parameter's dtype and, like the reference's elementwise result, its strides.
      auto finish = [&](const at::Tensor& g, const at::Tensor& like) {
        if (like.is_contiguous() && g.scalar_type() == like.scalar_type()) return g;
        return at::empty_like(like).copy_(g);
      };
      gw_out.push_back(finish(gwc[i], weights[i]));
      gl_out.push_back(finish(glc[i], log_sigma2s[i]));
    }
  }
  return {at::scalar_tensor(kl, at::TensorOptions().dtype(kl_dtype)), gw_out, gl_out, nonfinite, kept_out};
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("native_kl_sparse_vd", &sparsevd::cpu::kl_sparse_vd); }
