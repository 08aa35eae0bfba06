// Eager-mode autograd of the native backend: sparsevd::native_lrt_linear_autograd,
// native_lrt_conv2d_autograd and native_kl_sparse_vd_autograd are the training forward of the
// LRT layers and the KL with their backward in C++ (torch::autograd::Function), so that an eager
// CPU step runs no Python between the layers' kernels (schemas in csrc/ops.cpp; one section per op
// family below). The Python custom ops (sparsevd/ops/<family>/op.py) stay the entry point for torch.compile, dispatch modes and functorch; both paths
// run the same kernels (native_lrt_linear[_backward], native_lrt_conv2d[_backward],
// native_kl_sparse_vd of lrt_linear_cpu.cpp, lrt_conv2d_cpu.cpp and kl_cpu.cpp) and give bit-identical results.
//
// Saved for backward: x, θ, log σ², std and the seed, as the custom ops save them (ξ is
// regenerated from the seed; σ² comes from the cache of lrt_common_cpu.cpp, keyed on std). The KL saves its
// gradients, computed in the forward's pass; its backward scales them by the incoming gradient and
// returns them as they are when that gradient is 1 (the SGVLB's β = 1 after the warm-up).
// The backward ops are not differentiable: with create_graph=True their results carry an autograd
// node that raises when differentiated (what torch's once_differentiable does).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "denormals.h"

namespace sparsevd {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using LinearFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const std::optional<at::Tensor>&, const at::Tensor&,
                                                        std::optional<double>);
using LinearBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, std::optional<double>);
using ConvFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, const at::Tensor&,
                                                      at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                                      std::optional<double>);
using ConvBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, std::optional<double>);
using KlSig = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    at::TensorList, at::TensorList, bool, std::optional<at::ArrayRef<double>>);

const c10::TypedOperatorHandle<LinearFwdSig>& linear_fwd() {
  static const auto op = native_op<LinearFwdSig>("sparsevd::native_lrt_linear");
  return op;
}
const c10::TypedOperatorHandle<LinearBwdSig>& linear_bwd() {
  static const auto op = native_op<LinearBwdSig>("sparsevd::native_lrt_linear_backward");
  return op;
}
const c10::TypedOperatorHandle<ConvFwdSig>& conv_fwd() {
  static const auto op = native_op<ConvFwdSig>("sparsevd::native_lrt_conv2d");
  return op;
}
const c10::TypedOperatorHandle<ConvBwdSig>& conv_bwd() {
  static const auto op = native_op<ConvBwdSig>("sparsevd::native_lrt_conv2d_backward");
  return op;
}
const c10::TypedOperatorHandle<KlSig>& kl_op() {
  static const auto op = native_op<KlSig>("sparsevd::native_kl_sparse_vd");
  return op;
}

std::optional<double> clip_of(AutogradContext* ctx) {
  const c10::IValue& v = ctx->saved_data["clip"];
  return v.isNone() ? std::nullopt : std::optional<double>(v.toDouble());
}

bool any_requires_grad(std::initializer_list<const variable_list*> lists) {
  for (const auto* list : lists) {
    for (const auto& t : *list) {
      if (t.defined() && t.requires_grad()) return true;
    }
  }
  return false;
}

// The backward's results, made to raise if differentiated again: with create_graph=True (grad mode
// on in the backward) and an input of the backward that requires grad.
variable_list once_differentiable(variable_list grads, bool inputs_require_grad) {
  if (!at::GradMode::is_enabled() || !inputs_require_grad) return grads;
  torch::autograd::DelayedError err(
      "sparsevd: the native LRT and KL backward is not differentiable (no double backward); "
      "the plain-PyTorch functions of sparsevd.reference differentiate twice",
      static_cast<int64_t>(grads.size()));
  variable_list inputs;
  for (const auto& g : grads) inputs.push_back(g.defined() ? g.detach().requires_grad_(true) : g);
  return err.apply(std::move(inputs));
}

// ------------------------------------------------------------------------------------ linear
struct LrtLinearFn : public torch::autograd::Function<LrtLinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& log_sigma2, const std::optional<at::Tensor>& bias,
                            const at::Tensor& seed, std::optional<double> clip) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, sd] = linear_fwd().call(x, weight, log_sigma2, bias, seed, clip);
    ctx->save_for_backward({x, weight, log_sigma2, sd, seed});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["clip"] = clip.has_value() ? c10::IValue(*clip) : c10::IValue();
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (!grads[0].defined()) return variable_list(6);
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    variable_list out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [gx, gw, gls2, gb] =
          linear_bwd().call(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], need_x,
                            clip_of(ctx));
      out = {need_x ? gx : at::Tensor(), gw, gls2, has_bias ? gb : at::Tensor()};
    }
    out = once_differentiable(std::move(out), any_requires_grad({&grads, &saved}));
    out.resize(6);  // no gradient for the seed and the threshold
    return out;
  }
};

at::Tensor lrt_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
                               const std::optional<at::Tensor>& bias, const at::Tensor& seed,
                               std::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  return LrtLinearFn::apply(x, weight, log_sigma2, bias, seed, clip);
}

at::Tensor lrt_linear_inference(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
                                const std::optional<at::Tensor>& bias, const at::Tensor& seed,
                                std::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  return std::get<0>(linear_fwd().call(x, weight, log_sigma2, bias, seed, clip));
}

