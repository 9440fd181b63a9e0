"""The server's one batcher: every request is a stack chain on its backend from the moment it arrives.

One :class:`Batcher` serves every stack on one backend (stacks on one base model share it). The backend steps in a
thread of its own whenever any request is in flight: on the engine each step is continuous batching, on
transformers or a remote server a micro-batch that waits up to ``max_wait_ms`` for company. A request joins at
the next step, moves to its next stage as soon as a stage ends (:mod:`slmstack.stack.chains`), and leaves when its
last stage ends; a client that goes away frees its row at the next step. Finished stages and, when streaming, the
final stage's text reach the request as they happen. The per-request override rule lives here, once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slmstack.stack.chains import Chain, start_chain
from slmstack.stack.trace import StackResult

logger = logging.getLogger(__name__)

__all__ = ["Batcher", "Pending", "stage_overrides"]


@dataclass
class Pending:
    """One request in flight: await ``future`` for its :class:`StackResult`."""

    stack: Any
    text: str
    future: asyncio.Future
    # a StageTrace per finished stage and, when streaming, str pieces of the final stage's text; then None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.perf_counter)
    result_seen: bool = False  # a stage has finished (the queue wait is recorded once)


def stage_overrides(stack: Any, index: int, overrides: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The decoding fields a request changes at stage ``index``.

    Its sampling fields reach the final stage, or every stage with ``request_sampling: all``; ``max_tokens`` reaches
    the final stage only.
    """
    last = index == len(stack.config.stages) - 1
    extra = dict(overrides) if last or stack.config.request_sampling == "all" else {}
    if last and max_tokens is not None:
        extra["max_new_tokens"] = max_tokens
    return extra


class Batcher:
    """Runs every request for the stacks on one backend as a chain, stepping the backend in its own thread.

    Args:
        backend: the stacks' :class:`slmstack.stack.backends.Backend`.
        on_batch: ``on_batch(rows, waits)``: each step's rows, and each request's queue wait (once, at its first
            stage), for the server's metrics.
        stop: set when the server stops; requests in flight end as cancelled.
        max_wait_ms: how long a micro-batch waits for company (the engine does not wait).
    """

    def __init__(self, backend: Any, on_batch: Callable[[int, list[float]], None] | None = None,
                 stop: threading.Event | None = None, max_wait_ms: float = 0.0) -> None:  # fmt: skip
        self.backend, self.on_batch = backend, on_batch
        self.stop_event = stop or threading.Event()
        self.max_wait = max_wait_ms / 1000
        self.thread: threading.Thread | None = None
        backend.runner.on_step = self._on_step

    @property
    def batches(self) -> int:
        """Steps so far."""
        return self.backend.runner.steps

    def start(self) -> None:
        """Start stepping (a daemon thread that sleeps while no request is in flight)."""
        self.thread = threading.Thread(target=self.backend.serve_forever, args=(self.stop_event, self.max_wait),
                                       daemon=True, name="slmstack-generate")  # fmt: skip
        self.thread.start()

    async def stop(self) -> None:
        """Stop stepping; requests in flight end as cancelled."""
        self.stop_event.set()
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 5)

    def _on_step(self, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(rows, [])

    async def submit(self, stack: Any, text: str, max_tokens: int | None, stream: bool = False,
                     overrides: dict[str, Any] | None = None) -> Pending:  # fmt: skip
        """Start one request's chain; await ``pending.future`` for its :class:`StackResult`."""
        loop = asyncio.get_running_loop()
        pending = Pending(stack, text, loop.create_future())
        overrides = dict(overrides or {})

        def report(event: Any) -> None:
            loop.call_soon_threadsafe(pending.events.put_nowait, event)

        def on_stage(trace: Any) -> None:
            if not pending.result_seen and self.on_batch is not None and chain.handle is not None:
                admitted = chain.handle.admitted or time.perf_counter()
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

        chain = Chain(stack, list(stack.config.stages), stack.input_values(text), StackResult(input=text, answer=""),
                      overrides=lambda index: stage_overrides(stack, index, overrides, max_tokens),
                      on_stage=on_stage, on_text=report if stream else None, on_end=on_end)  # fmt: skip
        pending.future.add_done_callback(lambda f: chain.cancel() if f.cancelled() else None)
        await loop.run_in_executor(None, start_chain, chain)  # tokenizing the first prompt off the event loop
        return pending
