"""The decoder forward over one step: a flat batch of tokens from many rows, each row in its own cache slot.

A step holds ``n`` decode rows (one new token each, listed first, in slot order) and prefill chunks (a run of
prompt tokens of one row each). Every linear layer runs once over all ``N`` tokens; attention runs once for
all decode rows and once per prefill chunk. Logits are computed only for the tokens that are sampled from.
"""

from __future__ import annotations

import functools
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
    """The decoder loop: embeddings, ``L`` x (attention + MLP), final norm, LM head, in every engine form.

    The Llama layer is ``x += o(attn(norm(x)))``, ``x += down(act(gate) · up)`` on ``norm(x)``. The forms' differences
    (:class:`slmstack.engine.weights.EngineForm`) are switches read from the weights: LayerNorm, q/k norms, part of
    each head rotated, sliding windows, norms after attention and the MLP (Gemma), a parallel residual (GPT-NeoX),
    an ungated MLP, the final logits' soft-capping.
    """

    def __init__(self, weights: DecoderWeights, cache: KVCache, lora: LoraBank,
                 options: EngineOptions | None = None) -> None:  # fmt: skip
        self.w, self.cache, self.lora = weights, cache, lora
        self.options = options or EngineOptions()
        s = weights.shape
        self.q_width, self.kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.act = functools.partial(getattr(F, s.act), **dict(s.act_kwargs))
        self.windows = sorted({layer.window for layer in weights.layers if layer.window})

    @torch.inference_mode()
    def forward(self, step: StepInput) -> Tensor:
        """Write the step's keys and values into the cache; return the logits of ``step.sample``, (n_sample, V)."""
        return self.run(step)

    def _norm(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        s = self.w.shape
        return rms_norm(x, weight, s.eps) if s.norm == "rms" else F.layer_norm(x, (x.shape[-1],), weight, bias, s.eps)

    def run(self, step: StepInput) -> Tensor:
        """:meth:`forward` without its ``inference_mode`` (the caller holds it, or ``no_grad``: see graphs.py)."""
        s, w = self.w.shape, self.w
        x = F.embedding(step.tokens, w.embed)  # (N, C)
        if s.embed_scale != 1.0:
            x = x * s.embed_scale
        # RoPE and the cache write in one kernel (kernels.py), where every head turns whole
        fused = not s.rotary and self.options.kernel(x.device, "rope")
        positions: dict[int, tuple[Tensor, Tensor]] = {}  # a RoPE table's rows for the step's tokens, by table
        masks: dict[int | None, Tensor | None] = {}  # the decode mask of each window (None: whole rows)
        for window in [None, *self.windows] if step.n_decode else ():
            masks[window] = decode_mask(step.decode_lens, step.decode_length, x.dtype, step.static, window)
        for i, layer in enumerate(w.layers):
            h = self._norm(x, layer.ln1, layer.ln1_bias)
            qkv = layer.qkv(h)  # (N, (H + 2 KV) hd)
            lora_add(qkv, h, i, "qkv", self.lora, step.lora)
            heads = qkv[:, : self.q_width + self.kv_width].view(-1, s.heads + s.kv_heads, s.head_dim)
            if layer.qk_norm is not None:  # each query and key head normed (the attention scale in the queries')
                heads.copy_(F.rms_norm(heads, (s.head_dim,), None, s.eps).mul_(layer.qk_norm))
            kv_cache = self.cache.kv[i]  # (S, KV, 2, T, hd)
            if fused:
                rope_store_(qkv, layer.cos, layer.sin, step.positions, step.slots, kv_cache, s.heads, s.kv_heads)
            else:
                key = id(layer.cos)
                if key not in positions:
                    positions[key] = (layer.cos[step.positions][:, None, :], layer.sin[step.positions][:, None, :])
                cos, sin = positions[key]  # (N, 1, rotary)
                rope_(heads[..., : s.rotary] if s.rotary else heads, cos, sin)
                new = qkv[:, self.q_width :].view(-1, 2, s.kv_heads, s.head_dim).transpose(1, 2)  # (N, KV, 2, hd)
                kv_cache[step.slots, :, :, step.positions] = new
            q = qkv[:, : self.q_width].view(-1, s.heads, s.head_dim)  # (N, H, hd)
            attn = self._attention(q, kv_cache, step, masks.get(layer.window), layer.window)  # (N, H hd)
            if s.parallel:  # GPT-NeoX: the MLP reads the layer's input
                h = self._norm(x, layer.ln2, layer.ln2_bias)
            if layer.post_attn is None:
                layer.o.add_to_(x, attn)  # x += o(attn)
                lora_add(x, attn, i, "o", self.lora, step.lora)
            else:  # Gemma: x += norm(o(attn))
                out = layer.o(attn)
                lora_add(out, attn, i, "o", self.lora, step.lora)
                x.add_(rms_norm(out, layer.post_attn, s.eps))
            if not s.parallel:
                h = self._norm(x, layer.ln2, layer.ln2_bias)
            gate_up = layer.gate_up(h)  # (N, 2 I) or (N, I)
            lora_add(gate_up, h, i, "gate_up", self.lora, step.lora)
            if s.gated:
                gate, up = gate_up.chunk(2, dim=-1)
                act = self.act(gate) * up  # (N, I)
            else:
                act = self.act(gate_up)
            if layer.post_mlp is None:
                layer.down.add_to_(x, act)  # x += down(act)
                lora_add(x, act, i, "down", self.lora, step.lora)
            else:
                out = layer.down(act)
                lora_add(out, act, i, "down", self.lora, step.lora)
                x.add_(rms_norm(out, layer.post_mlp, s.eps))
        if step.sample is not None:
            x = x.index_select(0, step.sample)  # only the tokens that are sampled from
            if not len(x):
                return x.new_empty(0, s.vocab, dtype=torch.float32)
        logits = w.lm_head(self._norm(x, w.norm, w.norm_bias)).float()  # (n_sample, V)
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits

    def _attention(self, q: Tensor, kv_cache: Tensor, step: StepInput, mask: Tensor | None,
                   window: int | None) -> Tensor:  # fmt: skip
        n = step.n_decode
        if not step.chunks:
            return self._decode_attention(q, kv_cache, step, mask)
        parts = []
        if n:
            parts.append(self._decode_attention(q[:n], kv_cache, step, mask))
        for offset, length, slot, start in step.chunks:
            parts.append(prefill_attention(q[offset : offset + length], kv_cache, slot, start, window))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _decode_attention(self, q: Tensor, kv_cache: Tensor, step: StepInput, mask: Tensor | None) -> Tensor:
        kernel = self.options.decode_kernel
        if step.decode_view is None:
            return decode_attention(q, kv_cache, step.decode_slots, mask, step.decode_length, kernel)
        # the rows' queries laid out by slot: attention reads the first m slots of the cache in place
        out = decode_attention(q.index_select(0, step.decode_view), kv_cache, None, mask, step.decode_length, kernel)
        return out.index_select(0, step.decode_slots)
