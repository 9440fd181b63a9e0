"""Continuous batching for the server: every request is a stack chain on the engine from the moment it arrives.

One :class:`ContinuousBatcher` serves every stack on one engine (stacks on one base model share it). Its engine
steps in a thread of its own whenever any request is in flight. A request joins at the next step, moves to its
next stage as soon as a stage ends (:mod:`slmstack.stack.chains`), and leaves when its last stage ends, so no
request waits for another's longest row, and a client that goes away frees its row at the next step. Finished
stages and, when streaming, the final stage's text reach the request as they happen. The interface is the
micro-batcher's (:class:`slmstack.serving.batcher.MicroBatcher`), which still serves stacks that generate
with transformers or on a remote backend.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from slmstack.serving.batcher import Pending
from slmstack.stack.chains import Chain, start_chain
from slmstack.stack.config import INPUT_FIELD
from slmstack.stack.runtime import Stack, StackResult

logger = logging.getLogger(__name__)

__all__ = ["ContinuousBatcher"]


class ContinuousBatcher:
    """Runs every request for the stacks on one engine as a chain, stepping the engine in its own thread."""

    def __init__(self, engine: Any, on_batch: Callable[[int, list[float]], None] | None = None,
                 stop: threading.Event | None = None) -> None:  # fmt: skip
        self.engine, self.on_batch = engine, on_batch
        self.stop_event = stop or threading.Event()
        self.thread: threading.Thread | None = None
        engine.on_step = self._on_step

    @property
    def batches(self) -> int:
        """Engine steps so far."""
        return self.engine.steps

    def start(self) -> None:
        """Start stepping (a daemon thread that sleeps while no request is in flight)."""
        self.thread = threading.Thread(target=self.engine.serve_forever, args=(self.stop_event,), daemon=True,
                                       name="slmstack-engine")  # fmt: skip
        self.thread.start()

    async def stop(self) -> None:
        """Stop stepping; requests in flight end as cancelled."""
        self.stop_event.set()
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 5)

    def _on_step(self, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(rows, [])

    async def submit(self, stack: Stack, text: str, max_tokens: int | None, stream: bool = False,
                     overrides: dict[str, Any] | None = None) -> Pending:  # fmt: skip
        """Start one request's chain; await ``pending.future`` for its :class:`StackResult`."""
        loop = asyncio.get_running_loop()
        pending = Pending(stack, text, max_tokens, loop.create_future(), stream, dict(overrides or {}))
        stages = stack.config.stages

        def stage_overrides(index: int) -> dict[str, Any]:
            last = index == len(stages) - 1
            extra = dict(pending.overrides) if last or stack.config.request_sampling == "all" else {}
            if last and max_tokens is not None:
                extra["max_new_tokens"] = max_tokens
            return extra

        def report(event: Any) -> None:
            loop.call_soon_threadsafe(pending.events.put_nowait, event)

        def on_stage(trace: Any) -> None:
            if not pending.result_seen and self.on_batch is not None and chain.handle is not None:
                admitted = chain.handle.request.admitted or time.perf_counter()
                self.on_batch(0, [max(0.0, admitted - pending.queued_at)])  # the queue wait, once per request
            pending.result_seen = True
            report(trace)

        def on_end(chain: Chain) -> None:
            def settle() -> None:
                if not pending.future.done():
                    if chain.error is not None:
                        pending.future.set_exception(chain.error)
                    else:
                        pending.future.set_result(chain.result)
                pending.events.put_nowait(None)

            loop.call_soon_threadsafe(settle)

        chain = Chain(stack, list(stages), {INPUT_FIELD: text}, StackResult(input=text, answer=""),
                      overrides=stage_overrides, on_stage=on_stage, on_text=report if stream else None,
                      on_end=on_end)  # fmt: skip
        pending.future.add_done_callback(lambda f: chain.cancel() if f.cancelled() else None)
        await loop.run_in_executor(None, start_chain, chain)  # tokenizing the first prompt off the event loop
        return pending
