"""LoRA adapters in the engine: packed factors per adapter, and a step's rows grouped by adapter.

For each fused projection (``qkv``, ``o``, ``gate_up``, ``down``) an adapter keeps ``Aᵀ`` (in, R) and ``s·Bᵀ``
(R, out), the factors of its sub-projections side by side (``Aᵀ`` concatenated, ``s·Bᵀ`` block-diagonal), so
``lora(x) = (x @ Aᵀ) @ (s·Bᵀ)`` is two matrix products for q, k and v together. peft's forward computes the
same sum (``lora_B(lora_A(x)) * s``); the factors are read from the peft model the stack already loaded, so
there is one source of truth.

When every row of a step shares one adapter (a single request, a batch of one stage) its delta is one in-place
``addmm_``; rows on the bare base cost nothing then. A mixed step multiplies by every loaded adapter's factors
side by side and masks each row's columns to its own adapter's (:func:`lora_add`): three operations per
projection whatever the number of adapters. Measured on the default model (``benchmarks/engine.py``, 16 rows over
4 rank-8 adapters): grouping rows by adapter (an ``index_add_`` per group) and gathering each row's factors for a
batched ``bmm`` both cost more, the first in dispatches (four per adapter), the second in copies (``rows × R ×
(in + out)`` values per projection and layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slmstack.arch import get_decoder_layers
from slmstack.engine.weights import base_linear
from slmstack.errors import ConfigError

__all__ = ["MODULES", "LoraBank", "LoraFactors", "StepAdapters", "lora_add"]

# fused projection -> the model's sub-projections, in the order their outputs are concatenated
MODULES: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass
class LoraFactors:
    """One adapter's factors on one fused projection."""

    a_t: Tensor  # (in, R)
    b_t: Tensor  # (R, out), scaling folded in


class EngineUnsupportedAdapter(ConfigError):
    """A peft adapter the engine does not compute (DoRA, LoRA bias, ...)."""


