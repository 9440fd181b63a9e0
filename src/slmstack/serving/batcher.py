"""Micro-batching: concurrent requests for one stack share each stage's batched forward passes.

Requests wait at most ``max_wait_ms`` for company, up to ``max_batch_size`` per batch; requests with the
same ``max_tokens`` share a batch (it sets the last stage's budget). Generation runs in one worker
thread, off the event loop, so ``/health`` answers while a batch decodes. A request whose client went
away before its batch started is dropped from the batch (its slot is free for others). Each stage's
result reaches the request as soon as the stage finishes, which is how streaming reports the stages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from slmstack.stack.runtime import Stack, StackResult, StageTrace

logger = logging.getLogger(__name__)

__all__ = ["MicroBatcher", "Pending"]


@dataclass
class Pending:
    """One request waiting for (or being served by) a batch."""

    text: str
    max_tokens: int | None
    future: asyncio.Future
    stages: asyncio.Queue = field(default_factory=asyncio.Queue)  # StageTrace per finished stage, then None
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collects requests for one stack and runs them through it in batches."""

    def __init__(self, stack: Stack, max_batch_size: int, max_wait_ms: float, executor: ThreadPoolExecutor,
                 on_batch: Callable[[int, list[float]], None] | None = None) -> None:  # fmt: skip
        self.stack, self.max_batch_size, self.max_wait = stack, max_batch_size, max_wait_ms / 1000
        self.executor, self.on_batch = executor, on_batch
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

    async def submit(self, text: str, max_tokens: int | None) -> Pending:
        """Queue one request; await ``pending.future`` for its :class:`StackResult`."""
        pending = Pending(text, max_tokens, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return pending

    async def _loop(self) -> None:
        held: list[Pending] = []
        while True:
            first = held.pop(0) if held else await self.queue.get()
            batch, deadline = [first], time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch_size:
                timeout = deadline - time.perf_counter()
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout) if timeout > 0 else None
                    item = item or self.queue.get_nowait()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                (batch if item.max_tokens == first.max_tokens else held).append(item)
            batch = [p for p in batch if not p.future.cancelled()]  # clients that left free their slot
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if self.on_batch:
            self.on_batch(len(batch), [now - p.queued_at for p in batch])
        self.batches += 1

        def stage_done(stage: StageTrace, row: int) -> None:
            loop.call_soon_threadsafe(batch[row].stages.put_nowait, stage)

        try:
            results = await loop.run_in_executor(self.executor, self._generate, batch, stage_done)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
            logger.exception("batch of %d failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
                p.stages.put_nowait(None)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
            p.stages.put_nowait(None)

    def _generate(self, batch: list[Pending], stage_done: Callable[[StageTrace, int], None]) -> list[StackResult]:
        """Run the stack stage by stage on the batch (in the worker thread), reporting each finished stage."""
        from slmstack.stack.config import INPUT_FIELD

        stages = list(self.stack.config.stages)
        if batch[0].max_tokens is not None:
            last = stages[-1]
            stages[-1] = replace(last, generation=replace(last.generation, max_new_tokens=batch[0].max_tokens))
        values = [{INPUT_FIELD: p.text} for p in batch]
        results = [StackResult(input=p.text, answer="") for p in batch]
        for stage in stages:
            self.stack.run_stage(stage, values, results)
            for row, result in enumerate(results):
                stage_done(result.trace[-1], row)
        return results
