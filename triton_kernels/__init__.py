"""Triton kernels of sparsevd (installed as ``sparsevd.triton_kernels``; never import it as a
top-level ``triton_kernels``, a name that belongs to other projects).

Only ``@triton.jit`` functions live here, one file per op family, named after it; the launchers and
autotuning are the family's ``triton.py`` (``sparsevd/ops/<family>/triton.py``), the
``torch.library`` registration its ``op.py``.

- :mod:`.lrt_linear`: the LRT linear layer, forward (one kernel) and backward (two kernels).
- :mod:`.lrt_conv2d`: the LRT convolution, implicit-GEMM and direct (depthwise) kernels, forward
  (one kernel) and backward (two, three with a split weight gradient).
- :mod:`.kl`: the sparse-VD KL (eq. 14) of many layers and its gradients, one launch.
"""
