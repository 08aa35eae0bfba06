// The sparsevd op library: every C++ schema (one TORCH_LIBRARY block) and the Python module
// sparsevd._C.
//
// The kernels register themselves per dispatch key in their own files (TORCH_LIBRARY_IMPL):
// csr_linear (cpu/csr_linear_cpu.cpp, cuda/csr_linear_cuda.cpp), philox_randn_ (cpu/noise_cpu.cpp),
// the native backend of each op family (cpu/lrt_linear_cpu.cpp, cpu/lrt_conv2d_cpu.cpp,
// cpu/kl_cpu.cpp, cpu/lrt_common_cpu.cpp) and its eager autograd (cpu/autograd_cpu.cpp). The ops
// without tensor arguments (the switches for tests and benchmarks) get their kernels here.
//
// The Python side defines its own ops in the same namespace with torch.library.custom_op
// (sparsevd/ops/<family>/op.py: lrt_linear, lrt_conv2d, kl_sparse_vd, log_alpha and the backward
// ops; they must exist without this library), which registers FRAGMENT libraries, so both coexist
// (tests/test_csr_linear.py imports both in either order).
#include <torch/extension.h>

#include <string>

#include "cpu/csr_linear_cpu.h"
#include "cpu/denormals.h"
#include "cpu/kernels.h"
#include "cpu/lrt_common.h"

namespace {

std::string cpu_isa() { return sparsevd::cpu::kernels().isa; }

// The CSR kernels' level (csr_linear_cpu.h) for a kernel set: "avx512" 2, "avx2" 1, "scalar" 0.
int csr_simd_level(const std::string& isa) { return isa == "avx512" ? 2 : isa == "avx2" ? 1 : 0; }

// The one CPU ISA switch: the kernel table of the LRT, KL and noise kernels (cpu/kernels.cpp) and the
// level of the CSR kernels ("avx512": their AVX-512 SpMM, "avx2": AVX2, "scalar": portable code).
// SPARSEVD_CPU_ISA sets it when the library loads.
std::string set_cpu_isa(const std::string& isa) {
  TORCH_CHECK(sparsevd::cpu::isa_supported(isa), "isa: '", isa,
              "' is not one of auto, avx512, avx2, scalar supported by this CPU");
  const std::string previous = sparsevd::cpu::set_isa(isa);
  sparsevd::cpu::set_simd_level(csr_simd_level(sparsevd::cpu::kernels().isa));
  return previous;
}

// The schema's bool[] is a std::vector<bool> in C++ only through c10::List.
c10::List<bool> denormals_flushed_threads() {
  c10::List<bool> out;
  for (bool b : sparsevd::cpu::denormals_flushed_threads()) out.push_back(b);
  return out;
}

}  // namespace

TORCH_LIBRARY(sparsevd, m) {
  // ------------------------------------------------------------------------------- csr_linear
  // The fake (meta) implementation lives in Python, in sparsevd/ops/csr_linear/op.py.
  m.set_python_module("sparsevd.ops.csr_linear.op");
  // y (*, N) = x (*, K) @ W^T + bias with W (N, K) in CSR form (crow (N+1,), col (nnz,), values (nnz,)).
  m.def("csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias) -> Tensor");

  // ------------------------------------------------------------------------------------ noise
  // out[i] = ξ(seed, offset + i), fp32, contiguous CPU tensor (sparsevd/ops/noise.py).
  m.def("philox_randn_(Tensor(a!) out, int seed, int offset=0) -> ()");

  // ---------------------------------------------------------- lrt_linear (native backend)
  // The signatures of sparsevd/ops/lrt_linear/naive.py (input_grad = need_grad_x).
  m.def("native_lrt_linear(Tensor x, Tensor weight, Tensor log_sigma2, Tensor? bias, Tensor seed, "
        "float? clip_threshold=None) -> (Tensor, Tensor)");
  m.def("native_lrt_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor log_sigma2, Tensor std, "
        "Tensor seed, bool input_grad=True, float? clip_threshold=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // y with its backward in C++ (autograd_cpu.cpp), for the eager path of the layers.
  m.def("native_lrt_linear_autograd(Tensor x, Tensor weight, Tensor log_sigma2, Tensor? bias, Tensor seed, "
        "float? clip_threshold=None) -> Tensor");

  // ---------------------------------------------------------- lrt_conv2d (native backend)
  // The signatures of sparsevd/ops/lrt_conv2d/naive.py, padding symmetric [p_h, p_w].
  m.def("native_lrt_conv2d(Tensor x, Tensor weight, Tensor log_sigma2, Tensor? bias, Tensor seed, int[] stride, "
        "int[] padding, int[] dilation, int groups, float? clip_threshold=None) -> (Tensor, Tensor)");
  m.def("native_lrt_conv2d_backward(Tensor grad, Tensor x, Tensor weight, Tensor log_sigma2, Tensor std, "
        "Tensor seed, int[] stride, int[] padding, int[] dilation, int groups, bool input_grad=True, "
        "float? clip_threshold=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("native_lrt_conv2d_autograd(Tensor x, Tensor weight, Tensor log_sigma2, Tensor? bias, Tensor seed, "
        "int[] stride, int[] padding, int[] dilation, int groups, float? clip_threshold=None) -> Tensor");

  // ------------------------------------------------------------------ kl (native backend)
  // (kl, grads_weight, grads_log_sigma2, per-layer non-finite flags, per-layer kept counts: int64,
  // empty without thresholds); sparsevd/ops/kl/naive.py.
  m.def("native_kl_sparse_vd(Tensor[] weights, Tensor[] log_sigma2s, bool with_grad, float[]? thresholds=None) "
        "-> (Tensor, Tensor[], Tensor[], Tensor, Tensor)");
  m.def("native_kl_sparse_vd_autograd(Tensor[] weights, Tensor[] log_sigma2s, float[]? thresholds=None) "
        "-> (Tensor, Tensor, Tensor)");

  // --------------------------------------------------- the LRT weight pass (lrt_common.h)
  // Per-row and per-column counts of the weights a clipped op keeps (a test hook).
  m.def("native_clip_occupancy(Tensor weight, Tensor log_sigma2, float clip_threshold) -> (Tensor, Tensor)");

  // ---------------------------------------------------- switches (catch-all kernels here)
  m.def("native_isa() -> str", &cpu_isa);
  m.def("native_set_isa(str isa) -> str", &set_cpu_isa);
  m.def("native_set_products(str mode) -> str", &sparsevd::cpu::lrt::set_products);
  m.def("native_set_compact(str mode) -> str", &sparsevd::cpu::lrt::set_compact);
  m.def("native_sigma2_cache(bool enabled) -> bool", &sparsevd::cpu::lrt::set_sigma2_cache);
  m.def("native_sigma2_cache_stats() -> int[]", &sparsevd::cpu::lrt::sigma2_cache_stats);
  // Flush-to-zero of subnormals on every intra-op thread (cpu/denormals.h; sparsevd.optim): set or
  // clear, returning the calling thread's previous mode; and the mode per thread (calling one first).
  m.def("native_set_flush_denormal(bool on) -> bool", &sparsevd::cpu::set_flush_denormal_threads);
  m.def("native_denormals_flushed() -> bool[]", &denormals_flushed_threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsevd native op library: registers the C++ ops under torch.ops.sparsevd (CPU, and CUDA when built).";
#ifdef SPARSEVD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // The CSR kernels follow the kernel set SPARSEVD_CPU_ISA chose (the one switch above).
  sparsevd::cpu::set_simd_level(csr_simd_level(sparsevd::cpu::kernels().isa));
}
