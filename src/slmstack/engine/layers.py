"""The engine's layers, one function per kind: RMSNorm, RoPE, attention over the KV cache, and linear layers.

Shapes: ``N`` tokens in the step (flat, every row's tokens one after another), ``C`` hidden size, ``H`` query
heads, ``KV`` key/value heads, ``G = H // KV`` query heads per key/value head, ``hd`` head size, ``T`` cache
length of a slot.

Grouped-query attention is computed without repeating K and V: the ``G`` query heads that share a key/value head
are laid out along the query-length axis, ``(rows, KV, G * L, hd)``, so one ``scaled_dot_product_attention``
over ``KV`` heads gives every query head's result with K and V read as they lie in the cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LINEAR_FORMATS", "Linear", "decode_attention", "decode_mask", "prefill_attention", "rms_norm", "rope",
           "rope_tables"]  # fmt: skip


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x²) + eps)`` over the last axis, computed in float32 as transformers does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rope_tables(inv_freq: Tensor, scaling: float, max_positions: int) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of every position, ``(max_positions, hd)``, as transformers' rotary embedding has them."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # (P, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
    return emb.cos() * scaling, emb.sin() * scaling


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (N, heads, hd) by its tokens' angles; ``cos``/``sin``: (N, 1, hd) rows of :func:`rope_tables`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # transformers' rotate_half
    return torch.addcmul(x * cos, rotated, sin)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor | None, mask: Tensor | None,
                     length: int) -> Tensor:  # fmt: skip
    """One new token per row against its slot's cache.

    Args:
        q: (n, H, hd), the rows' queries, rotated.
        k_cache: (S, KV, T, hd), this layer's keys (the rows' new keys already written).
        v_cache: (S, KV, T, hd), its values, likewise.
        slots: (n,) each row's slot; None when row i is slot i (the usual, dense case: no copy at all).
        mask: (n, 1, 1, length), True where a row has a key (see :func:`decode_mask`); None when every row is
            ``length`` long.
        length: the longest row (with its new token), the part of the cache read.

    Returns:
        (n, H * hd)
    """
    n, heads, hd = q.shape
    kv = k_cache.shape[1]
    if slots is None:
        keys, values = k_cache[:n, :, :length], v_cache[:n, :, :length]  # (n, KV, L, hd) views
    else:
        keys, values = k_cache[slots, :, :length], v_cache[slots, :, :length]
    out = F.scaled_dot_product_attention(
        q.view(n, kv, heads // kv, hd), keys, values, attn_mask=mask
    )  # (n, KV, G, hd)
    return out.reshape(n, heads * hd)


def decode_mask(lens: Tensor, length: int, always: bool = False) -> Tensor | None:
    """(n, 1, 1, length): True where row i has a key (positions below its length); None when all are full.

    ``always``: build it without looking at ``lens`` on the host (inside a CUDA graph capture).
    """
    if not always and bool((lens == length).all()):
        return None
    return (torch.arange(length, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slot: int, start: int) -> Tensor:
    """A chunk of ``L`` prompt tokens at positions ``start..start+L-1`` of one slot, causal over the cache.

    Args:
        q: (L, H, hd), the chunk's queries, rotated.
        k_cache: (S, KV, T, hd), this layer's keys, the chunk's already written.
        v_cache: (S, KV, T, hd), its values, likewise.
        slot: the row's cache slot.
        start: the position of the chunk's first token.

    Returns:
        (L, H * hd)
    """
    length, heads, hd = q.shape
    kv = k_cache.shape[1]
    g = heads // kv
    end = start + length
    keys, values = k_cache[slot : slot + 1, :, :end], v_cache[slot : slot + 1, :, :end]  # (1, KV, end, hd)
    q = q.view(length, kv, g, hd).permute(1, 2, 0, 3).reshape(1, kv, g * length, hd)  # (1, KV, G*L, hd)
    query_pos = torch.arange(start, end, device=q.device).repeat(g)  # (G*L,) each query's position
    mask = torch.arange(end, device=q.device)[None, :] <= query_pos[:, None]  # (G*L, end), causal
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (1, KV, G*L, hd)
    return out.view(kv, g, length, hd).permute(2, 0, 1, 3).reshape(length, heads * hd)


# ---------------------------------------------------------------- linear layers
LINEAR_FORMATS = ("dense", "float16-weights", "bfloat16-weights", "int8-weights")


class Linear:
    """``x @ weightᵀ + bias`` with the weight kept in one of :data:`LINEAR_FORMATS`, in and out in the compute dtype.

    - ``dense``: the weight in the compute dtype (float32 on CPU by default): exact.
    - ``float16-weights``: float16 weights, float32 arithmetic (torch's fbgemm kernel; x86 CPU).
    - ``bfloat16-weights``: bfloat16 weights prepacked for oneDNN; the input is rounded to bfloat16 and the
      products are summed in float32 (AMX / AVX512-BF16 CPUs).
    - ``int8-weights``: int8 weights with one float scale per output channel (weight-only), the input in
      bfloat16, float32 accumulation (``torch._weight_int8pack_mm``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str = "dense", dtype: torch.dtype = torch.float32):
        if fmt not in LINEAR_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(LINEAR_FORMATS)}")
        self.fmt, self.out_features, self.in_features = fmt, weight.shape[0], weight.shape[1]
        self.dtype = dtype
        weight = weight.detach()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self._call: Any
        if fmt == "dense":
            self.weight = weight.to(dtype).contiguous()
            self._call = lambda x: F.linear(x, self.weight, self.bias)
        elif fmt == "float16-weights":
            packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None if bias is None else bias.float())
            self._call = lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)
        elif fmt == "bfloat16-weights":
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), 1)
            self._call = lambda x: self._with_bias(
                torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "").to(dtype)
            )
        else:  # int8-weights
            scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
            q8 = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            scales16 = scales.to(torch.bfloat16)
            self._call = lambda x: self._with_bias(
                torch._weight_int8pack_mm(x.to(torch.bfloat16), q8, scales16).to(dtype)
            )

    def _with_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias

    def __call__(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, out)."""
        return self._call(x)

    def add_to(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + self(x)``: one ``addmm`` for dense weights (the residual add fused into the product)."""
        if self.fmt == "dense" and self.bias is None:
            return torch.addmm(residual, x, self.weight.t())
        return residual + self._call(x)
