"""LoRA at inference time with less work per layer than peft's forward, for the stack's generation.

peft's LoRA ``Linear.forward`` computes ``result + lora_B(lora_A(dropout(x))) * scaling``: two small
matmuls, then a scaled copy and a sum, each a full pass over the layer's output, on every one of a
model's ~200 wrapped projections at every decoding step. At inference (no dropout) the same value is
one in-place ``addmm``: ``result += (x @ Aᵀ) @ (s·Bᵀ)`` with ``Aᵀ`` and ``s·Bᵀ`` packed once per adapter.
Rows of a mixed batch are grouped by adapter as peft groups them (``"__base__"`` rows get nothing).

:func:`fused_lora` swaps this forward in for the duration of a ``with`` block, on every plain LoRA
``Linear`` of a peft model; layers peft handles differently (DoRA and other variants, merged weights,
bitsandbytes) keep peft's own forward. The packed factors are cached per layer and adapter, checked on
entry to the block and rebuilt when the adapter's weights changed (they cannot change inside it). With
``s`` a power of two (``lora_alpha / r`` is 2 by default) the product is the one peft computes, bit for
bit; otherwise it differs by rounding only.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["fused_lora"]

_CACHE = "_slmstack_fused"  # per-layer dict: adapter -> (weights' identity, Aᵀ, s·Bᵀ)


def _packed(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    key = (a.data_ptr(), a._version, b.data_ptr(), b._version, layer.scaling[name])
    cache = layer.__dict__.setdefault(_CACHE, {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, a.detach().t().contiguous(), (b.detach().t() * layer.scaling[name]).contiguous())
        cache[name] = hit
    return hit[1], hit[2]


def _add_lora(layer: Any, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out += lora(x)`` in place; ``x`` is (N, in) and ``out`` (N, out). Packed on entry to :func:`fused_lora`."""
    _, a_t, b_t = layer.__dict__[_CACHE][name]
    if a_t.dtype == out.dtype:
        out.addmm_(x.to(a_t.dtype) @ a_t, b_t)
    else:  # e.g. fp32 adapters on a bf16 base, as peft keeps them: compute in the adapter's dtype
        out.add_(((x.to(a_t.dtype) @ a_t) @ b_t).to(out.dtype))


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter_names = kwargs.get("adapter_names")
    names = self.active_adapters if adapter_names is None else list(dict.fromkeys(adapter_names))
    if self.merged or any(n in self.lora_variant for n in names) or torch.is_grad_enabled():
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    kwargs.pop("adapter_names", None)
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters:
        return result
    flat_x, flat = x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1])
    for name in names:
        if name not in self.lora_A:
            continue  # "__base__", or an adapter that does not touch this layer
        rows = None if adapter_names is None else [i for i, n in enumerate(adapter_names) if n == name]
        if rows is None or len(rows) == len(adapter_names):
            _add_lora(self, name, flat_x, flat)
        else:  # a sub-batch: gather its rows, add, scatter back
            sub = result[rows]
            _add_lora(self, name, x[rows].reshape(-1, x.shape[-1]), sub.view(-1, sub.shape[-1]))
            result[rows] = sub
    return result


def _plain_lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear]


@contextmanager
def fused_lora(model: nn.Module) -> Iterator[None]:
    """Use the fused LoRA forward on every plain LoRA ``Linear`` of ``model`` inside the block."""
    if not hasattr(model, "peft_config"):
        yield
        return
    layers = _plain_lora_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
        for name in layer.lora_A:  # pack every adapter now, before activations are allocated: packing
            _packed(layer, name)  # between them at the first forward fragments the heap (+40 % peak RSS)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
