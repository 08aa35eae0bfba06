// The native CPU kernels of the op family lrt_conv2d: native_lrt_conv2d and native_lrt_conv2d_backward
// (schemas in csrc/ops.cpp), the convolutions through oneDNN (at::convolution,
// at::convolution_backward) or, under train-time clipping with groups = 1, on the occupied channels,
// every elementwise step in the fused passes of lrt_common.h, which also states the plan. The
// kernels take symmetric padding [p_h, p_w]; the Python side (sparsevd/ops/lrt_conv2d/native.py)
// pads x explicitly for per-side padding.
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "lrt_common.h"
#include "denormals.h"

namespace sparsevd {
namespace cpu {
namespace {

using namespace lrt;

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

ConvArgs check_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  check_param(x, "x");
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride: expected two values >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding: expected two values >= 0, got ",
              padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "dilation: expected two values >= 1, got ", dilation);
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "groups: expected a positive divisor of out_channels=",
              weight.size(0), ", got ", groups);
  TORCH_CHECK(x.dim() == 4 && x.size(1) == weight.size(1) * groups, "x: expected shape (N, in_channels=",
              weight.size(1) * groups, ", H, W), got ", x.sizes());
  for (int d = 0; d < 2; ++d) {
    const int64_t eff = dilation[d] * (weight.size(2 + d) - 1) + 1;
    TORCH_CHECK(x.size(2 + d) + 2 * padding[d] >= eff, "x: spatial size ", x.sizes(), " is smaller than the ",
                "dilated kernel ", weight.sizes(), " with padding ", padding);
  }
  return {stride.vec(), padding.vec(), dilation.vec(), groups};
}

std::vector<int64_t> conv_out_shape(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& a) {
  std::vector<int64_t> s = {x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d)
    s[2 + d] = (x.size(2 + d) + 2 * a.padding[d] - a.dilation[d] * (weight.size(2 + d) - 1) - 1) / a.stride[d] + 1;
  return s;
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const ConvArgs& a) {
  return at::convolution(x, w, c10::nullopt, a.stride, a.padding, a.dilation, false, {0, 0}, a.groups).contiguous();
}

