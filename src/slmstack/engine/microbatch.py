"""Micro-batching behind the engine's request interface, for generators that take whole batches.

transformers' ``generate`` and a remote OpenAI-compatible server take a batch of rows and return when the batch is
done. :class:`MicroBatchRunner` gives them the interface :class:`slmstack.engine.Engine` offers (``submit`` a row,
get a handle, ``run`` or ``serve_forever`` to step), so a stack's chains (:mod:`slmstack.stack.chains`) and the
server's batcher run the same way on every backend. A step takes the oldest waiting row and every waiting row
with an equal key (the same decoding settings), up to ``max_batch``, runs them as one batch and ends each request;
a request's ``on_done`` runs then, so a chain's next stage is waiting for the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from slmstack.engine.request import Handle
from slmstack.engine.text import Generated, GenerationCancelled

logger = logging.getLogger(__name__)

__all__ = ["BatchFn", "BatchRequest", "MicroBatchRunner"]

# generate(key, items, on_text(row, delta) or None, cancel) -> one Generated per item; cancel.is_set() asks to stop
BatchFn = Callable[[Any, list[Any], Callable[[int, str], None] | None, Any], list[Generated]]


class BatchRequest(Handle):
    """A caller's handle on one row: the same surface as :class:`slmstack.engine.EngineRequest`."""

    def __init__(self, runner: MicroBatchRunner, item: Any, key: Any, on_text: Callable[[str], None] | None,
                 on_done: Callable[[BatchRequest], None] | None) -> None:  # fmt: skip
        self.runner, self.item, self.key = runner, item, key
        self.on_text, self.on_done = on_text, on_done
        self.cancelled = False
        self.error: BaseException | None = None
        self.result: Generated | None = None
        self.finish_reason: str | None = None
        self.admitted: float | None = None  # when its batch started
        self.done = threading.Event()

    def cancel(self) -> None:
        """Drop the row before its batch starts; a batch in flight stops once all its rows are cancelled."""
        self.cancelled = True
        self.runner._cancelled(self)


class _Either:
    """Set when either event is (``generate`` only asks ``is_set()``)."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class MicroBatchRunner:
    """Requests in, batches of equal-key rows through ``generate``, results out.

    Args:
        generate: runs one batch (see :data:`BatchFn`).
        max_batch: rows per batch.
        max_wait: seconds :meth:`serve_forever` waits for company once a row is waiting (0: none).
    """

    def __init__(self, generate: BatchFn, max_batch: int = 16, max_wait: float = 0.0) -> None:
        self.generate, self.max_batch, self.max_wait = generate, max_batch, max_wait
        self.waiting: list[BatchRequest] = []
        self.running: list[BatchRequest] = []
        self._cancel = threading.Event()  # the batch in flight stops at its next token
        self._stop: threading.Event | None = None  # serve_forever's: set, the batch in flight stops too
        self._lock = threading.Condition()
        self._stepping = threading.Lock()
        self.steps = 0
        self.on_step: Callable[[int], None] | None = None  # rows of each batch (the server's batch-size metric)

    def submit(self, item: Any, key: Any, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[BatchRequest], None] | None = None) -> BatchRequest:  # fmt: skip
        """Queue one row; rows with equal ``key`` may share a batch."""
        handle = BatchRequest(self, item, key, on_text, on_done)
        with self._lock:
            self.waiting.append(handle)
            self._lock.notify_all()
        return handle

    def has_work(self) -> bool:
        """Whether any row is waiting or running."""
        return bool(self.waiting or self.running)

    def cancel_all(self) -> None:
        """Cancel every row (the server's shutdown)."""
        with self._lock:
            for handle in self.waiting + self.running:
                handle.cancelled = True
            if self.running:
                self._cancel.set()
            self._lock.notify_all()

    def _cancelled(self, handle: BatchRequest) -> None:
        with self._lock:
            if self.running and all(h.cancelled for h in self.running):
                self._cancel.set()
            self._lock.notify_all()

    def step(self) -> bool:
        """Run one batch; False when no row was waiting."""
        with self._stepping:
            with self._lock:
                for handle in [h for h in self.waiting if h.cancelled]:
                    self.waiting.remove(handle)
                    self._end(handle, "cancelled")
                if not self.waiting:
                    return False
                key = self.waiting[0].key
                batch = [h for h in self.waiting if h.key == key][: self.max_batch]
                for handle in batch:
                    self.waiting.remove(handle)
                self.running, now = batch, time.perf_counter()
                self._cancel.clear()
            for handle in batch:
                handle.admitted = now
            self.steps += 1
            if self.on_step is not None:
                self.on_step(len(batch))
            streams = {i: h.on_text for i, h in enumerate(batch) if h.on_text is not None}
            on_text = (lambda row, delta: streams[row](delta) if row in streams else None) if streams else None
            try:
                results = self.generate(key, [h.item for h in batch], on_text, _Either(self._cancel, self._stop))
            except GenerationCancelled:
                results = None
            except Exception as exc:  # noqa: BLE001 - every row of the batch gets the failure
                for handle in batch:
                    handle.error = exc
                results = None
            with self._lock:
                self.running = []
            for i, handle in enumerate(batch):
                if results is not None:
                    handle.result = results[i]
                self._end(handle, "stop" if results is not None else "error" if handle.error else "cancelled")
            return True

    def _end(self, handle: BatchRequest, reason: str) -> None:
        handle.finish_reason = reason
        handle.done.set()
        if handle.on_done is not None:
            handle.on_done(handle)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run batches until no row is left, or until ``until()`` is true."""
        while until is None or not until():
            if not self.step():
                if until is None:
                    return
                with self._lock:
                    self._lock.wait(timeout=0.01)

    def serve_forever(self, stop: threading.Event) -> None:
        """Run batches as rows arrive, waiting up to ``max_wait`` for a fuller batch, until ``stop`` is set."""
        self._stop = stop
        while not stop.is_set():
            with self._lock:
                if not self.waiting:
                    self._lock.wait(timeout=0.1)
                    continue
                deadline = time.perf_counter() + self.max_wait
                while len(self.waiting) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                    self._lock.wait(timeout=left)
            self.step()
        self.cancel_all()
        self.step()  # ends the cancelled rows that were waiting
