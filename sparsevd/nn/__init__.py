"""Layers: LinearSVDO, Conv2dSVDO, Conv1dSVDO (training with sparse VD); SparseLinear, SparseConv2d, SparseConv1d (deployed);
SplitMultiheadAttention (nn.MultiheadAttention with separate projection layers)."""
from .svdo import DEFAULT_THRESHOLD, LOG_SIGMA2_INIT, SVDO_LAYERS, Conv1dSVDO, Conv2dSVDO, LinearSVDO
from .sparse import SparseConv1d, SparseConv2d, SparseLinear
from .attention import SplitMultiheadAttention

__all__ = ["Conv1dSVDO", "Conv2dSVDO", "LinearSVDO", "SparseConv1d", "SparseConv2d", "SparseLinear",
           "SplitMultiheadAttention", "SVDO_LAYERS", "DEFAULT_THRESHOLD", "LOG_SIGMA2_INIT"]
