"""sparsevd: fused kernels and drop-in layers for Sparse Variational Dropout.

Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks", ICML 2017
(arXiv:1701.05369).

    model = sparsevd.convert(model)                        # nn.Linear/Conv2d -> sparse-VD layers
    loss = sparsevd.SGVLB(model, train_size)(logits, y)    # data term + β·KL
    print(sparsevd.report(model))                          # per-layer sparsity and compression

Layout (docs/design.md): ``ops`` (one package per op family: its math, custom ops and backends;
``reference`` re-exports the per-weight math),
``functional`` (checked entry points), ``nn`` (layers), ``loss``, ``convert``, ``train`` (the
training loop), ``checkpoint``, ``deploy`` (with ``surgery``), ``io`` (with ``overlay``: sparse
inference models of any architecture) and ``export`` (ONNX), ``hf`` (Hugging Face models; imported
on first use, it needs transformers), ``data``, ``models``, ``metadata``; ``cli`` (one module per
command) is the command line only.
"""
from . import functional, nn, ops, reference
from ._version import __version__
from .convert import ConversionReport, Report, convert, plan_conversion, report
from .deploy import deploy
from .export import export_onnx
from .io import load, save
from .loss import SGVLB, kl_divergence
from . import (checkpoint, data, distributed, export, magnitude, metadata, models, optim, plots,  # noqa: E402
               train, uncertainty)
from . import outputs, target, training  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint
from .train import fit
from .uncertainty import predict


def __getattr__(name: str):
    if name == "hf":  # transformers is an optional extra: imported on first use only
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'sparsevd' has no attribute {name!r}")


__all__ = [
    "SGVLB",
    "ConversionReport",
    "Report",
    "__version__",
    "checkpoint",
    "convert",
    "data",
    "deploy",
    "export",
    "export_onnx",
    "fit",
    "functional",
    "kl_divergence",
    "load",
    "load_checkpoint",
    "metadata",
    "models",
    "nn",
    "ops",
    "outputs",
    "plan_conversion",
    "predict",
    "reference",
    "report",
    "save",
    "save_checkpoint",
    "target",
    "train",
    "training",
]
