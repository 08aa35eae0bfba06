"""The LRT noise ξ as a pure function of (seed, element index), and the seed itself.

ξ[i] = Box–Muller(Philox4x32-10(key=seed, counter=(i, 0, 0, 0))), bit for bit the generator of
Triton's ``tl.randn(seed, i)`` (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011). The element index i of an output y of shape (*, N) or (B, C, H, W) is its offset in the
contiguous row-major layout, taken modulo 2³². One function per meaning:

- :func:`randn_torch`: the specification, in torch integer ops (any device);
- :func:`lrt_noise`: ξ of an output shape (or of a range of indices) as the library draws it
  outside the kernels: the compiled CPU generator ``sparsevd::philox_randn_``
  (csrc/cpu/noise_cpu.cpp, vectorized, ~50× faster) on CPU when built, else :func:`randn_torch`.
  The reference backend and the tests use it; the Triton kernels (``tl.randn``) and the native
  kernels (csrc/cpu/simd/philox_vec.h) draw the same numbers inline (equal in the integer part and
  up to an ulp of log/cos in the floats);
- :func:`draw_seed`: the one-element int64 seed of a forward, from torch's generator.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from . import library

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
#: Largest int32 times this is < 1 in fp32 (Triton's ``uint_to_uniform_float``).
_UNIFORM_SCALE = 4.6566127342e-10


def draw_seed(device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """A fresh one-element int64 seed tensor on ``device``, drawn from torch's generator there.

    ``torch.manual_seed`` therefore makes the noise reproducible, and a CUDA-graph replay draws a
    new seed (docs/design.md, "Noise").
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    # a, b < 2^32: the int64 product wraps, but its bit pattern is the exact low 64 bits.
    return ((b * a) >> 32) & _MASK32


def philox_4x32(seed: int, counter: torch.Tensor):
    """Philox4x32 with 10 rounds on counters (counter, 0, 0, 0); returns the first two words.

    Args:
        seed: a 64-bit integer key (low word k0, high word k1).
        counter: int64 tensor of counter values in [0, 2³²).

    Returns:
        (c0, c1): int64 tensors holding uint32 values.
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        n0 = _umulhi(_ROUND_B, c2) ^ c1 ^ k0
        n2 = _umulhi(_ROUND_A, c0) ^ c3 ^ k1
        c1 = (c2 * _ROUND_B) & _MASK32
        c3 = (c0 * _ROUND_A) & _MASK32
        c0, c2 = n0, n2
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1


def _to_uniform(u: torch.Tensor) -> torch.Tensor:
    signed = torch.where(u >= 2**31, u - 2**32, u)  # bitcast uint32 -> int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * _UNIFORM_SCALE


def randn_torch(seed: int, numel: int, device=None, offset: int = 0) -> torch.Tensor:
    """ξ[i] for i in [offset, offset + numel) computed with torch integer ops on ``device``: the
    specification of the generator (fp32, 1-D)."""
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    c0, c1 = philox_4x32(int(seed), idx)
    u1 = torch.clamp_min(_to_uniform(c0), 1.0e-7)
    u2 = _to_uniform(c1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(u2 * 6.283185307179586)


def lrt_noise(seed: Union[torch.Tensor, int], shape: Sequence[int], device=None,
              offset: int = 0) -> torch.Tensor:
    """The noise ξ that the LRT ops draw for an output of ``shape`` and this ``seed``: ξ[i] for the
    row-major indices i in [offset, offset + numel(shape)).

    Args:
        seed: the one-element int64 seed tensor of the op (``sparsevd.functional.draw_seed``), or
            its value as an int.
        shape: the output shape, e.g. (*, out_features) or (N, C_out, H_out, W_out); (n,) for a
            range of n indices.
        device: device of the result (default: the seed tensor's, CPU for an int).
        offset: index of the first element (0 for an op's output).

    Returns:
        fp32 tensor of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed = int(seed.reshape(-1)[0])
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu" and library.has_op("philox_randn_"):
        out = torch.empty(numel, dtype=torch.float32)
        torch.ops.sparsevd.philox_randn_(out, int(seed), int(offset))
    else:
        out = randn_torch(seed, numel, device=device, offset=offset)
    return out.reshape(shape)
