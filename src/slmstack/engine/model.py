"""The decoder forward over one step: a flat batch of tokens from many rows, each row in its own cache slot.

A step holds ``n`` decode rows (one new token each, listed first, in slot order) and prefill chunks (a run of
prompt tokens of one row each). Every linear layer runs once over all ``N`` tokens; attention runs once for
all decode rows and once per prefill chunk. Logits are computed only for the tokens that are sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from slmstack.engine.cache import KVCache
from slmstack.engine.kernels import rope_store_
from slmstack.engine.layers import decode_attention, decode_mask, prefill_attention, rms_norm, rope_
from slmstack.engine.lora import LoraBank, StepAdapters, lora_add
from slmstack.engine.options import EngineOptions
from slmstack.engine.weights import DecoderWeights

__all__ = ["Decoder", "StepInput"]


@dataclass
class StepInput:
    """The tensors of one step (built from the scheduler's plan by the engine)."""

    tokens: Tensor  # (N,) token ids: decode rows first, then each prefill chunk
    positions: Tensor  # (N,) each token's position in its row
    slots: Tensor  # (N,) each token's cache slot
    n_decode: int
    decode_slots: Tensor | None  # (n,) each decode row's slot, or None when decode row i sits in slot i
    decode_lens: Tensor  # (n,) each decode row's length including its new token; (m,) by slot with decode_view
    decode_length: int  # max(decode_lens)
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)  # (offset in N, length, slot, start)
    lora: StepAdapters = field(default_factory=StepAdapters)  # each token's adapter
    sample: Tensor | None = None  # (n_sample,) indices of the tokens whose logits are wanted
    static: bool = False  # a CUDA-graph step: no host-side decisions on tensor values (see graphs.py)
    # (m,) the decode row in each of the cache's first m slots (any row for an idle slot): decode attention runs
    # over those slots where they lie, not over a copy of the rows' keys and values (Decoder._decode_attention)
    decode_view: Tensor | None = None


class Decoder:
    """A Llama-layout decoder: embeddings, ``L`` x (attention + SiLU-gated MLP), final norm, LM head."""

    def __init__(self, weights: DecoderWeights, cache: KVCache, lora: LoraBank,
                 options: EngineOptions | None = None) -> None:  # fmt: skip
        self.w, self.cache, self.lora = weights, cache, lora
        self.options = options or EngineOptions()
        s = weights.shape
        self.q_width, self.kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim

    @torch.inference_mode()
    def forward(self, step: StepInput) -> Tensor:
        """Write the step's keys and values into the cache; return the logits of ``step.sample``, (n_sample, V)."""
        return self.run(step)

    def run(self, step: StepInput) -> Tensor:
        """:meth:`forward` without its ``inference_mode`` (the caller holds it, or ``no_grad``: see graphs.py)."""
        s, w = self.w.shape, self.w
        x = F.embedding(step.tokens, w.embed)  # (N, C)
        fused = self.options.kernel(x.device, "rope")  # RoPE and the cache write in one kernel (kernels.py)
        if not fused:
            cos, sin = w.cos[step.positions][:, None, :], w.sin[step.positions][:, None, :]  # (N, 1, hd)
        mask = decode_mask(step.decode_lens, step.decode_length, x.dtype, step.static) if step.n_decode else None
        for i, layer in enumerate(w.layers):
            h = rms_norm(x, layer.ln1, s.eps)
            qkv = layer.qkv(h)  # (N, (H + 2 KV) hd)
            lora_add(qkv, h, i, "qkv", self.lora, step.lora)
            kv_cache = self.cache.kv[i]  # (S, KV, 2, T, hd)
            if fused:
                rope_store_(qkv, w.cos, w.sin, step.positions, step.slots, kv_cache, s.heads, s.kv_heads)
            else:
                rope_(qkv[:, : self.q_width + self.kv_width].view(-1, s.heads + s.kv_heads, s.head_dim), cos, sin)
                new = qkv[:, self.q_width :].view(-1, 2, s.kv_heads, s.head_dim).transpose(1, 2)  # (N, KV, 2, hd)
                kv_cache[step.slots, :, :, step.positions] = new
            q = qkv[:, : self.q_width].view(-1, s.heads, s.head_dim)  # (N, H, hd)
            attn = self._attention(q, kv_cache, step, mask)  # (N, H hd)
            layer.o.add_to_(x, attn)  # x += o(attn)
            lora_add(x, attn, i, "o", self.lora, step.lora)
            h = rms_norm(x, layer.ln2, s.eps)
            gate_up = layer.gate_up(h)  # (N, 2 I)
            lora_add(gate_up, h, i, "gate_up", self.lora, step.lora)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up  # (N, I)
            layer.down.add_to_(x, act)  # x += down(act)
            lora_add(x, act, i, "down", self.lora, step.lora)
        if step.sample is not None:
            x = x.index_select(0, step.sample)  # only the tokens that are sampled from
            if not len(x):
                return x.new_empty(0, s.vocab, dtype=torch.float32)
        return w.lm_head(rms_norm(x, w.norm, s.eps)).float()  # (n_sample, V)

    def _attention(self, q: Tensor, kv_cache: Tensor, step: StepInput, mask: Tensor | None) -> Tensor:
        n = step.n_decode
        if not step.chunks:
            return self._decode_attention(q, kv_cache, step, mask)
        parts = []
        if n:
            parts.append(self._decode_attention(q[:n], kv_cache, step, mask))
        for offset, length, slot, start in step.chunks:
            parts.append(prefill_attention(q[offset : offset + length], kv_cache, slot, start))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _decode_attention(self, q: Tensor, kv_cache: Tensor, step: StepInput, mask: Tensor | None) -> Tensor:
        kernel = self.options.decode_kernel
        if step.decode_view is None:
            return decode_attention(q, kv_cache, step.decode_slots, mask, step.decode_length, kernel)
        # the rows' queries laid out by slot: attention reads the first m slots of the cache in place
        out = decode_attention(q.index_select(0, step.decode_view), kv_cache, None, mask, step.decode_length, kernel)
        return out.index_select(0, step.decode_slots)
