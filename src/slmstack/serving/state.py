"""The server's one application-state object: stacks, batchers, metrics, and the checks every route shares.

The checks: reading a JSON body, finding a stack, an input's size, waiting for an answer.

``build_app`` (:mod:`.app`) makes one :class:`ServerState` and hangs it on ``app.state.slm``; each route handler
(:mod:`.routes`) reads it from there. (This module imports FastAPI: import it only where the ``serve`` extra is.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from slmstack.serving.batcher import Batcher
from slmstack.serving.requests import ApiError, CompletionRequest
from slmstack.serving.runtime_models import RuntimeModels
from slmstack.serving.settings import ServeSettings
from slmstack.stack.runtime import Stack, StackResult

__all__ = ["MAX_JSON_DEPTH", "Metrics", "ServerState", "state_of", "trace_of", "usage_of"]

MAX_JSON_DEPTH = 64  # an OpenAI request is a few levels deep


@dataclass
class Metrics:
    """The Prometheus metrics, in a registry of the app's own."""

    registry: Any
    requests: Any
    errors: Any
    batch_size: Any
    queue_wait: Any
    latency: Any

    @classmethod
    def create(cls) -> Metrics:
        """Fresh metrics in a registry of their own."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = CollectorRegistry()
        return cls(
            r,
            Counter("slmstack_requests", "HTTP requests", ["endpoint", "status"], registry=r),
            Counter("slmstack_errors", "requests answered with an error", ["endpoint", "status"], registry=r),
            Histogram(
                "slmstack_batch_size", "requests per stack batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
            ),  # fmt: skip
            Histogram("slmstack_queue_wait_seconds", "time a request waited for its batch", registry=r),
            Histogram(
                "slmstack_request_latency_seconds", "time from request to full answer", ["endpoint"], registry=r
            ),  # fmt: skip
        )


@dataclass
class ServerState:
    """Everything the routes share."""

    stacks: dict[str, Stack]
    settings: ServeSettings
    metrics: Metrics = field(default_factory=Metrics.create)
    batchers: dict[str, Batcher] = field(default_factory=dict)  # model name -> the batcher of its backend
    stopping: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM/SIGINT
    runtime: RuntimeModels = field(init=False)  # models added and removed while serving

    def __post_init__(self) -> None:
        self.runtime = RuntimeModels(self)

    def on_batch(self, size: int, waits: list[float]) -> None:
        """A batcher's report: the rows of a step, and requests' queue waits."""
        if size:
            self.metrics.batch_size.observe(size)
        for w in waits:
            self.metrics.queue_wait.observe(w)

    def start_batchers(self) -> None:
        """One batcher per backend (stacks on one base share its steps), stepping in its own thread."""
        for name, stack in self.stacks.items():
            self.start_batcher(name, stack)

    def start_batcher(self, name: str, stack: Stack) -> None:
        """Model ``name`` steps on its backend's batcher, started now if no served model has started it."""
        from slmstack.stack.backends import LocalBackend

        shared = next((self.batchers[n] for n, s in self.stacks.items() if s.backend is stack.backend
                       and n in self.batchers), None)  # fmt: skip
        if shared is None:
            if not (isinstance(stack.backend, LocalBackend) and stack.backend._engine is not None):
                stack.backend.max_batch = self.settings.max_batch_size  # rows per step (a built engine keeps its)
            shared = Batcher(stack.backend, self.on_batch, stop=self.stopping, max_wait_ms=self.settings.max_wait_ms)
            shared.start()
        self.batchers[name] = shared

    async def stop_batchers(self) -> None:
        """Stop every batcher; requests in flight end as cancelled."""
        for batcher in {id(b): b for b in self.batchers.values()}.values():
            await batcher.stop()

    def error_response(self, err: ApiError, endpoint: str) -> JSONResponse:
        """An error in OpenAI's shape, counted."""
        self.metrics.requests.labels(endpoint, str(err.status)).inc()
        self.metrics.errors.labels(endpoint, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    def served(self, endpoint: str, start: float) -> None:
        """A request answered: counted, and its latency observed."""
        self.metrics.requests.labels(endpoint, "200").inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, refused (an :class:`ApiError`) when it is not one that can be read safely."""
        limit = self.settings.max_body_bytes
        if not request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"Request body larger than {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"Request body larger than {limit} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "Request body is not valid JSON") from None
        except RecursionError:  # Python 3.11's decoder stops near 1,000 levels; 3.12's goes deeper
            raise ApiError(400, "Request body is nested too deeply") from None
        if _depth(body) > MAX_JSON_DEPTH:  # one rule whatever the Python version
            raise ApiError(400, f"Request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object")
        try:  # a lone surrogate ("\ud800") is valid JSON but not text: refuse it here, not in the tokenizer
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "Request body holds a string that is not valid Unicode (a lone surrogate)") from None
        return body

    def stack_for(self, name: str) -> tuple[str, Stack]:
        """The stack served as model ``name``."""
        if name in self.runtime.unloading:
            raise ApiError(404, f"The model '{name[:100]}' is being unloaded", param="model", code="model_not_found")
        if name not in self.stacks:
            raise ApiError(404, f"The model '{name[:100]}' does not exist; GET /v1/models lists them",
                           param="model", code="model_not_found")  # fmt: skip
        return name, self.stacks[name]

    def check_prompt(self, stack: Stack, text: str) -> None:
        """Refuse an empty input, or one over ``max_prompt_tokens``."""
        if not text.strip():
            raise ApiError(400, "The input is empty", param="messages")
        n = stack.count_tokens(text)
        if n > self.settings.max_prompt_tokens:
            raise ApiError(400, f"The input has {n} tokens; the limit is {self.settings.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")  # fmt: skip

    def check_prompt_ids(self, stack: Stack, req: CompletionRequest) -> None:
        """A prompt given as token ids: ids of the model's vocabulary, decoded to the stack's input text."""
        if req.prompt_ids is None:
            return
        if stack.model is None:
            raise ApiError(400, "a prompt of token ids needs a model that runs in process; send text",
                           param="prompt")  # fmt: skip
        vocab = int(stack.model.config.vocab_size)
        if max(req.prompt_ids) >= vocab:
            raise ApiError(400, f"prompt holds token id {max(req.prompt_ids)}, outside the vocabulary of {vocab}",
                           param="prompt")  # fmt: skip
        if len(req.prompt_ids) > self.settings.max_prompt_tokens:
            raise ApiError(400, f"The input has {len(req.prompt_ids)} tokens; the limit is "
                           f"{self.settings.max_prompt_tokens}", param="prompt",
                           code="context_length_exceeded")  # fmt: skip
        req.text = stack.tokenizer.decode(req.prompt_ids)

    def check_response_format(self, stack: Stack, name: str, req: CompletionRequest) -> None:
        """A ``response_format`` the final stage can follow: compiled now, so that a bad schema is a 400."""
        from slmstack.errors import InputError
        from slmstack.stack.backends import RESPONSE_FORMAT_NEEDS_ENGINE, LocalBackend

        fmt = req.overrides.get("response_format")
        if fmt is None or not isinstance(stack.backend, LocalBackend):
            return  # a remote backend enforces it itself
        engine = stack.backend.engine
        if engine is None:
            raise ApiError(400, f"model '{name[:100]}': {RESPONSE_FORMAT_NEEDS_ENGINE}", param="response_format")
        try:
            engine.constraint(fmt)
        except InputError as exc:
            raise ApiError(400, str(exc), param="response_format") from None

    async def answer(self, req: CompletionRequest, request: Request) -> StackResult:
        """Run the request's chain and wait for it; a client that leaves frees its row."""
        pending = await self.batchers[req.model].submit(self.stacks[req.model], req.text, req.max_tokens,
                                                        overrides=req.overrides)  # fmt: skip
        waiter = asyncio.ensure_future(pending.future)
        while not waiter.done():
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if not done and await request.is_disconnected():
                pending.future.cancel()  # frees its row at the next step
                raise ApiError(499, "Client closed the request")
        return waiter.result()


def state_of(request: Request) -> ServerState:
    """The app's :class:`ServerState`."""
    return request.app.state.slm


def trace_of(result: StackResult) -> list[dict[str, Any]]:
    """Every stage's trace, JSON-ready (``slmstack_trace``)."""
    return [asdict(t) for t in result.trace]


def usage_of(result: StackResult) -> dict[str, int]:
    """OpenAI's ``usage``: the first stage's input tokens, and every stage's output tokens."""
    prompt = result.trace[0].tokens_in if result.trace else 0
    completion = sum(t.tokens_out for t in result.trace)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _depth(value: Any) -> int:
    """How deeply ``value``'s lists and objects nest, walked without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
