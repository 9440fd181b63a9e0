"""LoRA adapters in the engine: packed factors per adapter, and a step's rows grouped by adapter.

For each fused projection (``qkv``, ``o``, ``gate_up``, ``down``) an adapter keeps ``Aᵀ`` (in, R) and ``s·Bᵀ``
(R, out), the factors of its sub-projections side by side (``Aᵀ`` concatenated, ``s·Bᵀ`` block-diagonal), so
``lora(x) = (x @ Aᵀ) @ (s·Bᵀ)`` is two matrix products for q, k and v together. peft's forward computes the
same sum (``lora_B(lora_A(x)) * s``); the factors are read from the peft model the stack already loaded, so
there is one source of truth.

When every row of a step shares one adapter (a single request, a batch of one stage) its delta is one in-place
``addmm_``; rows on the bare base cost nothing then. A mixed step on a GPU runs one Triton kernel per projection
(:mod:`slmstack.engine.kernels`, Punica's BGMV). Elsewhere its decode rows multiply by the stacked factors of the
adapters they use, side by side, with each row's columns of the other adapters masked (:func:`lora_add`: three
operations per projection whatever the number of adapters), and each prompt chunk, under one adapter, takes the
single-adapter form on its slice. Measured on the default model (``benchmarks/engine.py``, 16 rows over 4 rank-8
adapters): grouping decode rows by adapter (an ``index_add_`` per group) and gathering each row's factors for a
batched ``bmm`` both cost more than the masked form, the first in dispatches (four per adapter), the second in
copies (``rows × R × (in + out)`` values per projection and layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slmstack.arch import get_decoder_layers
from slmstack.engine.kernels import bgmv_add_
from slmstack.engine.weights import EngineForm, base_linear, engine_form
from slmstack.errors import ConfigError

__all__ = ["Layout", "LoraBank", "LoraFactors", "StepAdapters", "lora_add"]


@dataclass
class LoraFactors:
    """One adapter's factors on one fused projection."""

    a_t: Tensor  # (in, R)
    b_t: Tensor  # (R, out), scaling folded in


Run = tuple[int, int, int]  # (start, end, adapter id): tokens that share one adapter


@dataclass(eq=False)
class Layout:
    """Which adapter owns each column of the stacked factors: ``owner`` (ΣR,) ids, ``spans`` id -> (start, end)."""

    owner: Tensor
    spans: dict[int, tuple[int, int]]


class EngineUnsupportedAdapter(ConfigError):
    """A peft adapter the engine does not compute (DoRA, LoRA bias, ...)."""


