"""Reference networks of the sparse VD paper, as plain ``nn.Sequential`` chains.

Every model is a flat ``nn.Sequential`` of weight layers (``nn.Linear`` / ``nn.Conv2d``, or their
sparse-VD twins :class:`~sparsevd.nn.LinearSVDO` / :class:`~sparsevd.nn.Conv2dSVDO`), elementwise
activations (``nn.ReLU``), ``nn.MaxPool2d`` and ``nn.Flatten``, so that a later ``deploy`` step can
walk the chain and fold dead neurons of one layer into the next.

Sources:

* LeNet-300-100 and LeNet-5: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning
  applied to document recognition", Proc. IEEE 86(11), 1998.
* LeNet-5-Caffe: the variant of Caffe's MNIST example (``examples/mnist/lenet_train_test.prototxt``:
  conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, fc 500, fc 10), the architecture used by
  Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks", ICML 2017
  (arXiv:1701.05369), Table 1, and by Han et al. 2015 before them. Caffe has no ReLU after the
  convolutions; like the sparse VD authors' code we put one after every hidden layer.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .nn import DEFAULT_THRESHOLD, Conv2dSVDO, LinearSVDO

__all__ = ["INPUT_SHAPES", "MODELS", "LeNet300", "LeNet5", "VGGLike", "build_model",
           "count_parameters"]


def _linear(svd: bool, threshold: float) -> Callable[[int, int], nn.Module]:
    if svd:
        return lambda i, o: LinearSVDO(i, o, threshold=threshold)
    return nn.Linear


def _conv(svd: bool, threshold: float) -> Callable[[int, int, int], nn.Module]:
    if svd:
        return lambda i, o, k: Conv2dSVDO(i, o, k, threshold=threshold)
    return nn.Conv2d


def LeNet300(svd: bool = True, threshold: float = DEFAULT_THRESHOLD) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998): a fully connected 784 → 300 → 100 → 10 net with ReLU.

    Layout (indices of the ``nn.Sequential``)::

        0 Flatten   (N, 1, 28, 28) or (N, 784) -> (N, 784)
        1 Linear    784 -> 300         2 ReLU
        3 Linear    300 -> 100         4 ReLU
        5 Linear    100 -> 10          (logits)

    266,200 weights + 410 biases = 266,610 parameters (the dense model; the sparse-VD model adds a
    ``log_sigma2`` per weight).

    Args:
        svd: True for :class:`~sparsevd.nn.LinearSVDO` layers (sparse VD), False for ``nn.Linear``.
        threshold: log α pruning threshold of the sparse-VD layers (ignored when ``svd=False``).

    Returns:
        ``nn.Sequential``; input float (N, 1, 28, 28) or (N, 784), output logits float (N, 10).
    """
    lin = _linear(svd, threshold)
    return nn.Sequential(
        nn.Flatten(),
        lin(784, 300), nn.ReLU(),
        lin(300, 100), nn.ReLU(),
        lin(100, 10),
    )


def LeNet5(svd: bool = True, threshold: float = DEFAULT_THRESHOLD) -> nn.Sequential:
    """LeNet-5-Caffe, the convolutional net of Molchanov et al. 2017 (Table 1), with ReLU.

    Layout (indices of the ``nn.Sequential``; shapes for a 28x28 input, no padding)::

        0 Conv2d    1 -> 20, 5x5   (N, 1, 28, 28) -> (N, 20, 24, 24)    1 ReLU
        2 MaxPool2d 2              -> (N, 20, 12, 12)
        3 Conv2d    20 -> 50, 5x5  -> (N, 50, 8, 8)                      4 ReLU
        5 MaxPool2d 2              -> (N, 50, 4, 4)
        6 Flatten                  -> (N, 800)
        7 Linear    800 -> 500     8 ReLU
        9 Linear    500 -> 10      (logits)

    430,500 weights + 580 biases = 431,080 parameters (dense).

    Source: Caffe's ``lenet_train_test.prototxt`` (derived from LeCun et al. 1998), as used by
    Molchanov, Ashukha, Vetrov, ICML 2017.

    Args:
        svd: True for :class:`~sparsevd.nn.Conv2dSVDO` / :class:`~sparsevd.nn.LinearSVDO` layers,
            False for ``nn.Conv2d`` / ``nn.Linear``.
        threshold: log α pruning threshold of the sparse-VD layers (ignored when ``svd=False``).

    Returns:
        ``nn.Sequential``; input float (N, 1, 28, 28), output logits float (N, 10).
    """
    conv, lin = _conv(svd, threshold), _linear(svd, threshold)
    return nn.Sequential(
        conv(1, 20, 5), nn.ReLU(),
        nn.MaxPool2d(2),
        conv(20, 50, 5), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        lin(800, 500), nn.ReLU(),
        lin(500, 10),
    )


