// The native CPU kernels of the op family lrt_linear: native_lrt_linear and native_lrt_linear_backward
// (schemas in csrc/ops.cpp), the products through ATen's GEMM or, under train-time clipping, on the
// occupied block or the CSR of the kept weights, every elementwise step in the fused passes of
// lrt_common.h, which also states the plan. The Python side: sparsevd/ops/lrt_linear/native.py.
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <vector>

#include "csr_linear_cpu.h"
#include "lrt_common.h"
#include "denormals.h"

namespace sparsevd {
namespace cpu {
namespace {

using namespace lrt;

// x (*, K), weight / log_sigma2 (N, K), bias (N,) or None, seed (1,) int64, clip_threshold None or
// a finite log α threshold -> y (*, N) in x's dtype, std (*, N) in promote(x, weight).
std::tuple<at::Tensor, at::Tensor> lrt_linear(const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& log_sigma2, const c10::optional<at::Tensor>& bias,
                                              const at::Tensor& seed, c10::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_weights(weight, log_sigma2, 2);
  check_param(x, "x");
  check_clip(clip);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x: expected shape (*, in_features=", K, "), got ", x.sizes());
  const philox::Key key(seed_value(seed));
  const at::ScalarType dt = at::promote_types(x.scalar_type(), weight.scalar_type());
  const at::ScalarType ct = compute_type(dt);
  const int64_t M = leading_rows(x);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;

  const at::Tensor xc = as_compute(x.reshape({M, K}), ct);  // (M, K)
  const Weights p = weights_pass(weight, log_sigma2, ct, clip, Reduced::kBlocksOrSparse, M);
  const at::Tensor b = check_bias(bias, N, ct);
  at::Tensor mu, s2;
  if (p.sparse) {  // (M, K) x CSR (N, K)ᵀ
    mu = csr_linear_cpu(xc, p.crow, p.col, p.wv, c10::nullopt);
    s2 = csr_linear_cpu(square_of(xc), p.crow, p.col, p.s2v, c10::nullopt);
  } else if (p.compact) {  // (M, Ka) x (Na, Ka)ᵀ, scattered to the occupied columns of (M, N)
    const at::Tensor xg = p.all_cols() ? xc : xc.index_select(1, p.cols);
    const at::Tensor x2g = square_of(xg);
    at::Tensor mu_c = at::empty({M, p.rows.size(0)}, xc.options());
    at::Tensor s2_c = at::empty({M, p.rows.size(0)}, xc.options());
    run_products({[&] { at::mm_out(mu_c, xg, p.wc.t()); }, [&] { at::mm_out(s2_c, x2g, p.s2c.t()); }}, true);
    mu = scatter_dim(mu_c, 1, p.rows, N);
    s2 = scatter_dim(s2_c, 1, p.rows, N);
  } else {
    const at::Tensor w = p.clip ? p.w : as_compute(weight, ct);  // (N, K): θ ⊙ m or θ
    const at::Tensor x2 = square_of(xc);                          // (M, K)
    mu = at::empty({M, N}, xc.options());
    s2 = at::empty({M, N}, xc.options());
    run_products({[&] { at::mm_out(mu, xc, w.t()); }, [&] { at::mm_out(s2, x2, p.s2.t()); }}, true);
  }
  forward_epilogue(mu, s2, b, N, 1, key);  // mu -> y, s2 -> std
  at::Tensor sd = to_dtype(s2, dt).view(out_shape);
  weights_remember(sd, weight, log_sigma2, ct, clip, p);
  return {to_dtype(mu, x.scalar_type()).view(out_shape), sd};
}

// grad, std (*, N); x (*, K); weight / log_sigma2 (N, K); clip_threshold the forward's
//   -> (∂x (*, K) in x's dtype, or an empty tensor when !input_grad; ∂θ, ∂log σ² (N, K); ∂b (N,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrt_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
    const at::Tensor& std, const at::Tensor& seed, bool input_grad, c10::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_weights(weight, log_sigma2, 2);
  check_param(x, "x");
  check_param(grad, "grad");
  check_param(std, "std");
  check_clip(clip);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x: expected shape (*, in_features=", K, "), got ", x.sizes());
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = N;
  TORCH_CHECK(std.sizes().equals(y_shape), "std: expected shape ", at::IntArrayRef(y_shape), ", got ", std.sizes());
  TORCH_CHECK(grad.sizes().equals(y_shape), "grad: expected shape ", at::IntArrayRef(y_shape), ", got ", grad.sizes());
  const philox::Key key(seed_value(seed));
  const at::ScalarType ct = compute_type(std.scalar_type());
  const int64_t M = leading_rows(x);

