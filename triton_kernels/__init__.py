"""Triton kernels of sparsevd (installed as ``sparsevd.triton_kernels``; never import it as a
top-level ``triton_kernels``, a name that belongs to other projects).

Only ``@triton.jit`` functions live here, one file per op family; the launchers, autotuning and the
``torch.library`` registration are in :mod:`sparsevd.ops.triton_impl`.

- :mod:`.lrt_linear`: the LRT linear layer, forward (one kernel) and backward (two kernels), and a
  kernel that draws the LRT noise ξ = tl.randn(seed, i) on its own (for tests).
- :mod:`.kl`: the sparse-VD KL (eq. 14) of many layers and its gradients, one launch.
"""
