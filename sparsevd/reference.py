"""The per-weight math of sparse variational dropout under its historical name: every name here is
:mod:`sparsevd.ops.weights`' (log α, the KL per weight, the evaluation and train-time clipping
masks, the constants), re-exported for code that imports ``sparsevd.reference``.

The math of each op family (the LRT layers, the KL of many layers) is the family's ``naive.py``:
:mod:`sparsevd.ops.lrt_linear.naive`, :mod:`sparsevd.ops.lrt_conv2d.naive`,
:mod:`sparsevd.ops.kl.naive`, each with its op's signature (seed in, (y, std) out).
"""
from .ops.conv_geometry import conv_out_size
from .ops.weights import (EPS_THETA, EPS_VAR, K1, K2, K3, LOG_ALPHA_CLAMP, clip_mask, clip_parameters,
                          eval_mask, log_alpha, masked_weight, neg_kl_from_log_alpha)

__all__ = ["EPS_THETA", "EPS_VAR", "K1", "K2", "K3", "LOG_ALPHA_CLAMP", "clip_mask", "clip_parameters",
           "conv_out_size", "eval_mask", "log_alpha", "masked_weight", "neg_kl_from_log_alpha"]
