"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket (nano-vllm's ``capture_cudagraph``).

On a GPU a decode step of a 135M model is a few hundred small kernels; launched one by one from Python the step
is bound by launches, not by the kernels. A CUDA graph records the step's kernels once and replays them with one
launch. Everything a graph reads lives in static buffers that each step overwrites in place: the tokens,
positions and slots of the step's rows, each row's length and adapter, the logits. A step of ``n`` rows runs the
graph of the smallest bucket ``B >= n``; the ``B - n`` padding rows write their keys and values into a scratch
slot (the cache holds one slot more than the engine's rows) and their logits are dropped. Attention reads the
whole allocated cache length, masked per row, so that a graph fits every step until the cache grows; LoRA is
always the mixed form (:func:`slmstack.engine.lora.lora_add`: one Triton kernel per projection where Triton
runs, else the stacked, masked products), whose shapes do not depend on which adapters the rows use. A graph
is captured the first time its bucket is used and captured again when the cache grows or adapters change.

Only pure decode steps (no prompt chunk) use a graph; the others run eagerly. Rows are read from their slots
through the slots buffer (a gather, cheap on a GPU), so a graph fits any slot layout. The host side of a step is
one copy: the step's five index rows, padded, go into one pinned host buffer and from there into the graph's
buffers. The graph also takes each row's argmax, so a step of greedy rows brings back ``n`` token ids, not
``n`` rows of logits.
With ``capture=False`` the same static path runs eagerly, which is how the CPU tests check it. With ``compile``
(a CPU's counterpart of the graphs) it runs through ``torch.compile``: one compiled program per bucket and cache
length, whose fused C++ loops replace most of a step's per-operation work (the first step of each takes seconds).
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
    """The static decode path of a :class:`Decoder`, captured per bucket as CUDA graphs when ``capture``.

    ``compile``: the path's forward compiled by ``torch.compile`` (not with ``capture``).
    """

    def __init__(self, decoder: Decoder, max_rows: int, scratch_slot: int, capture: bool = True,
                 compile: bool = False) -> None:  # fmt: skip
        self.decoder, self.capture, self.scratch = decoder, capture, scratch_slot
        self.compiled = compile and not capture
        self._step = torch.compile(self._no_grad_forward, dynamic=False) if self.compiled else decoder.forward
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.graphs: dict[int, tuple[Any, Tensor, Tensor, Tensor, Tensor]] = {}
        self._key: tuple = ()
        self._pool: Any = None
        self.replays = 0  # steps run on a graph

    def _no_grad_forward(self, step: StepInput) -> Tensor:
        # compiled under no_grad, not inference_mode: inductor fails to lift the dense weights (aliases of the
        # model's parameters) inside inference_mode ("Cannot set version_counter for inference tensor")
        with torch.no_grad():
            return self.decoder.run(step)

    def usable(self, n_decode: int, n_rows: int) -> bool:
        """Whether a step of ``n_rows`` rows, ``n_decode`` of them decoding, can run on a graph.

        It can when every row decodes (no prompt chunk) and a bucket fits them.
        """
        return n_decode == n_rows and 0 < n_decode <= self.buckets[-1]

    def run(
        self, tokens: list[int], positions: list[int], slots: list[int], adapters: list[int]
    ) -> tuple[Tensor, Tensor]:
        """One decode step of ``n`` rows (each row's new token, its position, its slot and its adapter id).

        Returns:
            The rows' logits (n, V) and each row's argmax (n,), from the bucket's graph (captured first if
            needed). Both are views of the graph's output, valid until the next step.
        """
        self._invalidate_if_changed()
        n = len(tokens)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._build(bucket)
        graph, host, buffers, logits, best = self.graphs[bucket]
        pad = bucket - n
        host.copy_(torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [self.scratch] * pad,
                                 [p + 1 for p in positions] + [1] * pad, adapters + [0] * pad]))  # fmt: skip
        buffers.copy_(host, non_blocking=True)
        self.replays += 1
        if graph is None:
            logits, best = self._forward(buffers)
        else:
            graph.replay()
        return logits[:n], best[:n]

    # ---- building
    def _invalidate_if_changed(self) -> None:
        cache, lora = self.decoder.cache, self.decoder.lora
        key = (cache.length, id(cache.kv[0]) if cache.kv else None, tuple(sorted(lora.factors)), id(lora._stacked))
        if key != self._key:
            # Dropping every graph frees their private memory pool: the next capture needs a fresh pool (capturing
            # into the freed one fails inside PyTorch's caching allocator, as seen on an H100).
            self.graphs.clear()
            self._pool = None
            self._key = key

    def _buffers(self, bucket: int) -> tuple[Tensor, Tensor]:
        """The host staging buffer and the device buffer: rows tokens, positions, slots, lengths, adapters."""
        device = self.decoder.w.embed.device
        buffers = torch.zeros(5, bucket, dtype=torch.long, device=device)
        buffers[2].fill_(self.scratch)
        buffers[3].fill_(1)
        host = torch.zeros(5, bucket, dtype=torch.long, pin_memory=device.type == "cuda")
        return host, buffers

    def _forward(self, buffers: Tensor) -> tuple[Tensor, Tensor]:
        tokens, positions, slots, lens, adapters = buffers
        lora = StepAdapters(rows=adapters, kernel=self.decoder.options.kernel(adapters.device, "lora"))
        step = StepInput(
            tokens=tokens, positions=positions, slots=slots, n_decode=len(tokens), decode_slots=slots,
            decode_lens=lens, decode_length=self.decoder.cache.length, lora=lora, static=True,
        )  # fmt: skip
        logits = self._step(step)
        return logits, logits.argmax(dim=-1)

    def _build(self, bucket: int) -> tuple[Any, Tensor, Tensor, Tensor, Tensor]:
        host, buffers = self._buffers(bucket)
        if not self.capture:
            return None, host, buffers, torch.empty(0), torch.empty(0)
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (the padding slot takes every write)
            for _ in range(2):
                self._forward(buffers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, best = self._forward(buffers)
        self._pool = graph.pool()
        logger.info("captured the decode graph for %d rows in %.2fs", bucket, time.perf_counter() - start)
        return graph, host, buffers, logits, best
