"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket (nano-vllm's ``capture_cudagraph``).

On a GPU a decode step of a 135M model is a few hundred small kernels; launched one by one from Python the step
is bound by launches, not by the kernels. A CUDA graph records the step's kernels once and replays them with one
launch. Everything a graph reads lives in static buffers that each step overwrites in place: the tokens,
positions and slots of the step's rows, each row's length and adapter, the logits. A step of ``n`` rows runs the
graph of the smallest bucket ``B >= n``; the ``B - n`` padding rows write their keys and values into a scratch
slot (the cache holds one slot more than the engine's rows) and their logits are dropped. Attention reads the
whole allocated cache length, masked per row, so that a graph fits every step until the cache grows; LoRA is
always the stacked, masked form (:func:`slmstack.engine.lora.lora_add`), whose shapes do not depend on which
adapters the rows use. A graph is captured the first time its bucket is used and captured again when the cache
grows or adapters change.

Only pure decode steps (no prompt chunk) use a graph; the others run eagerly. Rows are read from their slots
through the slots buffer (a gather, cheap on a GPU), so a graph fits any slot layout.
With ``capture=False`` the same static path runs eagerly, which is how the CPU tests check it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

from slmstack.engine.lora import StepAdapters
from slmstack.engine.model import Decoder, StepInput

logger = logging.getLogger(__name__)

__all__ = ["BUCKETS", "DecodeGraphs"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    """The static decode path of a :class:`Decoder`, captured per bucket as CUDA graphs when ``capture``."""

    def __init__(self, decoder: Decoder, max_rows: int, scratch_slot: int, capture: bool = True) -> None:
        self.decoder, self.capture, self.scratch = decoder, capture, scratch_slot
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.graphs: dict[int, tuple[Any, dict[str, Tensor], Tensor]] = {}
        self._key: tuple = ()
        self._pool: Any = None
        self.capture_seconds = 0.0

    def usable(self, step: StepInput) -> bool:
        """Whether ``step`` can run on a graph: decode rows only, and a bucket fits them."""
        return not step.chunks and 0 < step.n_decode <= self.buckets[-1]

    def run(self, step: StepInput) -> Tensor:
        """The step's logits (n, V), from the bucket's graph (captured first if needed)."""
        self._invalidate_if_changed()
        n = step.n_decode
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._build(bucket)
        graph, buffers, logits = self.graphs[bucket]
        buffers["tokens"][:n].copy_(step.tokens)
        buffers["positions"][:n].copy_(step.positions)
        buffers["slots"][:n].copy_(step.slots)
        buffers["lens"][:n].copy_(step.decode_lens)
        rows = step.lora.rows if step.lora.rows is not None else torch.full((n,), step.lora.single or 0)
        buffers["adapters"][:n].copy_(rows)
        for name, pad in (("tokens", 0), ("positions", 0), ("slots", self.scratch), ("lens", 1), ("adapters", 0)):
            buffers[name][n:].fill_(pad)
        if graph is None:
            logits = self._forward(buffers)
        else:
            graph.replay()
        return logits[:n].clone()

    # ---- building
    def _invalidate_if_changed(self) -> None:
        cache, lora = self.decoder.cache, self.decoder.lora
        key = (cache.length, id(cache.k[0]) if cache.k else None, tuple(sorted(lora.factors)), id(lora._stacked))
        if key != self._key:
            # Dropping every graph frees their private memory pool: the next capture needs a fresh pool (capturing
            # into the freed one fails inside PyTorch's caching allocator, as seen on an H100).
            self.graphs.clear()
            self._pool = None
            self._key = key

    def _buffers(self, bucket: int) -> dict[str, Tensor]:
        device = self.decoder.w.embed.device
        long = {"dtype": torch.long, "device": device}
        return {"tokens": torch.zeros(bucket, **long), "positions": torch.zeros(bucket, **long),
                "slots": torch.full((bucket,), self.scratch, **long), "lens": torch.ones(bucket, **long),
                "adapters": torch.zeros(bucket, **long)}  # fmt: skip

    def _forward(self, buffers: dict[str, Tensor]) -> Tensor:
        step = StepInput(
            tokens=buffers["tokens"], positions=buffers["positions"], slots=buffers["slots"],
            n_decode=len(buffers["tokens"]), decode_slots=buffers["slots"], decode_lens=buffers["lens"],
            decode_length=self.decoder.cache.length, lora=StepAdapters(rows=buffers["adapters"]), static=True,
        )  # fmt: skip
        return self.decoder.forward(step)

    def _build(self, bucket: int) -> tuple[Any, dict[str, Tensor], Tensor]:
        buffers = self._buffers(bucket)
        if not self.capture:
            return None, buffers, torch.empty(0)
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (the padding slot takes every write)
            for _ in range(2):
                self._forward(buffers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(buffers)
        self._pool = graph.pool()
        self.capture_seconds += time.perf_counter() - start
        logger.info("captured the decode graph for %d rows in %.2fs", bucket, time.perf_counter() - start)
        return graph, buffers, logits
