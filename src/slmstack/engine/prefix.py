"""Prompt prefixes kept in the KV cache across requests: a stage's system turn, role and template, computed once.

The requests of one stage share their first tokens: the chat template's system turn with the stage's role, and the
template's text before the question. The engine remembers the last few prompts it admitted under each adapter (the
stages of an untrained stack all run on the bare base, their prompts interleaved). When a new prompt shares at least
``min_tokens`` leading tokens with one of them (more than the prefix it already reuses), the shared part is copied,
once its keys and values are in the cache, into one of a few reserved cache slots. A later request under the same
adapter whose prompt starts with a kept prefix gets the prefix's keys and values copied into its own slot and
computes only the rest of its prompt.

Keys and values depend on the adapter (its LoRA factors may change ``k`` and ``v``), so prefixes are kept per
adapter, and all are dropped when the adapters change. A prefix always leaves at least one prompt token to compute:
the last one's logits give the first new token. The least recently used prefix gives up its slot to a new one.

Why copy rather than share: a slot holds one contiguous sequence (see :mod:`.cache`), and a copy of 40 tokens of the
default model's keys and values (1.8 MB) costs far less than computing them (40 tokens through 30 layers) on a CPU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["Prefix", "PrefixCache", "common_prefix"]


@dataclass
class Prefix:
    """Tokens whose keys and values (under one adapter) sit at positions ``0..len-1`` of a reserved slot."""

    adapter: int
    tokens: tuple[int, ...]
    slot: int
    used: int  # when last looked up (a counter), for least-recently-used eviction


class PrefixCache:
    """Which prefixes the reserved slots hold, and which new ones to keep. Knows token ids and slots, no tensors."""

    def __init__(self, slots: list[int], min_tokens: int = 16, recent: int = 8) -> None:
        self.free = list(slots)
        self.min_tokens, self.recent = min_tokens, recent
        self.entries: list[Prefix] = []
        self.last: dict[int, deque[list[int]]] = {}  # adapter -> the last prompts admitted under it
        self._clock = 0
        self.reused_tokens = 0  # prompt tokens not computed thanks to a kept prefix

    def lookup(self, adapter: int, prompt: list[int]) -> Prefix | None:
        """The longest kept prefix of ``prompt`` under ``adapter`` that leaves a token to compute."""
        best = None
        for e in self.entries:
            n = len(e.tokens)
            if e.adapter == adapter and n < len(prompt) and (best is None or n > len(best.tokens)):
                if tuple(prompt[:n]) == e.tokens:
                    best = e
        if best is not None:
            self._clock += 1
            best.used = self._clock
            self.reused_tokens += len(best.tokens)
        return best

    def candidate(self, adapter: int, prompt: list[int], reused: int) -> int:
        """How many leading tokens of ``prompt`` to keep once computed (0: none).

        The most it shares with one of the last prompts admitted under ``adapter``, when that is at least
        ``min_tokens`` more than the ``reused`` tokens it already got from a kept prefix.
        """
        recent = self.last.setdefault(adapter, deque(maxlen=self.recent))
        n = max((_shared(last, prompt) for last in recent), default=0)
        recent.append(prompt)
        return n if n - reused >= self.min_tokens else 0

    def keep(self, adapter: int, tokens: list[int]) -> int | None:
        """A slot for a new prefix (the least recently used one's if none is free); None when it is already kept."""
        key = tuple(tokens)
        if any(e.adapter == adapter and e.tokens == key for e in self.entries):
            return None
        if not self.free:
            if not self.entries:
                return None
            oldest = min(self.entries, key=lambda e: e.used)
            self.entries.remove(oldest)
            self.free.append(oldest.slot)
        self._clock += 1
        slot = self.free.pop()
        self.entries.append(Prefix(adapter, key, slot, self._clock))
        return slot

    def clear(self) -> None:
        """Forget every prefix (the adapters changed)."""
        self.free += [e.slot for e in self.entries]
        self.entries, self.last = [], {}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    limit = min(len(a), len(b))
    return next((k for k in range(limit) if a[k] != b[k]), limit)


def _shared(last: list[int], prompt: list[int]) -> int:
    """Leading tokens two prompts share, leaving ``prompt`` at least one to compute."""
    return min(common_prefix(last, prompt), len(prompt) - 1)
