"""Layers: LinearSVDO, Conv2dSVDO, Conv1dSVDO (training with sparse VD); SparseLinear, SparseConv2d, SparseConv1d (deployed)."""
from .svdo import DEFAULT_THRESHOLD, LOG_SIGMA2_INIT, SVDO_LAYERS, Conv1dSVDO, Conv2dSVDO, LinearSVDO
from .sparse import SparseConv1d, SparseConv2d, SparseLinear

__all__ = ["Conv1dSVDO", "Conv2dSVDO", "LinearSVDO", "SparseConv1d", "SparseConv2d", "SparseLinear", "SVDO_LAYERS", "DEFAULT_THRESHOLD", "LOG_SIGMA2_INIT"]
