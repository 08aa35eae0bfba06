"""sparsevd: fused kernels and drop-in layers for Sparse Variational Dropout.

Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks", ICML 2017
(arXiv:1701.05369).

    model = sparsevd.convert(model)                        # nn.Linear/Conv2d -> sparse-VD layers
    loss = sparsevd.SGVLB(model, train_size)(logits, y)    # data term + β·KL
    print(sparsevd.report(model))                          # per-layer sparsity and compression

Layout (docs/design.md): ``reference`` (the math), ``ops`` (custom ops and their backends),
``functional`` (checked entry points), ``nn`` (layers), ``loss``, ``convert``, ``train`` (the
training loop), ``checkpoint``, ``deploy`` and ``io`` (sparse inference models), ``data``,
``models``, ``metadata``; ``cli`` and ``deploy_cli`` are the command line only.
"""
from . import functional, nn, ops, reference
from ._version import __version__
from .convert import Report, convert, report
from .deploy import deploy
from .io import load, save
from .loss import SGVLB, kl_divergence
from . import checkpoint, data, metadata, models, train  # noqa: E402  (after the layers they use)
from .checkpoint import load_checkpoint, save_checkpoint
from .train import fit

__all__ = [
    "SGVLB",
    "Report",
    "__version__",
    "checkpoint",
    "convert",
    "data",
    "deploy",
    "fit",
    "functional",
    "kl_divergence",
    "load",
    "load_checkpoint",
    "metadata",
    "models",
    "nn",
    "ops",
    "reference",
    "report",
    "save",
    "save_checkpoint",
    "train",
]
