"""sparsevd: fused kernels and drop-in layers for Sparse Variational Dropout.

Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks", ICML 2017
(arXiv:1701.05369).

    model = sparsevd.convert(model)                        # nn.Linear/Conv2d -> sparse-VD layers
    loss = sparsevd.SGVLB(model, train_size)(logits, y)    # data term + β·KL
    print(sparsevd.report(model))                          # per-layer sparsity and compression
"""
from . import functional, nn, ops, reference
from .convert import Report, convert, report
from .deploy import deploy
from .io import load, save
from .loss import SGVLB, kl_divergence

__version__ = "0.1.0"

__all__ = [
    "SGVLB",
    "Report",
    "convert",
    "deploy",
    "functional",
    "kl_divergence",
    "load",
    "nn",
    "ops",
    "reference",
    "report",
    "save",
]