// ------------------------------------------------------------------------------------ conv2d
// The layout of y and std, in which the backward takes its grad: channels_last when x or θ is laid
// out channels_last (and not also contiguous), else contiguous (sparsevd/ops/conv_geometry.py,
// conv_memory_format).
at::MemoryFormat conv_memory_format(const at::Tensor& x, const at::Tensor& weight) {
  for (const at::Tensor* t : {&x, &weight}) {
    if (t->dim() == 4 && !t->is_contiguous() && t->is_contiguous(at::MemoryFormat::ChannelsLast)) {
      return at::MemoryFormat::ChannelsLast;
    }
  }
  return at::MemoryFormat::Contiguous;
}

struct LrtConv2dFn : public torch::autograd::Function<LrtConv2dFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& log_sigma2, const std::optional<at::Tensor>& bias,
                            const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, std::optional<double> clip) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, sd] = conv_fwd().call(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip);
    ctx->save_for_backward({x, weight, log_sigma2, sd, seed});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["clip"] = clip.has_value() ? c10::IValue(*clip) : c10::IValue();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (!grads[0].defined()) return variable_list(10);
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const at::Tensor& sd = saved[3];
    const auto fmt = conv_memory_format(saved[0], saved[1]);
    variable_list out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [gx, gw, gls2, gb] = conv_bwd().call(grads[0].contiguous(fmt), saved[0], saved[1], saved[2], sd,
                                                saved[4], stride, padding, dilation, groups, need_x, clip_of(ctx));
      out = {need_x ? gx : at::Tensor(), gw, gls2, has_bias ? gb : at::Tensor()};
    }
    out = once_differentiable(std::move(out), any_requires_grad({&grads, &saved}));
    out.resize(10);  // seed, stride, padding, dilation, groups, threshold
    return out;
  }
};

at::Tensor lrt_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
                               const std::optional<at::Tensor>& bias, const at::Tensor& seed, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               std::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  return LrtConv2dFn::apply(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip);
}

at::Tensor lrt_conv2d_inference(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
                                const std::optional<at::Tensor>& bias, const at::Tensor& seed,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, std::optional<double> clip) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  return std::get<0>(conv_fwd().call(x, weight, log_sigma2, bias, seed, stride, padding, dilation, groups, clip));
}

// ------------------------------------------------------------------------------------ KL
struct KlFn : public torch::autograd::Function<KlFn> {
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, at::TensorList log_sigma2s,
                               bool with_grad, std::optional<std::vector<double>> thresholds) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::optional<at::ArrayRef<double>> thr;
    if (thresholds) thr = at::ArrayRef<double>(*thresholds);
    auto [kl, gw, gls2, flags, kept] = kl_op().call(weights, log_sigma2s, with_grad, thr);
    variable_list saved(gw.begin(), gw.end());
    saved.insert(saved.end(), gls2.begin(), gls2.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_layers"] = static_cast<int64_t>(weights.size());
    ctx->mark_non_differentiable({flags, kept});
    ctx->set_materialize_grads(false);
    return {kl, flags, kept};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t L = ctx->saved_data["num_layers"].toInt();
    const at::Tensor& g = grads[0];
    if (!g.defined()) return variable_list(2 * L + 2);
    variable_list saved = ctx->get_saved_variables();
    TORCH_CHECK(static_cast<int64_t>(saved.size()) == 2 * L, "sparsevd: the KL was computed without gradients");
    variable_list out;
    if (g.dim() == 0 && g.device().is_cpu() && g.item<double>() == 1.0) {
      out = std::move(saved);  // β = 1: the forward's gradients as they are
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = at::_foreach_mul(saved, g);
    }
    out = once_differentiable(std::move(out), true);  // the gradients depend on θ and log σ²
    out.emplace_back();  // with_grad
    out.emplace_back();  // thresholds
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_sparse_vd_autograd(
    at::TensorList weights, at::TensorList log_sigma2s, std::optional<at::ArrayRef<double>> thresholds) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  // The gradients are computed in the forward's pass when some parameter will need them
  // (apply() runs the forward with grad mode off, so this is decided here).
  bool with_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const auto& t : weights) with_grad |= t.requires_grad();
    for (const auto& t : log_sigma2s) with_grad |= t.requires_grad();
  }
  std::optional<std::vector<double>> thr;
  if (thresholds) thr = thresholds->vec();
  const variable_list out = KlFn::apply(weights, log_sigma2s, with_grad, thr);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_sparse_vd_inference(
    at::TensorList weights, at::TensorList log_sigma2s, std::optional<at::ArrayRef<double>> thresholds) {
  const FlushDenormals flush;  // denormals.h: the caller's mode is restored on return
  auto [kl, gw, gls2, flags, kept] = kl_op().call(weights, log_sigma2s, false, thresholds);
  return {kl, flags, kept};
}

}  // namespace
}  // namespace cpu
}  // namespace sparsevd

TORCH_LIBRARY_IMPL(sparsevd, Autograd, m) {
  m.impl("native_lrt_linear_autograd", &sparsevd::cpu::lrt_linear_autograd);
  m.impl("native_lrt_conv2d_autograd", &sparsevd::cpu::lrt_conv2d_autograd);
  m.impl("native_kl_sparse_vd_autograd", &sparsevd::cpu::kl_sparse_vd_autograd);
}

// Below autograd (inference mode): the forward only.
TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("native_lrt_linear_autograd", &sparsevd::cpu::lrt_linear_inference);
  m.impl("native_lrt_conv2d_autograd", &sparsevd::cpu::lrt_conv2d_inference);
  m.impl("native_kl_sparse_vd_autograd", &sparsevd::cpu::kl_sparse_vd_inference);
}