class LoraBank:
    """Every adapter the engine knows, by name; id 0 is the bare base model."""

    def __init__(self, max_rank: int = 64) -> None:
        self.max_rank = max_rank
        self.ids: dict[str, int] = {}
        self.factors: dict[int, list[dict[str, LoraFactors]]] = {}
        self._stacked: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor] | None] = {}
        self._owners: dict[tuple, Tensor] = {}
        self._next = 1

    def id(self, name: str | None) -> int:
        """The id of adapter ``name`` (None or ``"__base__"``: 0, the bare base)."""
        if name is None or name == "__base__":
            return 0
        if name not in self.ids:
            raise ConfigError(f"adapter {name!r} is not loaded in the engine; loaded: {', '.join(self.ids) or 'none'}")
        return self.ids[name]

    def add(self, model: Any, name: str, dtype: torch.dtype = torch.float32) -> int:
        """Read adapter ``name`` from the peft model ``model`` (already attached and checked) and register it.

        Raises:
            EngineUnsupportedAdapter: a DoRA or other LoRA variant, a LoRA bias, or a rank over ``max_rank``.
        """
        per_layer = [self._read_layer(layer, name, dtype) for layer in get_decoder_layers(model)]
        if not any(per_layer):
            raise EngineUnsupportedAdapter(f"adapter {name!r} targets none of the projections the engine computes")
        aid = self.ids.get(name) or self._next
        if name not in self.ids:
            self.ids[name] = aid
            self._next += 1
        self.factors[aid] = per_layer
        self._stacked, self._owners = {}, {}
        return aid

    def remove(self, name: str) -> None:
        """Forget adapter ``name``; rows already running under it must have finished."""
        aid = self.ids.pop(name)
        del self.factors[aid]
        self._stacked, self._owners = {}, {}

    def stacked(self, layer: int, module: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """Every adapter's factors on one projection side by side: ``(Aᵀ (in, ΣR), s·Bᵀ (ΣR, out), owner (ΣR,))``.

        ``owner[j]`` is the adapter id of column j. Built once after adapters change, then reused every step.
        """
        key = (layer, module)
        if key not in self._stacked:
            parts = [(aid, f[layer][module]) for aid, f in sorted(self.factors.items()) if module in f[layer]]
            if not parts:
                self._stacked[key] = None
            else:
                a = torch.cat([p.a_t for _, p in parts], dim=1)
                b = torch.cat([p.b_t for _, p in parts], dim=0)
                # one owner tensor per column layout, shared by every layer and projection that has it, so that a
                # step builds each layout's mask once (StepAdapters.mask caches by tensor), not once per layer
                layout = tuple((aid, p.a_t.shape[1]) for aid, p in parts)
                if layout not in self._owners:
                    self._owners[layout] = torch.cat([torch.full((r,), aid, device=a.device) for aid, r in layout])
                self._stacked[key] = (a, b, self._owners[layout])
        return self._stacked[key]

    def _read_layer(self, layer: Any, name: str, dtype: torch.dtype) -> dict[str, LoraFactors]:
        out: dict[str, LoraFactors] = {}
        for fused, parts in MODULES.items():
            modules = [layer.get_submodule(p) for p in parts]
            pieces = []
            for part, m in zip(parts, modules, strict=True):
                if not hasattr(m, "lora_A") or name not in m.lora_A:
                    pieces.append((None, base_linear(m).out_features))
                    continue
                self._check(m, name, part)
                a, b = m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach()  # (r, in), (out, r)
                pieces.append(((a, b * m.scaling[name]), b.shape[0]))
            if all(p is None for p, _ in pieces):
                continue
            ranks = [0 if p is None else p[0].shape[0] for p, _ in pieces]
            widths = [w for _, w in pieces]
            in_features = base_linear(modules[0]).in_features
            a_t = torch.zeros(in_features, sum(ranks), dtype=dtype)
            b_t = torch.zeros(sum(ranks), sum(widths), dtype=dtype)  # block-diagonal
            r0 = c0 = 0
            for (p, width), r in zip(pieces, ranks, strict=True):
                if p is not None:
                    a_t[:, r0 : r0 + r] = p[0].t()
                    b_t[r0 : r0 + r, c0 : c0 + width] = p[1].t()
                r0, c0 = r0 + r, c0 + width
            device = base_linear(modules[0]).weight.device
            out[fused] = LoraFactors(a_t.to(device), b_t.to(device))
        return out

    def _check(self, module: Any, name: str, part: str) -> None:
        variant = getattr(module, "lora_variant", {}) or {}
        if name in variant or (getattr(module, "use_dora", {}) or {}).get(name):
            raise EngineUnsupportedAdapter(f"adapter {name!r} is a LoRA variant (DoRA or similar) on {part}")
        if getattr(module.lora_B[name], "bias", None) is not None:
            raise EngineUnsupportedAdapter(f"adapter {name!r} has a LoRA bias on {part}")
        if module.lora_A[name].weight.shape[0] > self.max_rank:
            raise EngineUnsupportedAdapter(f"adapter {name!r} has rank {module.lora_A[name].weight.shape[0]} "
                                           f"on {part}, over max_lora_rank {self.max_rank}")  # fmt: skip


class StepAdapters:
    """A step's rows' adapters, as :func:`lora_add` uses them.

    ``single``: the one adapter id every token of the step runs under (0: none). Otherwise ``rows``, each
    token's adapter id (N,), and the masks built from it, one per column layout, cached for the step.
    """

    def __init__(self, single: int | None = None, rows: Tensor | None = None) -> None:
        self.single, self.rows = single, rows
        self._masks: dict[int, Tensor] = {}

    def mask(self, owner: Tensor) -> Tensor:
        """(N, ΣR): 1 where a token's adapter owns the column."""
        key = id(owner)
        if key not in self._masks:
            self._masks[key] = (self.rows[:, None] == owner[None, :]).to(owner.dtype if owner.is_floating_point()
                                                                           else torch.float32)  # fmt: skip
        return self._masks[key]


def lora_add(out: Tensor, x: Tensor, layer: int, module: str, bank: LoraBank, step: StepAdapters) -> None:
    """``out += lora(x)`` in place, each row under its own adapter (rows on the bare base get nothing).

    One adapter for the whole step: ``out += (x @ Aᵀ) @ (s·Bᵀ)`` with its own factors. A mix: every loaded
    adapter's factors side by side (:meth:`LoraBank.stacked`), ``t = x @ Aᵀ_all``, each row's columns of the
    other adapters zeroed by a mask, ``out += t @ (s·Bᵀ)_all``: three operations for any number of adapters, where
    grouping rows by adapter costs four per adapter (measured in ``benchmarks/engine.py``).
    """
    if step.single is not None:
        if step.single:
            f = bank.factors[step.single][layer].get(module)
            if f is not None:
                out.addmm_(x @ f.a_t, f.b_t)
        return
    stacked = bank.stacked(layer, module)
    if stacked is None:
        return
    a, b, owner = stacked
    out.addmm_((x @ a).mul_(step.mask(owner).to(x.dtype)), b)