class LoraBank:
    """Every adapter the engine knows, by name; id 0 is the bare base model."""

    def __init__(self, max_rank: int = 64) -> None:
        self.max_rank = max_rank
        self.ids: dict[str, int] = {}
        self.factors: dict[int, list[dict[str, LoraFactors]]] = {}
        self._stacked: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor] | None] = {}
        self._padded: dict[tuple[int, str], tuple[Tensor, Tensor] | None] = {}
        self._owners: dict[tuple, Layout] = {}
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
        form = engine_form(model)
        per_layer = [self._read_layer(layer, name, dtype, form) for layer in get_decoder_layers(model)]
        if not any(per_layer):
            raise EngineUnsupportedAdapter(f"adapter {name!r} targets none of the projections the engine computes")
        aid = self.ids.get(name) or self._next
        if name not in self.ids:
            self.ids[name] = aid
            self._next += 1
        self.factors[aid] = per_layer
        self._stacked, self._padded, self._owners = {}, {}, {}
        return aid

    def remove(self, name: str) -> None:
        """Forget adapter ``name``; rows already running under it must have finished."""
        aid = self.ids.pop(name)
        del self.factors[aid]
        self._stacked, self._padded, self._owners = {}, {}, {}

    def stacked(self, layer: int, module: str) -> tuple[Tensor, Tensor, Layout] | None:
        """Every adapter's factors on one projection side by side: ``(Aᵀ (in, ΣR), s·Bᵀ (ΣR, out), layout)``.

        Adapters in id order; the layout says which adapter owns each column. Built once after adapters change,
        then reused every step.
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
                    owner = torch.cat([torch.full((r,), aid, device=a.device) for aid, r in layout])
                    ends = torch.tensor([r for _, r in layout]).cumsum(0).tolist()
                    spans = {aid: (end - r, end) for (aid, r), end in zip(layout, ends, strict=True)}
                    self._owners[layout] = Layout(owner, spans)
                self._stacked[key] = (a, b, self._owners[layout])
        return self._stacked[key]

    def padded(self, layer: int, module: str) -> tuple[Tensor, Tensor] | None:
        """Every adapter's factors on one projection, by id, padded to one rank.

        ``Aᵀ`` (ids, in, R) and ``s·Bᵀ`` (ids, R, out), R the largest rank rounded up to a power of two, zeros where
        an adapter has none (and at id 0). The form :func:`slmstack.engine.kernels.bgmv_add_` reads; built once
        after adapters change.
        """
        key = (layer, module)
        if key not in self._padded:
            parts = {aid: f[layer][module] for aid, f in self.factors.items() if module in f[layer]}
            if not parts:
                self._padded[key] = None
            else:
                first = next(iter(parts.values()))
                (in_features, _), out_features = first.a_t.shape, first.b_t.shape[1]
                rank = 1 << (max(p.a_t.shape[1] for p in parts.values()) - 1).bit_length()
                ids = max(self.factors) + 1
                a = first.a_t.new_zeros(ids, in_features, rank)
                b = first.b_t.new_zeros(ids, rank, out_features)
                for aid, p in parts.items():
                    a[aid, :, : p.a_t.shape[1]] = p.a_t
                    b[aid, : p.b_t.shape[0]] = p.b_t
                self._padded[key] = (a, b)
        return self._padded[key]

    def _read_layer(self, layer: Any, name: str, dtype: torch.dtype, form: EngineForm) -> dict[str, LoraFactors]:
        out: dict[str, LoraFactors] = {}
        for fused, parts in form.modules.items():
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
            if fused == "qkv" and form.interleaved_qkv:  # the engine's row order (EngineForm.qkv_rows)
                config = layer.attention.config
                heads = config.num_attention_heads
                b_t = b_t[:, form.qkv_rows(heads, config.hidden_size // heads)]
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

    ``single``: the one adapter id every token of the step runs under (0: none). Otherwise ``rows``, the
    adapter ids (n,) of the step's first n tokens, which take the mixed form (with the masks built from it, one per
    column layout, cached for the step), and ``runs``: (start, end, adapter id) spans of the tokens after them
    that share one adapter (a prompt chunk), each taking the single-adapter form on its slice. ``present``: the
    adapter ids in ``rows`` when known on the host (the mixed form then skips the columns of adapters no row
    uses, where they lie outside the span of those that it does); None inside a CUDA graph, whose shapes
    must not depend on them.
    """

    def __init__(self, single: int | None = None, rows: Tensor | None = None, runs: tuple[Run, ...] = (),
                 present: frozenset[int] | None = None, kernel: bool = False) -> None:  # fmt: skip
        self.single, self.rows, self.runs, self.present = single, rows, runs, present
        self._masks: dict[tuple[int, int, int], Tensor] = {}
        self._columns: dict[int, tuple[int, int]] = {}
        # a mix on a GPU: one kernel per projection (kernels.py) in place of the masked form
        self.kernel = rows is not None and kernel

    @classmethod
    def for_tokens(
        cls, adapters: list[int], n_decode: int, device: torch.device, kernel: bool = False
    ) -> StepAdapters:
        """The adapters of a step's tokens: ``n_decode`` decode rows, one token each, then prompt chunks.

        One adapter: the single form. Where the LoRA kernel runs: every token in it (one launch a projection).
        Elsewhere the decode rows take the mixed form when they mix adapters, and every span of tokens that
        shares one adapter (a prompt chunk, or the decode rows when they do not mix) its own factors on its
        slice: the mixed form computes every adapter's factors for every token, 4x the work with four adapters.
        """
        if len(set(adapters)) == 1:
            return cls(single=adapters[0])
        if kernel:
            return cls(rows=torch.tensor(adapters, dtype=torch.long, device=device), kernel=True)
        present = frozenset(adapters[:n_decode]) - {0}
        mixed = n_decode if len(set(adapters[:n_decode])) > 1 else 0
        runs, start = [], mixed
        for i in range(mixed + 1, len(adapters) + 1):
            if i == len(adapters) or adapters[i] != adapters[start]:
                if adapters[start]:
                    runs.append((start, i, adapters[start]))
                start = i
        rows = torch.tensor(adapters[:mixed], dtype=torch.long, device=device) if mixed else None
        return cls(rows=rows, runs=tuple(runs), present=present if mixed else None)

    def columns(self, layout: Layout) -> tuple[int, int]:
        """The stacked columns the mixed rows need: from the first present adapter's to the last one's."""
        key = id(layout)
        if key not in self._columns:
            if self.present is None:
                self._columns[key] = (0, len(layout.owner))
            else:
                spans = [layout.spans[aid] for aid in self.present if aid in layout.spans]
                self._columns[key] = (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (0, 0)
        return self._columns[key]

    def mask(self, layout: Layout, lo: int, hi: int) -> Tensor:
        """(n, hi - lo): 1 where a row's adapter owns the column."""
        key = (id(layout), lo, hi)
        if key not in self._masks:
            self._masks[key] = (self.rows[:, None] == layout.owner[None, lo:hi]).float()
        return self._masks[key]


def lora_add(out: Tensor, x: Tensor, layer: int, module: str, bank: LoraBank, step: StepAdapters) -> None:
    """``out += lora(x)`` in place, each row under its own adapter (rows on the bare base get nothing).

    One adapter for the whole step: ``out += (x @ Aᵀ) @ (s·Bᵀ)`` with its own factors. A mix on a GPU: the BGMV
    kernel. Otherwise, for the mixed rows, the factors of the adapters they use side by side (columns
    :meth:`StepAdapters.columns` of :meth:`LoraBank.stacked`), ``t = x @ Aᵀ_all``, each row's columns of the other
    adapters zeroed by a mask, ``out += t @ (s·Bᵀ)_all``: three operations for any number of adapters, where
    grouping rows by adapter costs four per adapter (measured in ``benchmarks/engine.py``); then each run of tokens
    under one adapter with its own factors on its slice.
    """
    if step.single is not None:
        if step.single:
            f = bank.factors[step.single][layer].get(module)
            if f is not None:
                out.addmm_(x @ f.a_t, f.b_t)
        return
    if step.kernel:
        padded = bank.padded(layer, module)
        if padded is not None:
            bgmv_add_(out, x, padded[0], padded[1], step.rows)
        return
    if step.rows is not None:
        stacked = bank.stacked(layer, module)
        if stacked is not None:
            a, b, layout = stacked
            lo, hi = step.columns(layout)
            if lo < hi:
                n = len(step.rows)
                out[:n].addmm_((x[:n] @ a[:, lo:hi]).mul_(step.mask(layout, lo, hi).to(x.dtype)), b[lo:hi])
    for start, end, aid in step.runs:
        f = bank.factors[aid][layer].get(module)
        if f is not None:
            out[start:end].addmm_(x[start:end] @ f.a_t, f.b_t)
