"""Layers: LinearSVDO, Conv2dSVDO (training with sparse VD)."""
from .svdo import DEFAULT_THRESHOLD, LOG_SIGMA2_INIT, SVDO_LAYERS, Conv2dSVDO, LinearSVDO

__all__ = ["Conv2dSVDO", "LinearSVDO", "SVDO_LAYERS", "DEFAULT_THRESHOLD", "LOG_SIGMA2_INIT"]