  const at::Tensor g = as_compute(grad.reshape({M, N}), ct);
  const at::Tensor sd = as_compute(std.reshape({M, N}), ct);
  auto [gs2, gb] = backward_prologue(g, sd, N, 1, key, weight.scalar_type());
  const at::Tensor xc = as_compute(x.reshape({M, K}), ct);
  const Weights p = weights_for_backward(std, weight, log_sigma2, ct, clip, Reduced::kBlocksOrSparse, M);
  if (p.sparse) {
    at::Tensor gw = at::empty({N, K}, xc.options());
    at::Tensor t3 = at::empty({N, K}, xc.options());
    {
      const int64_t ld = (M + 7) / 8 * 8;  // clip_sddmm's rows: whole vectors
      const at::Tensor gT = transposed(g, ld), gs2T = transposed(gs2, ld), xT = transposed(xc, ld);
      AT_DISPATCH_FLOATING_TYPES(ct, "sparsevd_clip_sddmm", [&] {
        const auto& k = elementwise<scalar_t>();
        const int64_t* crow = p.crow.data_ptr<int64_t>();
        const int64_t work = std::max<int64_t>(1, (p.col.size(0) * M + N * K) / std::max<int64_t>(N, 1));
        parallel_range(N, std::max<int64_t>(1, kGrainPlain / work), [&](int64_t r0, int64_t r1) {
          k.clip_sddmm(gT.data_ptr<scalar_t>(), gs2T.data_ptr<scalar_t>(), xT.data_ptr<scalar_t>(), ld, K, crow,
                       p.col.data_ptr<int32_t>(), p.keep.data_ptr<uint8_t>(), p.s2v.data_ptr<scalar_t>(),
                       gw.data_ptr<scalar_t>(), t3.data_ptr<scalar_t>(), r0, r1);
        });
      });
    }
    at::Tensor gx = at::empty({0}, x.options());
    if (input_grad) {
      const TransposedCsr t = transpose_csr(p);
      at::Tensor t1 = csr_linear_cpu(g, t.ptr, t.row, t.wv, c10::nullopt);      // g θm   (M, K)
      const at::Tensor t2 = csr_linear_cpu(gs2, t.ptr, t.row, t.s2v, c10::nullopt);  // g_s2 σ²m
      add_2x_mul_(t1, xc, t2);  // ∂x = g θm + 2x ⊙ (g_s2 σ²m)
      gx = to_dtype(t1, x.scalar_type()).view(x.sizes());
    }
    return {gx, to_dtype(gw, weight.scalar_type()), to_dtype(t3, log_sigma2.scalar_type()), gb};
  }
  // The products on the occupied block (compact) or on everything: rows of θ (n), columns (k).
  const at::Tensor gn = !p.compact || p.all_rows() ? g : g.index_select(1, p.rows);        // (M, n)
  const at::Tensor gs2n = !p.compact || p.all_rows() ? gs2 : gs2.index_select(1, p.rows);  // (M, n)
  const at::Tensor xk = !p.compact || p.all_cols() ? xc : xc.index_select(1, p.cols);      // (M, k)
  const at::Tensor x2k = square_of(xk);
  const at::Tensor wk = p.compact ? p.wc : p.clip ? p.w : at::Tensor();
  const at::Tensor s2k = p.compact ? p.s2c : p.s2;
  const int64_t n = gn.size(1), k = xk.size(1);
  at::Tensor gw = at::empty({n, k}, xc.options());
  at::Tensor t3 = at::empty({n, k}, xc.options());
  std::vector<std::function<void()>> jobs = {[&] { at::mm_out(gw, gn.t(), xk); },
                                             [&] { at::mm_out(t3, gs2n.t(), x2k); }};
  at::Tensor t1, t2, w;
  if (input_grad) {
    w = wk.defined() ? wk : as_compute(weight, ct);
    t1 = at::empty({M, k}, xc.options());
    t2 = at::empty({M, k}, xc.options());
    jobs.push_back([&] { at::mm_out(t1, gn, w); });
    jobs.push_back([&] { at::mm_out(t2, gs2n, s2k); });
  }
  run_products(jobs, true);
  // ∂θ (⊙ m), ∂log σ² = σ²(m) ⊙ (g_s2ᵀ x2), ∂x = g θ + 2x ⊙ (g_s2 σ²)
  return backward_epilogue(gw, t3, t1, t2, xk, gb, p, s2k, K, x, weight, log_sigma2, input_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("native_lrt_linear", &sparsevd::cpu::lrt_linear);
  m.impl("native_lrt_linear_backward", &sparsevd::cpu::lrt_linear_backward);
}