#: The convolution stack of the VGG-like network: channels of each 3x3 convolution ("M": 2x2 max
#: pooling), before the width factor.
VGG_LIKE_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                  512, 512, 512, "M")


def VGGLike(svd: bool = True, threshold: float = DEFAULT_THRESHOLD, width: float = 1.0,
            num_classes: int = 10, batch_norm: bool = True) -> nn.Sequential:
    """The VGG-like network of Molchanov et al. 2017 (sec. 5.2) for CIFAR-10-sized inputs.

    13 convolutions 3x3 (padding 1), each followed by batch norm and ReLU, with 2x2 max pooling
    after the 2nd, 4th, 7th, 10th and 13th: channels 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M,
    512 x3, M, times ``width`` (the paper's scale factor k); then Flatten, Linear 512k → 512k,
    batch norm, ReLU, and Linear 512k → ``num_classes``. This is Zagoruyko's "VGG-like" net for
    CIFAR-10 (S. Zagoruyko, "92.45% on CIFAR-10 in Torch", 2015) with sparse VD in place of its
    dropout. A flat ``nn.Sequential``, so ``deploy`` compacts it as one chain (batch norm passes).

    Args:
        svd: sparse-VD layers (Conv2dSVDO / LinearSVDO) or dense ones.
        threshold: log α pruning threshold of the sparse-VD layers.
        width: the scale factor k of every layer's channel count (> 0; counts are rounded, at
            least 1), e.g. 0.25 for quick CPU runs.
        num_classes: outputs.
        batch_norm: the batch norms (the paper's net has them).

    Returns:
        ``nn.Sequential``; input float (N, 3, 32, 32), output logits (N, ``num_classes``).
        width 1: 15.0M weights (14.7M in the convolutions).

    Raises:
        ValueError: ``width`` ≤ 0 or ``num_classes`` < 1.
    """
    if not width > 0:
        raise ValueError(f"width: expected a positive scale factor, got {width!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected ≥ 1, got {num_classes}")
    conv = (lambda i, o: Conv2dSVDO(i, o, 3, padding=1, threshold=threshold)) if svd else \
        (lambda i, o: nn.Conv2d(i, o, 3, padding=1))
    lin = _linear(svd, threshold)
    layers, c = [], 3
    for v in VGG_LIKE_CONVS:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        o = max(1, round(v * width))
        layers.append(conv(c, o))
        if batch_norm:
            layers.append(nn.BatchNorm2d(o))
        layers.append(nn.ReLU())
        c = o
    hidden = max(1, round(512 * width))
    layers += [nn.Flatten(), lin(c, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), lin(hidden, num_classes)]
    return nn.Sequential(*layers)


#: Model name (as given to :func:`build_model` and the CLI's ``--model``) -> constructor.
MODELS: Dict[str, Callable[..., nn.Sequential]] = {"lenet300": LeNet300, "lenet5": LeNet5,
                                                   "vgglike": VGGLike}
#: The input of one sample of each model (channels, height, width).
INPUT_SHAPES: Dict[str, tuple] = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28),
                                  "vgglike": (3, 32, 32)}


def build_model(name: str, svd: bool = True, threshold: float = DEFAULT_THRESHOLD,
                **kwargs) -> nn.Sequential:
    """Build a model by name.

    Args:
        name: ``"lenet300"`` (LeNet-300-100), ``"lenet5"`` (LeNet-5-Caffe) or ``"vgglike"``
            (VGG-like for 3x32x32 inputs); case-insensitive, ``-``/``_`` ignored
            (``"LeNet-300"`` and ``"VGG-like"`` work).
        svd: sparse-VD layers (True) or dense layers (False).
        threshold: log α pruning threshold of the sparse-VD layers.
        kwargs: further arguments of the constructor (``width`` of :func:`VGGLike`).

    Returns:
        The freshly initialised ``nn.Sequential`` (fp32, on the CPU, in training mode).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key](svd=svd, threshold=threshold, **kwargs)


def count_parameters(model: nn.Module, include_log_sigma2: bool = False) -> int:
    """Number of parameter elements of ``model`` (weights and biases).

    Args:
        include_log_sigma2: also count the sparse-VD layers' ``log_sigma2`` (by default they are
            left out, so a sparse-VD model counts as its dense twin).
    """
    return sum(p.numel() for n, p in model.named_parameters()
               if include_log_sigma2 or not n.endswith("log_sigma2"))
