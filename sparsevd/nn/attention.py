"""``SplitMultiheadAttention``: ``nn.MultiheadAttention`` with its packed in-projection written as
three layers, so that :func:`sparsevd.convert` can give each projection sparse-VD weights.

``nn.MultiheadAttention`` keeps q, k and v's projections in one ``in_proj_weight``
(3·embed_dim, embed_dim) read by ``F.multi_head_attention_forward``; there is no module to
replace. This module holds ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear``
(or any module mapping (*, in) → (*, embed_dim), e.g. LinearSVDO, SparseLinear) and computes the
same attention (scaled dot products, softmax, masks, dropout, ``bias_k`` / ``bias_v``,
``add_zero_attn``, averaged weights): in eval mode the outputs equal nn.MultiheadAttention's up
to rounding (the projections are three GEMMs instead of one, and nn.MultiheadAttention may take
its fused inference path).

Source: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (eq. 1 and sec. 3.2.2);
PyTorch's ``torch.nn.functional.multi_head_attention_forward`` for the mask conventions.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SplitMultiheadAttention"]


def _float_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: not attended) as an additive float mask (−inf there), a float mask as
    it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name}: only bool and floating masks are supported, got {mask.dtype}")
    return mask


class SplitMultiheadAttention(nn.Module):
    """Multi-head attention with separate q / k / v / out projection layers; a drop-in
    replacement of ``nn.MultiheadAttention`` (same constructor, forward and outputs).

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first, device, dtype: as nn.MultiheadAttention.

    Attributes: ``q_proj`` (embed_dim → embed_dim), ``k_proj`` (kdim → embed_dim), ``v_proj``
    (vdim → embed_dim), ``out_proj`` (embed_dim → embed_dim); ``bias_k``, ``bias_v`` (1, 1,
    embed_dim) or None. ``in_proj_weight`` and ``in_proj_bias`` are None (no packed projection;
    nn.TransformerEncoderLayer then takes its general path, as for an attention without bias).

    Forward: ``(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` with query (L, N, E) ((N, L, E) when
    batch_first, (L, E) unbatched), key / value (S, N, kdim / vdim); returns (attn_output of
    query's shape, attention weights (N, L, S) — (N, heads, L, S) without averaging — or None).

    Raises:
        ValueError: embed_dim not divisible by num_heads; at forward, masks of the wrong shape
            (named), is_causal without attn_mask where the weights or a key padding mask are
            needed (as nn.MultiheadAttention).
        TypeError: a mask that is neither bool nor floating (named).
    """

    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim, num_heads: expected positive sizes with embed_dim divisible "
                             f"by num_heads, got {embed_dim}, {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    @classmethod
    @torch.no_grad()
    def from_module(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The split twin of ``mha``: the same weights (copied), settings and training mode."""
        w = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                  mha.bias_k is not None, mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first,
                  device=w.device, dtype=w.dtype)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None,) * 3
        for proj, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(wt)
            if b is not None:
                proj.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        if mha.bias_k is not None:
            new.bias_k.copy_(mha.bias_k)
            new.bias_v.copy_(mha.bias_v)
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise ValueError("attn_mask: needed with is_causal=True (as nn.MultiheadAttention); use "
                             "nn.Transformer.generate_square_subsequent_mask")
        sdpa_causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if sdpa_causal else _float_mask(attn_mask, "attn_mask", query.dtype)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (L|S, N, E)
        src_len = k.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape == (tgt_len, src_len):
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3 or attn_mask.shape != (bsz * heads, tgt_len, src_len):
                raise ValueError(f"attn_mask: expected shape ({tgt_len}, {src_len}) or "
                                 f"({bsz * heads}, {tgt_len}, {src_len}), got {tuple(attn_mask.shape)}")
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, hd).transpose(0, 1)  # (N·heads, L, hd)
        k = k.reshape(k.shape[0], bsz * heads, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, hd, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise ValueError(f"key_padding_mask: expected shape ({bsz}, {src_len}), got "
                                 f"{tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            kpm = kpm.reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q * math.sqrt(1.0 / hd)
            scores = (torch.baddbmm(attn_mask, scores, k.transpose(-2, -1)) if attn_mask is not None
                      else torch.bmm(scores, k.transpose(-2, -1)))
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.bmm(weights, v)  # (N·heads, L, hd)
            out = out.transpose(0, 1).reshape(tgt_len, bsz, self.embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1
                             else attn_mask.view(bsz, heads, -1, src_len))
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, hd), k.view(bsz, heads, src_len, hd),
                v.view(bsz, heads, src_len, hd), attn_mask, p, sdpa_causal)
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
            weights = None
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
