"""Micro-batching: concurrent requests share each stage's batched forward passes.

One batcher serves every stack on one backend (for in-process stacks: one loaded base model), so rows of
different stacks on the same base share a forward pass, each under its own adapter. Requests wait at most
``max_wait_ms`` for company, up to ``max_batch_size`` per batch. Generation runs in one worker thread,
off the event loop, so ``/health`` answers while a batch decodes. Each finished stage, and for streaming
requests each piece of the final stage's text, reaches the request as soon as it exists. A request
whose client went away is dropped: before its batch starts, or at the next stage boundary (its slot in
the remaining stages is freed).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from slmstack.stack.runtime import Stack, StackResult, StageCall, run_stage_calls

logger = logging.getLogger(__name__)

__all__ = ["MicroBatcher", "Pending"]


@dataclass
class Pending:
    """One request waiting for (or being served by) a batch."""

    stack: Stack
    text: str
    max_tokens: int | None
    future: asyncio.Future
    stream: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # the request's sampling fields
    # a StageTrace per finished stage and, when streaming, str pieces of the final stage's text; then None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.perf_counter)
    result_seen: bool = False  # a stage has finished (the queue wait is recorded once)


class MicroBatcher:
    """Collects requests for the stacks on one backend and runs them through their stages in batches."""

    def __init__(self, max_batch_size: int, max_wait_ms: float, executor: ThreadPoolExecutor,
                 on_batch: Callable[[int, list[float]], None] | None = None,
                 cancel: threading.Event | None = None) -> None:  # fmt: skip
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.executor, self.on_batch = executor, on_batch
        self.cancel = cancel or threading.Event()  # set: generation in flight stops at its next token
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0

    def start(self) -> None:
        """Start collecting (inside the running event loop)."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop collecting."""
        if self.task:
            self.task.cancel()

    async def submit(self, stack: Stack, text: str, max_tokens: int | None, stream: bool = False,
                     overrides: dict[str, Any] | None = None) -> Pending:  # fmt: skip
        """Queue one request; await ``pending.future`` for its :class:`StackResult`."""
        pending = Pending(stack, text, max_tokens, asyncio.get_running_loop().create_future(), stream,
                          dict(overrides or {}))  # fmt: skip
        await self.queue.put(pending)
        return pending

    async def _loop(self) -> None:
        while True:
            batch, deadline = [await self.queue.get()], time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch_size:
                timeout = deadline - time.perf_counter()
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout) if timeout > 0 else None
                    batch.append(item or self.queue.get_nowait())
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            batch = [p for p in batch if not p.future.cancelled()]  # clients that left free their slot
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if self.on_batch:
            self.on_batch(len(batch), [now - p.queued_at for p in batch])
        self.batches += 1

        def report(row: int, event: Any) -> None:
            loop.call_soon_threadsafe(batch[row].events.put_nowait, event)

        try:
            results = await loop.run_in_executor(self.executor, self._generate, batch, report)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
            logger.exception("batch of %d failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
                p.events.put_nowait(None)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
            p.events.put_nowait(None)

    def _generate(self, batch: list[Pending], report: Callable[[int, Any], None]) -> list[StackResult]:
        """Run the batch stage by stage (in the worker thread), reporting each finished stage and streamed text.

        Stage ``i`` of every row runs together; rows of stacks with fewer stages have finished, and rows
        whose client left are skipped.
        """
        from slmstack.stack.config import INPUT_FIELD

        values = [{INPUT_FIELD: p.text} for p in batch]
        results = [StackResult(input=p.text, answer="") for p in batch]
        for depth in range(max(len(p.stack.config.stages) for p in batch)):
            rows = [r for r, p in enumerate(batch) if depth < len(p.stack.config.stages) and not p.future.cancelled()]
            calls, streamed = [], {}
            for r in rows:
                p = batch[r]
                stages = p.stack.config.stages
                last = depth == len(stages) - 1
                overrides = dict(p.overrides) if last or p.stack.config.request_sampling == "all" else {}
                if last and p.max_tokens is not None:
                    overrides["max_new_tokens"] = p.max_tokens
                calls.append(StageCall(p.stack, stages[depth], values[r], results[r], overrides))
                if last and p.stream:
                    streamed[len(calls) - 1] = r
            if not calls:
                break
            run_stage_calls(calls, _forward(streamed, report) if streamed else None, cancel=self.cancel)
            for r in rows:
                report(r, results[r].trace[-1])
        return results


def _forward(streamed: dict[int, int], report: Callable[[int, Any], None]) -> Callable[[int, str], None]:
    """Passes a streamed call's text on to its request (calls that do not stream are ignored)."""

    def on_text(call: int, delta: str) -> None:
        if call in streamed:
            report(streamed[call], delta)

    return on_text