// x (B, C_in, H, W), weight / log_sigma2 (C_out, C_in / groups, kH, kW), bias (C_out,) or None,
// clip_threshold None or a finite log α threshold
//   -> y, std (B, C_out, H_out, W_out); y in x's dtype, std in promote(x, weight).
std::tuple<at::Tensor, at::Tensor> lrt_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& log_sigma2, const c10::optional<at::Tensor>& bias,
                                              const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups, c10::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_weights(weight, log_sigma2, 4);
  const ConvArgs a = check_conv(x, weight, stride, padding, dilation, groups);
  check_clip(clip);
  const philox::Key key(seed_value(seed));
  const at::ScalarType dt = at::promote_types(x.scalar_type(), weight.scalar_type());
  const at::ScalarType ct = compute_type(dt);
  const int64_t C = weight.size(0);
  const std::vector<int64_t> out_shape = conv_out_shape(x, weight, a);

  const at::Tensor xc = as_compute(x, ct);
  const Weights p = weights_pass(weight, log_sigma2, ct, clip, groups == 1 ? Reduced::kBlocks : Reduced::kNone,
                                 kNoRowLimit);
  const at::Tensor b = check_bias(bias, C, ct);
  // The products on the occupied channels (compact) or on all of them.
  const at::Tensor xk = !p.compact || p.all_cols() ? xc : xc.index_select(1, p.cols);  // (B, k, H, W)
  const at::Tensor wk = p.compact ? p.wc : p.clip ? p.w : as_compute(weight, ct);       // (n, k, kH, kW)
  const at::Tensor s2k = p.compact ? p.s2c : p.s2;
  at::Tensor mu, s2;
  if (xk.numel() == 0 || wk.numel() == 0) {  // oneDNN rejects empty operands; the products are zero
    std::vector<int64_t> shape = out_shape;
    shape[1] = wk.size(0);
    mu = at::zeros(shape, xc.options());
    s2 = at::zeros(shape, xc.options());
  } else {
    const at::Tensor x2k = square_of(xk);
    run_products({[&] { mu = conv(xk, wk, a); }, [&] { s2 = conv(x2k, s2k, a); }}, false);
  }
  if (p.compact) {
    mu = scatter_dim(mu, 1, p.rows, C);
    s2 = scatter_dim(s2, 1, p.rows, C);
  }
  TORCH_CHECK(mu.sizes().equals(out_shape), "lrt_conv2d: internal shape mismatch ", mu.sizes());
  forward_epilogue(mu, s2, b, C, out_shape[2] * out_shape[3], key);
  at::Tensor sd = to_dtype(s2, dt);
  weights_remember(sd, weight, log_sigma2, ct, clip, p);
  return {to_dtype(mu, x.scalar_type()), sd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrt_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
    const at::Tensor& std, const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool input_grad, c10::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_weights(weight, log_sigma2, 4);
  const ConvArgs a = check_conv(x, weight, stride, padding, dilation, groups);
  check_param(grad, "grad");
  check_param(std, "std");
  check_clip(clip);
  const std::vector<int64_t> y_shape = conv_out_shape(x, weight, a);
  TORCH_CHECK(std.sizes().equals(y_shape), "std: expected shape ", at::IntArrayRef(y_shape), ", got ", std.sizes());
  TORCH_CHECK(grad.sizes().equals(y_shape), "grad: expected shape ", at::IntArrayRef(y_shape), ", got ", grad.sizes());
  const philox::Key key(seed_value(seed));
  const at::ScalarType ct = compute_type(std.scalar_type());
  const int64_t C = weight.size(0), C_in = x.size(1);

  const at::Tensor g = as_compute(grad, ct);
  const at::Tensor sd = as_compute(std, ct);
  auto [gs2, gb] = backward_prologue(g, sd, C, y_shape[2] * y_shape[3], key, weight.scalar_type());
  const at::Tensor xc = as_compute(x, ct);
  const Weights p = weights_for_backward(std, weight, log_sigma2, ct, clip,
                                         groups == 1 ? Reduced::kBlocks : Reduced::kNone, kNoRowLimit);
  // The products on the occupied channels (compact) or on all of them.
  const at::Tensor gn = !p.compact || p.all_rows() ? g : g.index_select(1, p.rows);        // (B, n, Ho, Wo)
  const at::Tensor gs2n = !p.compact || p.all_rows() ? gs2 : gs2.index_select(1, p.rows);
  const at::Tensor xk = !p.compact || p.all_cols() ? xc : xc.index_select(1, p.cols);      // (B, k, H, W)
  const at::Tensor wk = p.compact ? p.wc : p.clip ? p.w : as_compute(weight, ct);           // (n, k, kH, kW)
  const at::Tensor s2k = p.compact ? p.s2c : p.s2;
  at::Tensor t1, gw, t2, t3;
  if (xk.numel() == 0 || wk.numel() == 0 || gn.numel() == 0) {  // empty operands: all products are zero
    t1 = at::zeros_like(xk);
    t2 = at::zeros_like(xk);
    gw = at::zeros_like(wk);
    t3 = at::zeros_like(wk);
  } else {
    const at::Tensor x2k = square_of(xk);
    const std::array<bool, 3> mask = {input_grad, true, false};
    auto back = [&](const at::Tensor& go, const at::Tensor& in, const at::Tensor& wt, at::Tensor& gin,
                    at::Tensor& gwt) {
      auto r = at::convolution_backward(go, in, wt, c10::nullopt, a.stride, a.padding, a.dilation, false, {0, 0},
                                        a.groups, mask);
      if (input_grad) gin = std::get<0>(r).contiguous();
      gwt = std::get<1>(r).contiguous();
    };
    run_products({[&] { back(gn, xk, wk, t1, gw); }, [&] { back(gs2n, x2k, s2k, t2, t3); }}, false);
  }
  // ∂θ (⊙ m), ∂log σ² = σ²(m) ⊙ conv_weight_grad(x2, g_s2),
  // ∂x = conv_input_grad(θ, g) + 2x ⊙ conv_input_grad(σ², g_s2)
  return backward_epilogue(gw, t3, t1, t2, xk, gb, p, s2k, C_in, x, weight, log_sigma2, input_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("native_lrt_conv2d", &sparsevd::cpu::lrt_conv2d);
  m.impl("native_lrt_conv2d_backward", &sparsevd::cpu::lrt_conv2d_backward);
}
