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

from slmstack.engine.cpu_kernels import gguf_kernels, pack_int4
from slmstack.errors import ConfigError
from slmstack.formats import LINEAR_FORMATS

__all__ = ["LINEAR_FORMATS", "Linear", "decode_attention", "decode_mask", "prefill_attention", "rms_norm", "rope_",
           "rope_tables"]  # fmt: skip


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x²) + eps)`` over the last axis, computed in float32 as transformers does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rope_tables(inv_freq: Tensor, scaling: float, max_positions: int) -> tuple[Tensor, Tensor]:
    """``cos`` and signed ``sin`` of every position, ``(max_positions, hd)``, from transformers' rotary embedding.

    ``cos`` is transformers' table; the ``sin`` table has its first half negated, so that transformers'
    ``rotate_half(x) * sin`` (``rotate_half(x) = [-x₂, x₁]``) is ``[x₂, x₁] * signed_sin``: one negation less per
    step (see :func:`rope_`).
    """
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # (P, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
    sin = emb.sin() * scaling
    half = sin.shape[-1] // 2
    return emb.cos() * scaling, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def rope_(x: Tensor, cos: Tensor, signed_sin: Tensor) -> None:
    """Rotate ``x`` (N, heads, hd), a view, in place by its tokens' angles: ``x·cos + rotate_half(x)·sin``.

    ``cos``/``signed_sin``: (N, 1, hd) rows of :func:`rope_tables`. Three operations: the halves swapped, then
    ``x *= cos`` and ``x += swapped * signed_sin``.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x₂, x₁]
    x.mul_(cos).addcmul_(swapped, signed_sin)


def decode_attention(q: Tensor, kv_cache: Tensor, slots: Tensor | None, mask: Tensor | None, length: int,
                     kernel: str = "auto") -> Tensor:  # fmt: skip
    """One new token per row against its slot's cache.

    Args:
        q: (n, H, hd), the rows' queries, rotated.
        kv_cache: (S, KV, 2, T, hd), this layer's keys and values (the rows' new ones already written).
        slots: (n,) each row's slot; None when row i is slot i (the usual, dense case: no copy at all).
        mask: (n, 1, 1, length), 0 where a row has a key and -inf elsewhere (see :func:`decode_mask`); None when
            every row is ``length`` long.
        length: the longest row (with its new token), the part of the cache read.
        kernel: ``sdpa`` (``scaled_dot_product_attention``), ``matmul`` (two batched products and a softmax),
            or ``auto``: ``matmul`` on a GPU, ``sdpa`` elsewhere (the engine's ``decode_kernel`` option). On an
            H100 the fused kernel that ``sdpa`` picks for float32 spends about 57 µs on a decode step of one layer (it
            walks the keys of each head in one thread block); the four plain kernels take a few µs each
            (``benchmarks/gpu_check.py``).

    Returns:
        (n, H * hd)
    """
    n, heads, hd = q.shape
    kv = kv_cache.shape[1]
    rows = kv_cache[:n, :, :, :length] if slots is None else kv_cache[slots, :, :, :length]  # (n, KV, 2, L, hd)
    keys, values = rows[:, :, 0], rows[:, :, 1]  # (n, KV, L, hd)
    q = q.view(n, kv, heads // kv, hd)  # (n, KV, G, hd): the G query heads of a key/value head as its queries
    if kernel == "matmul" or (kernel == "auto" and q.is_cuda):
        scores = torch.matmul(q, keys.transpose(-1, -2))  # (n, KV, G, L)
        scale = hd**-0.5
        scores = scores.mul_(scale) if mask is None else torch.add(mask, scores, alpha=scale)
        out = torch.matmul(scores.softmax(dim=-1), values)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (n, KV, G, hd)
    return out.reshape(n, heads * hd)


def decode_mask(lens: Tensor, length: int, dtype: torch.dtype, always: bool = False,
                window: int | None = None) -> Tensor | None:  # fmt: skip
    """The additive decode mask, (n, 1, 1, length); None when all rows are full.

    0 where row i has a key (positions below its length; with a ``window``, only its last ``window`` positions, as
    transformers' sliding-window mask: key ``k`` is seen from query ``q`` when ``q - window < k <= q``), -inf
    elsewhere. Additive rather than boolean, because attention turns a boolean mask into this one on every call,
    i.e. in every layer; built once a step here. ``always``: build it without looking at ``lens`` on the host
    (inside a CUDA graph capture).
    """
    windowed = window is not None and (always or length > window)
    if not always and not windowed and bool((lens == length).all()):
        return None
    key = torch.arange(length, device=lens.device)[None, :]
    absent = key >= lens[:, None]  # (n, length)
    if windowed:
        absent |= key <= lens[:, None] - 1 - window
    return torch.zeros(absent.shape, dtype=dtype, device=lens.device).masked_fill_(absent, float("-inf"))[
        :, None, None, :
    ]


def prefill_attention(q: Tensor, kv_cache: Tensor, slot: int, start: int, window: int | None = None) -> Tensor:
    """A chunk of ``L`` prompt tokens at positions ``start..start+L-1`` of one slot, causal over the cache.

    Args:
        q: (L, H, hd), the chunk's queries, rotated.
        kv_cache: (S, KV, 2, T, hd), this layer's keys and values, the chunk's already written.
        slot: the row's cache slot.
        start: the position of the chunk's first token.
        window: each query sees only its last ``window`` positions (a sliding-window layer).

    Returns:
        (L, H * hd)
    """
    length, heads, hd = q.shape
    kv = kv_cache.shape[1]
    g = heads // kv
    end = start + length
    keys, values = kv_cache[slot : slot + 1, :, 0, :end], kv_cache[slot : slot + 1, :, 1, :end]  # (1, KV, end, hd)
    q = q.view(length, kv, g, hd).permute(1, 2, 0, 3).reshape(1, kv, g * length, hd)  # (1, KV, G*L, hd)
    query_pos = torch.arange(start, end, device=q.device).repeat(g)  # (G*L,) each query's position
    key_pos = torch.arange(end, device=q.device)[None, :]
    mask = key_pos <= query_pos[:, None]  # (G*L, end), causal
    if window is not None:
        mask &= key_pos > query_pos[:, None] - window
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (1, KV, G*L, hd)
    return out.view(kv, g, length, hd).permute(2, 0, 1, 3).reshape(length, heads * hd)


# ---------------------------------------------------------------- linear layers
INT4_GROUP = 32  # int4-weights: inputs per group, as in GGUF's Q4_1 blocks
INT4_STEPS = 15  # the most steps a 4-bit grid has


def int4_grid(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``weight`` (out, in) in 4-bit groups of :data:`INT4_GROUP` along ``in``: ``w ≈ low + q·scale``, q in 0..15.

    A group whose values lie on a grid of at most 15 equal steps (a block of a Q4_1 GGUF file, dequantized) is
    recovered exactly: its grid is the coarsest that holds every value, the smallest ``k`` in 1..15 for which every
    ``(w - low)·k / (high - low)`` is an integer. A block that uses only part of its 0..15 range thus keeps its own
    step (re-gridding it to 15 steps over its own range would move its values). Any other group is rounded to 15
    steps from its smallest to its largest value.

    Returns:
        q (out, in) int32, scale and low (out, in / group, 1) float32, and exact (out, in / group, 1): whether the
        group was on a grid.
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    span = (high - low).clamp(min=1e-30)
    steps = torch.full_like(span, float(INT4_STEPS))
    exact = torch.zeros(span.shape, dtype=torch.bool, device=span.device)
    for k in range(1, INT4_STEPS + 1):
        units = (groups - low) * (k / span)
        on_grid = ((units - units.round()).abs().amax(-1, keepdim=True) < 1e-3) & ~exact
        steps = torch.where(on_grid, float(k), steps)
        exact |= on_grid
    scale = (high - low).clamp(min=1e-12) / steps
    q = torch.round((groups - low) / scale).clamp(0, INT4_STEPS).to(torch.int32)
    return q.reshape(out_features, in_features), scale, low, exact


KERNEL_ROWS = 8  # up to this many rows a step, slmstack's CPU kernel; above, torch's float32 GEMM on the same values
INT8_GROUPS = "int8-groups"  # not a dtype: the output layer under `auto` where the GGUF file stores it as Q8_0


def _int4_groups(weight: Tensor, groups: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """``weight`` as 4-bit groups: q (out, in) int32, scale and low (out, in / group) float32.

    ``groups`` (:class:`slmstack.gguf_source.Int4Groups`) are the weight's 4-bit blocks as a GGUF file stores
    them, taken as they are; without them each group's grid is found in ``weight`` (:func:`int4_grid`).
    """
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP or out_features % 16:
        raise ConfigError(f"dtype 'int4-weights' needs layer input sizes that are multiples of {INT4_GROUP} and "
                          f"output sizes that are multiples of 16; this model has a {in_features} -> {out_features} "
                          "layer: use dtype int8-weights or float16-weights")  # fmt: skip
    if groups is not None:
        return groups.q.to(torch.int32), groups.scale.float(), groups.low.float()
    q, scale, low, _ = int4_grid(weight)
    return q, scale[..., 0], low[..., 0]


def _int4_pack(weight: Tensor, groups: Any = None) -> tuple[Tensor, Tensor]:
    """Torch's packed int4 layout of ``weight`` and the (in / group, out, 2) bfloat16 scales and zeros it reads.

    The kernel computes ``(q - 8)·scale + zero``, so ``zero = low + 8·scale``.
    """
    q, scale, low = _int4_groups(weight, groups)
    scale, low = scale[..., None], low[..., None]
    scales_zeros = torch.cat([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 8), scales_zeros


class Linear:
    """``x @ weightᵀ + bias`` with the weight kept in one of :data:`LINEAR_FORMATS`, in and out in the compute dtype.

    - ``dense``: the weight in the compute dtype (float32 on CPU by default): exact.
    - ``float16-weights``: float16 weights, float32 arithmetic (torch's fbgemm kernel; x86 CPU).
    - ``bfloat16-weights``: bfloat16 weights prepacked for oneDNN; the input is rounded to bfloat16 and the
      products are summed in float32 (AMX / AVX512-BF16 CPUs).
    - ``int8-weights``: int8 weights with one float scale per output channel (weight-only), the input in
      bfloat16, float32 accumulation (``torch._weight_int8pack_mm``).
    - ``int4-weights``: 4-bit weights in groups of 32 inputs, each group with a scale and an offset (asymmetric, as
      GGUF's Q4_1; :func:`int4_grid` recovers a Q4_1 file's blocks exactly, and a GGUF file's 4-bit blocks are
      taken as they are). On an x86 CPU slmstack's own kernel (:mod:`slmstack.engine.cpu_kernels`) multiplies
      float32 inputs by them with float32 scales and sums; where it cannot be built, torch's kernel
      (``_weight_int4pack_mm_for_cpu``) keeps scales and offsets in bfloat16 and rounds the input to bfloat16.
      The output layer is kept in float16 (:func:`slmstack.engine.weights.output_format`).
    - ``int8-groups`` (not a ``dtype``; the output layer under ``int4-weights`` or ``auto`` where the GGUF file
      stores it as Q8_0 and slmstack's kernel runs): the file's 8-bit groups of 32 with a float32 scale each,
      float32 inputs and sums.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str = "dense", dtype: torch.dtype = torch.float32,
                 groups: Any = None):  # fmt: skip
        if fmt not in (*LINEAR_FORMATS, INT8_GROUPS):
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
        elif fmt == INT8_GROUPS:  # a GGUF file's Q8_0 blocks as they are (groups: q8, scale), slmstack's kernel
            kernels, (q8, scale8) = gguf_kernels(), groups
            q8, scale8 = q8.contiguous(), scale8.float().contiguous()
            self.weight = weight.to(dtype).contiguous()  # the same values, for many rows (see KERNEL_ROWS)
            self._call = lambda x: (self._with_bias(kernels.int8_matmul(x.contiguous(), q8, scale8))
                                    if x.shape[0] <= KERNEL_ROWS else F.linear(x, self.weight, self.bias))  # fmt: skip
        elif fmt == "int4-weights" and dtype == torch.float32 and (kernels := gguf_kernels()) is not None:
            q, scale, low = _int4_groups(weight, groups)  # float32 inputs, scales and sums (cpu_kernels.py)
            q4, scale, low = pack_int4(q), scale.contiguous(), low.contiguous()
            # many rows at once (a batch, a prompt chunk) take the float32 product of the same values: the kernel
            # unpacks the groups again for every row, torch's GEMM reads the weights once for all
            self.weight = ((low[..., None] + q.reshape(q.shape[0], -1, INT4_GROUP) * scale[..., None])
                           .reshape(weight.shape).to(dtype).contiguous())  # fmt: skip
            self._call = lambda x: (self._with_bias(kernels.int4_matmul(x.contiguous(), q4, scale, low))
                                    if x.shape[0] <= KERNEL_ROWS else F.linear(x, self.weight, self.bias))  # fmt: skip
        elif fmt == "int4-weights":
            packed4, scales_zeros = _int4_pack(weight, groups)
            self._call = lambda x: self._with_bias(
                torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed4, INT4_GROUP,
                                                           scales_zeros).to(dtype)
            )  # fmt: skip
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

    def add_to_(self, residual: Tensor, x: Tensor) -> None:
        """``residual += self(x)`` in place.

        One ``addmm_`` for dense weights: the residual add fused into the product, and no copy of the residual
        into a fresh output, which ``addmm`` makes (on a GPU a memcpy per call, two per layer).
        """
        if self.fmt == "dense" and self.bias is None:
            residual.addmm_(x, self.weight.t())
        else:
            residual.add_(self._call(x))
