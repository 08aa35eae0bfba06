"""Reference networks of the sparse VD paper, as plain ``nn.Sequential`` chains, and a
transformer-shaped encoder.

The paper's models are flat ``nn.Sequential`` chains of weight layers (``nn.Linear`` /
``nn.Conv2d``, or their sparse-VD twins :class:`~sparsevd.nn.LinearSVDO` /
:class:`~sparsevd.nn.Conv2dSVDO`), elementwise activations (``nn.ReLU``), ``nn.MaxPool2d`` and
``nn.Flatten``, so that a later ``deploy`` step can walk the chain and fold dead neurons of one
layer into the next. :class:`TransformerEncoderLike` is the other kind of network users bring:
no ``nn.Sequential``, 3-D activations, residuals and LayerNorm (``deploy`` converts its layers one
by one, without chain compaction).

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

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import DEFAULT_THRESHOLD, Conv2dSVDO, LinearSVDO

__all__ = ["INPUT_SHAPES", "MODELS", "EncoderBlock", "LeNet300", "LeNet5", "TransformerEncoderLike",
           "VGGLike", "build_model", "count_parameters"]


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


class EncoderBlock(nn.Module):
    """One pre-LayerNorm transformer encoder block: x + o(attention(q, k, v of ln1(x))), then
    x + fc2(gelu(fc1(ln2(x)))). The projections ``q``, ``k``, ``v``, ``o`` (hidden → hidden) and
    the MLP ``fc1`` (hidden → mlp · hidden), ``fc2`` (back) are separate linear layers, so
    :func:`sparsevd.convert` and :func:`sparsevd.deploy` see each of them.

    Args:
        hidden: model width; divisible by ``heads``.
        heads: attention heads (head size hidden / heads).
        mlp: width factor of the MLP (fc1 has ``round(mlp * hidden)`` outputs).
        linear: the constructor of the linear layers, ``(in_features, out_features) -> module``.

    Input and output: float (B, T, hidden).
    """

    def __init__(self, hidden: int, heads: int, mlp: float, linear: Callable[[int, int], nn.Module]):
        super().__init__()
        self.heads = heads
        ff = max(1, round(mlp * hidden))
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.k, self.v, self.o = (linear(hidden, hidden) for _ in range(4))
        self.fc1, self.fc2 = linear(hidden, ff), linear(ff, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerEncoderLike(nn.Module):
    """A transformer encoder of plain torch ops (a BERT/ViT-style classifier body), the shape of
    model deployments meet outside the paper: ``layers`` :class:`EncoderBlock` (attention q/k/v/out
    projections and a GELU MLP as separate linear layers, LayerNorm, residuals), a final
    LayerNorm, mean pooling over the tokens and a linear ``head``. Defaults (hidden 384, 6 layers,
    6 heads, MLP 4×, 10 classes): 37 linear layers, 10.6M weights.

    Attributes: ``emb`` (an ``nn.Embedding``, only with ``vocab_size``), ``pos`` (max_len, hidden)
    learned positions, ``blocks`` (``nn.ModuleList``), ``norm``, ``head`` (absent when
    ``num_classes`` is None).

    Args:
        vocab_size: token ids as input (through ``emb``); None: the input is already a sequence of
            hidden-sized float vectors.
        hidden, layers, heads, mlp: width (divisible by ``heads``), blocks, heads, MLP width factor.
        num_classes: outputs of the head; None: no pooling and no head, the output is the normed
            sequence (B, T, hidden).
        max_len: longest sequence (rows of ``pos``).
        svd: :class:`~sparsevd.nn.LinearSVDO` layers (sparse VD) or ``nn.Linear``.
        threshold: log α pruning threshold of the sparse-VD layers (ignored when ``svd=False``).

    Input: int64 token ids (B, T) with ``vocab_size``, else float (B, T, hidden); T ≤ max_len.
    Output: float (B, num_classes), or (B, T, hidden) when ``num_classes`` is None.

    Raises:
        ValueError: sizes out of range (named); at forward, an input of the wrong shape (named x).
    """

    def __init__(self, vocab_size: Optional[int] = None, hidden: int = 384, layers: int = 6,
                 heads: int = 6, mlp: float = 4.0, num_classes: Optional[int] = 10,
                 max_len: int = 512, svd: bool = True, threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        for name, v in (("hidden", hidden), ("layers", layers), ("heads", heads),
                        ("max_len", max_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if hidden % heads:
            raise ValueError(f"heads: hidden={hidden} must be divisible by heads={heads}")
        if not mlp > 0:
            raise ValueError(f"mlp: expected a positive width factor, got {mlp!r}")
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size: expected a positive int or None, got {vocab_size!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes: expected a positive int or None, got {num_classes!r}")
        lin = _linear(svd, threshold)
        self.hidden, self.vocab_size, self.num_classes = hidden, vocab_size, num_classes
        if vocab_size is not None:
            self.emb = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, hidden))
        self.blocks = nn.ModuleList([EncoderBlock(hidden, heads, mlp, lin) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        if num_classes is not None:
            self.head = lin(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.vocab_size is not None:
            if x.dim() != 2:
                raise ValueError(f"x: expected token ids (B, T), got shape {tuple(x.shape)}")
            x = self.emb(x)
        elif x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"x: expected shape (B, T, {self.hidden}), got {tuple(x.shape)}")
        t = x.shape[1]
        if t > self.pos.shape[0]:
            raise ValueError(f"x: sequence length {t} exceeds max_len={self.pos.shape[0]}")
        x = x + self.pos[:t]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x if self.num_classes is None else self.head(x.mean(1))


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
