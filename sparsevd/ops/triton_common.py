"""What the Triton launchers of every op family share: the dot precision and accumulator dtype
of a call, the autotuning switch, tile configs and the elementwise block size.

Used by the families' triton backends (:mod:`sparsevd.ops.lrt_linear.triton`,
:mod:`sparsevd.ops.lrt_conv2d.triton`, :mod:`sparsevd.ops.kl.triton`). Importing it needs triton
(an ImportError makes the triton backend unavailable).
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
import triton

from .backend import interpreter_enabled

#: ``SPARSEVD_TRITON_AUTOTUNE=0`` keeps only the first tile of the call's dot kind (no tuning runs):
#: for test runs on a GPU, where each new problem size would otherwise time every candidate.
AUTOTUNE_ENV = "SPARSEVD_TRITON_AUTOTUNE"
#: Overrides the fp32 dot precision ("ieee", "tf32" or "tf32x3"; three TF32 products give about
#: fp32 accuracy on tensor cores). Unset: "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee".
FP32_PRECISION_ENV = "SPARSEVD_FP32_PRECISION"


def autotune_enabled() -> bool:
    """False when ``SPARSEVD_TRITON_AUTOTUNE=0``: the pruners keep one config."""
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def make_config(t, group_m=8) -> triton.Config:
    """triton.Config of a tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    bm, bn, bk, warps, stages = t
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


def tile_configs(tiles: Dict[Tuple[str, str], List[tuple]], kernel: str,
                 interpreter_tile: tuple) -> List[triton.Config]:
    """The autotuning candidates of a family's "fwd" or "bwd" matmul kernel: one configuration,
    ``interpreter_tile``, when interpreting (TRITON_INTERPRET=1); else every tile of
    ``tiles[(kernel, kind)]`` over the kinds of dot, each once and in order (the family's pruner
    narrows them per call to the call's kind)."""
    if interpreter_enabled():
        return [make_config(interpreter_tile)]
    seen, out = set(), []
    for (k, _), kind_tiles in tiles.items():
        for t in kind_tiles if k == kernel else ():
            if t not in seen:
                seen.add(t)
                out.append(make_config(t))
    return out


def dot_kind(x_dtype: torch.dtype, precision: str, acc_f64: bool) -> str:
    """The kind of tensor-core work of a call, which selects its tile set: "fp64", "ieee" (fp32
    FMA dots), "tc32" (tf32 / tf32x3 operands, also fp16 calls whose variance dots run on fp32)
    or "tc" (bf16 dots)."""
    if acc_f64:
        return "fp64"
    if x_dtype == torch.float32:
        return "ieee" if precision == "ieee" else "tc32"
    return "tc32" if x_dtype == torch.float16 else "tc"  # fp16: variance dots on fp32 operands


def elementwise_block(dtype: torch.dtype = torch.float32) -> Tuple[int, int]:
    """(BLOCK, num_warps) of the elementwise kernels (g_s2, KL, noise): 8 elements per thread
    (about 90 registers for the KL with gradients, no spill on sm_90), 4 for fp64; one big block
    per program in the interpreter."""
    if interpreter_enabled():
        return 65536, 4
    return (1024 if dtype == torch.float64 else 2048), 8


def acc_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The accumulator dtype: fp64 if x or the weight is fp64, else fp32."""
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def precision(x: torch.Tensor) -> str:
    """``input_precision`` of the dots for activations x (docs: sparsevd.ops.lrt_linear.triton)."""
    if x.dtype == torch.float16:
        return "tf32"  # the variance products of fp16 inputs run on fp32 operands
    if x.dtype != torch.float32:
        return "ieee"  # bf16 dots ignore it; fp64 dots are exact
    forced = os.environ.get(FP32_PRECISION_ENV, "").strip().lower()
    if forced:
        if forced not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"{FP32_PRECISION_ENV}={forced!r}: expected ieee, tf32 or tf32x3")
        return forced
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def m_key(m: int) -> int:
    """The autotune key of a row count: its next power of two."""
    return triton.next_power_of_2(max(m, 1))
