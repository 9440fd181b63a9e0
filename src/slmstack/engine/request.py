"""A caller's handle on one engine request, and the text side of a request: streaming, stop strings, its result."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from slmstack.engine.scheduler import Request
from slmstack.engine.text import Generated, GenerationCancelled, TextStream, finish_row, tail_text

__all__ = ["EngineRequest", "Handle"]


class Handle:
    """What every request handle shares (an engine request, a micro-batch row): its result once it has ended.

    A subclass has ``finish_reason``, ``error`` and ``result``.
    """

    finish_reason: str | None
    error: BaseException | None
    result: Generated | None

    def generated(self) -> Generated:
        """The finished result.

        Raises:
            GenerationCancelled: the request was cancelled.
        """
        if self.finish_reason == "cancelled":
            raise GenerationCancelled("generation was cancelled")
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("the request has not finished")
        return self.result


class EngineRequest(Handle):
    """A caller's handle on one request: its text as it grows, and its :class:`Generated` result once done."""

    def __init__(self, engine: Any, request: Request, tokenizer: Any, stop: list[str], tokens_in: int,
                 truncated: bool, on_text: Callable[[str], None] | None,
                 on_done: Callable[[EngineRequest], None] | None, generator: Any,
                 constraint: Any = None) -> None:  # fmt: skip
        self.engine, self.request, self.tokenizer = engine, request, tokenizer
        self.stop = [s for s in stop if s]
        self.tokens_in, self.truncated = tokens_in, truncated
        self.stream = TextStream(tokenizer, stop, on_text) if on_text is not None else None
        self.on_done, self.generator = on_done, generator
        self.constraint = constraint  # a grammar the row's tokens must follow (slmstack.engine.grammar)
        self.cancelled = False
        self.error: BaseException | None = None  # the failure of the step it was in
        self.result: Generated | None = None
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop this request at the next step (its result is then a :class:`GenerationCancelled`)."""
        self.cancelled = True
        self.engine._wake_up()

    @property
    def admitted(self) -> float | None:
        """When the request first joined a step (None while it waits)."""
        return self.request.admitted

    @property
    def finish_reason(self) -> str | None:
        """``stop`` (EOS or a stop string), ``length``, ``cancelled``, or None while running."""
        return self.request.finish_reason

    def append(self, token: int, max_length: int) -> str | None:
        """Take the request's next token; the reason it ends with it (``stop``, ``length``), or None."""
        request = self.request
        request.output.append(token)
        if token in request.eos:
            if self.stream is not None:
                self.stream.end()
            return "stop"
        if self.stream is not None:
            self.stream.add(token)
        if self.constraint is not None and self.constraint.take(token):
            return "stop"  # the document is complete
        if self.stop:
            text = tail_text(self.tokenizer, request.output, max(len(s) for s in self.stop) + 4)
            if any(s in text for s in self.stop):
                return "stop"
        if len(request.output) >= request.max_new_tokens or request.length >= max_length:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        """The request ended: its result (unless cancelled or failed), the stream's rest, then ``on_done``."""
        if reason not in ("cancelled", "error"):
            self.result = finish_row(self.tokenizer, self.request.output, self.tokens_in, self.truncated,
                                     sorted(self.request.eos), self.stop)  # fmt: skip
            if self.stream is not None:
                self.stream.flush(self.result.text)
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)
