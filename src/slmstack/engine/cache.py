"""The KV cache: one contiguous region per slot, allocated once per size and grown by doubling.

Layout per layer: ``(slots, KV, 2, T, hd)``, the keys and values of a head side by side, so that a step writes both
with one indexed copy and a decode step gathers its rows' keys and values with one indexed read, while the keys
alone are still a view whose ``(slots, KV)`` axes fold into one batch axis for a batched product. A request holds
one slot from admission to its end, so attention reads its keys as one strided view, with no block table to gather
through. For models this size that is the simpler and faster choice on a CPU: a paged cache (nano-vllm's block
manager) saves memory when sequences vary widely in length, at the cost of a gather of every row's blocks at every
step, while here a slot of the default model costs 45 KB per token (30 layers x 2 x 3 heads x 64 x 4 bytes). ``T``
starts at the longest sequence the first requests need (rounded up to a power of two) and doubles when a longer one
arrives, up to the context window; a decode step allocates nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of every slot, every layer."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.layers, self.kv_heads, self.head_dim, self.slots = layers, kv_heads, head_dim, slots
        self.max_length, self.dtype, self.device = max_length, dtype, torch.device(device)
        self.length = 0
        self.kv: list[Tensor] = []  # per layer, (S, KV, 2, T, hd)

    def copy(self, src: int, dst: list[int], length: int) -> None:
        """Positions ``0..length-1`` of slot ``src`` into each slot of ``dst``, every layer."""
        index = torch.tensor(dst, device=self.device)
        for kv in self.kv:  # (S, KV, 2, T, hd)
            kv[index, :, :, :length] = kv[src : src + 1, :, :, :length]

    def ensure(self, length: int) -> bool:
        """Make every slot hold at least ``length`` positions; True when the buffers were (re)allocated."""
        if length <= self.length:
            return False
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens does not fit the {self.max_length}-token context")
        new = min(self.max_length, 1 << max(4, (length - 1).bit_length()))
        shape = (self.slots, self.kv_heads, 2, new, self.head_dim)
        kv = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        if self.length:
            for old, fresh in zip(self.kv, kv, strict=True):
                fresh[..., : self.length, :].copy_(old[..., : self.length, :])
        self.kv, self.length = kv, new
        return True
