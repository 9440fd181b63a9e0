"""The model runner: a step's rows in, tensors built, the decoder run, logits out (nano-vllm's ``ModelRunner``).

:class:`ModelRunner` owns the decoder, the KV cache's prefix slots and the way decode steps execute, picked once:
eagerly, as CUDA graphs, or through ``torch.compile`` (:mod:`.graphs`). It knows no requests' text or threads: the
engine hands it the scheduler's :class:`slmstack.engine.scheduler.StepPlan` and gets logits back. Scoring
(:mod:`.scoring`) builds its steps with the same :func:`step_input`.

Prefix reuse lives here too: a newly admitted row starts after the longest kept prefix of its prompt (its keys and
values copied in from a reserved slot), and a prefix chosen at admission is copied into a reserved slot once its
keys and values are computed (:mod:`.prefix` decides which, on token ids alone).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slmstack.engine.cache import KVCache
from slmstack.engine.graphs import DecodeGraphs
from slmstack.engine.lora import LoraBank, StepAdapters
from slmstack.engine.model import Decoder, StepInput
from slmstack.engine.options import EngineOptions
from slmstack.engine.prefix import PrefixCache
from slmstack.engine.scheduler import StepPlan
from slmstack.engine.weights import DecoderWeights

logger = logging.getLogger(__name__)

__all__ = ["ModelRunner", "Span", "step_input"]

# decode attention reads the cache's first m slots in place while m <= VIEW_SLOTS x the decode rows, and copies
# the rows' keys and values beyond that (the copy costs about as much as attending over 2.3x the rows)
VIEW_SLOTS = 2


@dataclass
class Span:
    """One row's tokens in a step: at positions ``start..`` of cache slot ``slot``, under adapter id ``adapter``.

    ``sample``: whose logits are wanted: ``last`` (the next token of a row), ``all`` (scoring) or ``none``.
    """

    tokens: list[int]
    start: int
    slot: int
    adapter: int = 0
    sample: str = "last"


def step_input(spans: list[Span], n_decode: int, device: torch.device, lora: StepAdapters | None = None,
               lora_kernel: bool = False) -> StepInput:  # fmt: skip
    """A step's tensors: tokens, positions and slots flat; the ``n_decode`` decode spans first (one token each).

    ``lora``: every token's adapters when given (scoring's one adapter), else built from the spans' adapter ids.
    """
    tokens, positions, slots, adapters, sample, chunks = [], [], [], [], [], []
    for i, span in enumerate(spans):
        offset, n = len(tokens), len(span.tokens)
        tokens += span.tokens
        positions += range(span.start, span.start + n)
        slots += [span.slot] * n
        adapters += [span.adapter] * n
        if span.sample == "last":
            sample.append(offset + n - 1)
        elif span.sample == "all":
            sample += range(offset, offset + n)
        if i >= n_decode:
            chunks.append((offset, n, span.slot, span.start))

    def longs(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    decode_slots = [s.slot for s in spans[:n_decode]]
    m = max(decode_slots, default=-1) + 1
    dense = decode_slots == list(range(n_decode))
    lens = [s.start + 1 for s in spans[:n_decode]]
    length, view = max(lens, default=0), None
    if not dense and m <= VIEW_SLOTS * n_decode:
        # attention over the first m slots where they lie: a few idle slots cost less than copying every
        # row's keys and values (benchmarks/engine.py --attention-only); an idle slot attends to its first key
        row_of, slot_lens = [0] * m, [1] * m
        for i, (slot, length_i) in enumerate(zip(decode_slots, lens, strict=True)):
            row_of[slot], slot_lens[slot] = i, length_i
        view, lens = longs(row_of), slot_lens
    if lora is None:
        lora = StepAdapters.for_tokens(adapters, n_decode, device, lora_kernel)
    return StepInput(
        tokens=longs(tokens), positions=longs(positions), slots=longs(slots), n_decode=n_decode,
        decode_slots=None if dense else longs(decode_slots), decode_lens=longs(lens),
        decode_length=length, chunks=chunks, lora=lora, decode_view=view,
        sample=None if len(sample) == len(tokens) else longs(sample),
    )  # fmt: skip


@functools.cache
def _can_compile() -> bool:
    """Whether ``torch.compile`` works here (it needs a C++ compiler on a CPU): a tiny function compiled once."""
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(4)).sum() == 12)
    except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported platform, ...
        logger.warning("torch.compile does not work here (%s); decode steps run eagerly", _first_line(exc))
        return False


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for a one-line warning."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep large freed blocks in the process's heap for reuse (glibc only; once per process; True if it took).

    glibc hands blocks over its mmap threshold straight back to the system when freed, so the next step's equal
    block comes back as fresh pages that the kernel zero-fills on first touch. Raising the threshold (and the trim
    threshold, or the freed top of the heap is returned anyway) makes them reused, as PyTorch's CPU performance
    guide gets from jemalloc or tcmalloc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))


class ModelRunner:
    """The decoder, its cache and prefix slots, and the decode path chosen once from ``options.graphs``.

    Cache slots: ``0..max_batch-1`` the rows', ``max_batch`` a scratch slot (the padding rows of a CUDA-graph step
    write there), then ``options.prefix_slots`` for kept prefixes.
    """

    def __init__(self, weights: DecoderWeights, lora: LoraBank, options: EngineOptions, max_length: int) -> None:
        param = weights.embed
        self.device, self.options, self.max_batch = param.device, options, options.max_batch
        if options.reuse_memory and self.device.type == "cpu":
            reuse_freed_memory()
        s = weights.shape
        rows, prefixes = options.max_batch, options.prefix_slots
        self.cache = KVCache(s.layers, s.kv_heads, s.head_dim, rows + 1 + prefixes, max_length, param.dtype,
                             self.device)  # fmt: skip
        self.prefixes = PrefixCache(list(range(rows + 1, rows + 1 + prefixes))) if prefixes else None
        self._keep: dict[Any, int] = {}  # request -> leading prompt tokens to keep as a prefix once computed
        self.decoder = Decoder(weights, self.cache, lora, options)
        graphs = options.graphs
        capture = graphs == "capture" or (graphs in ("auto", "compile") and self.device.type == "cuda")
        if graphs == "compile" and not capture and not _can_compile():
            graphs = "off"
        self.graphs = (DecodeGraphs(self.decoder, rows, scratch_slot=rows, capture=capture,
                                    compile=graphs == "compile")
                       if capture or graphs in ("static", "compile") else None)  # fmt: skip

    def forward(self, plan: StepPlan) -> tuple[Tensor, Tensor | None]:
        """Run the step: the logits of its sampled rows, and their argmax where the static path took it."""
        ran = self._graph_step(plan)
        if ran is not None:
            return ran
        return self.decoder.forward(self.step_input(plan)), None

    def step_input(self, plan: StepPlan) -> StepInput:
        """The eager step's tensors (decode rows first; LoRA grouped by adapter)."""
        spans = [Span(r.tokens, r.start, r.request.slot, r.request.adapter, "last" if r.sample else "none")
                 for r in plan.rows]  # fmt: skip
        return step_input(spans, len(plan.decode), self.device, lora_kernel=self.options.kernel(self.device, "lora"))

    def _graph_step(self, plan: StepPlan) -> tuple[Tensor, Tensor] | None:
        """The step on the static decode path (a CUDA graph, or compiled), or None where it runs eagerly."""
        if self.graphs is None or not self.graphs.usable(len(plan.decode), len(plan.rows)):
            return None
        args = ([r.tokens[0] for r in plan.decode], [r.start for r in plan.decode],
                [r.request.slot for r in plan.decode], [r.request.adapter for r in plan.decode])  # fmt: skip
        try:
            return self.graphs.run(*args)
        except Exception as exc:  # noqa: BLE001 - compiling fails before the step runs (no C++ compiler, ...)
            if not self.graphs.compiled:
                raise
            logger.warning("torch.compile could not compile the decode step (%s); decoding eagerly", _first_line(exc))
            self.graphs = None
            return None

    # ---- prefixes
    def reuse_prefixes(self, plan: StepPlan) -> None:
        """Newly admitted rows start after the longest kept prefix of their prompt (its keys and values copied in)."""
        if self.prefixes is None:
            return
        for row in plan.prefill:
            request = row.request
            if row.start or request.computed:
                continue  # a later chunk of a prompt
            kept = self.prefixes.lookup(request.adapter, request.prompt)
            reused = 0
            if kept is not None:
                reused = len(kept.tokens)
                self.cache.copy(kept.slot, [request.slot], reused)
                row.start, row.tokens = reused, request.prompt[reused : reused + len(row.tokens)]
                row.sample = reused + len(row.tokens) == len(request.prompt)
                request.computed = reused
            keep = self.prefixes.candidate(request.adapter, request.prompt, reused)
            if keep:
                self._keep[request] = keep

    def keep_prefixes(self) -> None:
        """Copy the prefixes chosen at admission into reserved slots once their keys and values are computed."""
        for request, n in list(self._keep.items()):
            if request.slot is None:  # ended first
                del self._keep[request]
            elif request.computed >= n:
                del self._keep[request]
                slot = self.prefixes.keep(request.adapter, request.prompt[:n])
                if slot is not None:
                    self.cache.copy(request.slot, [slot], n)

    def forget(self, request: Any) -> None:
        """A request ended: no prefix of it is kept any more."""
        self._keep.pop(request, None)

    def clear_prefixes(self) -> None:
        """Drop every kept prefix (their keys and values were computed under adapters that changed)."""
        if self.prefixes is not None:
            self.prefixes.clear()
