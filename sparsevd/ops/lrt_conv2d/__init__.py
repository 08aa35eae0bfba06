"""The op family ``lrt_conv2d``: the training forward and backward of a 2-D convolution with the
local reparameterization trick (Molchanov, Ashukha, Vetrov, ICML 2017, sec. 4.2, per output pixel
as in the authors' code); 1-D convolutions run on it over (N, C, 1, L) with a (1, k) kernel.

    y = conv(x, θ) + b + sqrt(conv(x ⊙ x, σ²) + 1e-8) ⊙ ξ,
    x (N, C_in, H, W), θ (C_out, C_in / groups, kH, kW) → y (N, C_out, H_out, W_out)

Each piece one hop away:

- :mod:`.naive`: the math in plain PyTorch (:func:`naive_lrt_conv2d`,
  :func:`naive_lrt_conv2d_backward`), with the ops' signatures: the ``reference`` backend and the
  tests' oracle;
- :mod:`.op`: the custom ops ``torch.ops.sparsevd.lrt_conv2d`` / ``lrt_conv2d_backward`` (schema,
  fake, autograd) and :func:`run_lrt_conv2d`;
- :mod:`.native`: the ``native`` backend (csrc/cpu/lrt_conv2d_cpu.cpp);
- :mod:`.triton`: the ``triton`` backend (triton_kernels/lrt_conv2d.py);
- padding, output sizes and layouts: :mod:`sparsevd.ops.conv_geometry`.

Tests: tests/test_lrt_conv2d.py (every backend and device), tests/test_lrt_conv2d_native.py,
tests/test_lrt_conv2d_triton.py; benchmark: benchmarks/bench_lrt_conv2d.py. The checked
user-facing functions are :func:`sparsevd.functional.lrt_conv2d` and ``lrt_conv1d``.
"""
from .naive import naive_lrt_conv2d, naive_lrt_conv2d_backward
from .op import lrt_conv2d, lrt_conv2d_backward, run_lrt_conv2d

__all__ = ["lrt_conv2d", "lrt_conv2d_backward", "naive_lrt_conv2d", "naive_lrt_conv2d_backward",
           "run_lrt_conv2d"]
