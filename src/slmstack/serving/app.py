"""An OpenAI-compatible HTTP API for stacks: FastAPI app, errors in OpenAI's shape, Prometheus metrics.

Endpoints: ``GET /`` (a page that shows each stage as a card; no CDN, everything served from here),
``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming and SSE streaming),
``POST /v1/completions``, ``GET /health``, ``GET /metrics`` and FastAPI's ``/openapi.json``. Every
completion carries the stage trace in ``slmstack_trace`` (OpenAI clients ignore unknown fields). A chat
request's input is its last user message. Errors are ``{"error": {"message", "type", "param", "code"}}``
with a 4xx/5xx status, and never hold a file path, a traceback or a secret. (This module imports
FastAPI: import it only where the ``serve`` extra is installed.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from slmstack.engine.text import GenerationCancelled
from slmstack.serving.batcher import Batcher
from slmstack.serving.requests import ApiError, CompletionRequest, parse_chat, parse_completion
from slmstack.serving.settings import ServeSettings
from slmstack.stack.backends import BackendError, LocalBackend
from slmstack.stack.runtime import Stack, StackResult

logger = logging.getLogger(__name__)

__all__ = ["ApiError", "build_app"]


@dataclass
class _Metrics:
    registry: Any
    requests: Any
    errors: Any
    batch_size: Any
    queue_wait: Any
    latency: Any

    @classmethod
    def create(cls) -> _Metrics:
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


MAX_JSON_DEPTH = 64  # an OpenAI request is a few levels deep


def _depth(value: Any) -> int:
    """How deeply ``value``'s lists and objects nest, walked without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _trace(result: StackResult) -> list[dict[str, Any]]:
    return [asdict(t) for t in result.trace]


def _usage(result: StackResult) -> dict[str, int]:
    prompt = result.trace[0].tokens_in if result.trace else 0
    completion = sum(t.tokens_out for t in result.trace)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(stacks: dict[str, Stack], settings: ServeSettings) -> Any:
    """The FastAPI app serving ``stacks`` (model name -> loaded stack)."""
    metrics = _Metrics.create()
    batchers: dict[str, Batcher] = {}
    stopping = threading.Event()  # set on SIGTERM/SIGINT: generation in flight stops, its clients get a 503

    def on_batch(size: int, waits: list[float]) -> None:
        if size:
            metrics.batch_size.observe(size)
        for w in waits:
            metrics.queue_wait.observe(w)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        by_backend: dict[int, Batcher] = {}  # one batcher per backend: stacks on one base share its steps
        for name, stack in stacks.items():
            if id(stack.backend) not in by_backend:
                if isinstance(stack.backend, LocalBackend) and stack.backend._engine is None:
                    stack.backend.max_batch = settings.max_batch_size  # rows per step
                batcher = Batcher(stack.backend, on_batch, stop=stopping, max_wait_ms=settings.max_wait_ms)
                batcher.start()
                by_backend[id(stack.backend)] = batcher
            batchers[name] = by_backend[id(stack.backend)]
        yield
        for b in by_backend.values():
            await b.stop()

    app = FastAPI(title="slmstack", version="1", lifespan=lifespan)
    app.state.batchers = batchers
    app.state.stop = stopping.set  # the server calls it when it is told to stop

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own 404/405 in OpenAI's shape, like every other error
        messages = {404: f"No such endpoint: {request.method} {request.url.path[:100]}",
                    405: f"Method {request.method} is not allowed on {request.url.path[:100]}"}  # fmt: skip
        err = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)[:200]),
                       code="not_found" if exc.status_code == 404 else None)  # fmt: skip
        return error_response(err, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, "The request is not valid"), request.url.path)

    def error_response(err: ApiError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(err.status)).inc()
        metrics.errors.labels(endpoint, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if settings.api_key and path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {settings.api_key}":
                return error_response(ApiError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                                               "authentication_error", code="invalid_api_key"), path)  # fmt: skip
        try:
            return await call_next(request)
        except ApiError as err:
            return error_response(err, path)
        except GenerationCancelled:
            return error_response(ApiError(503, "The server is shutting down; retry on another server", "server_error",
                                           code="shutting_down"), path)  # fmt: skip
        except BackendError:
            logger.exception("the generation backend failed on %s", path)
            return error_response(ApiError(502, "The generation backend failed; see the server log", "server_error"),
                                  path)  # fmt: skip
        except Exception:  # noqa: BLE001 - never leak a traceback or a path
            logger.exception("internal error on %s", path)
            return error_response(ApiError(500, "Internal server error", "server_error"), path)

    async def read_json(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"Request body larger than {settings.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise ApiError(413, f"Request body larger than {settings.max_body_bytes} bytes")
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

    def stack_for(name: str) -> tuple[str, Stack]:
        if name not in stacks:
            raise ApiError(404, f"The model '{name[:100]}' does not exist; GET /v1/models lists them",
                           param="model", code="model_not_found")  # fmt: skip
        return name, stacks[name]

    def check_prompt(stack: Stack, text: str) -> None:
        if not text.strip():
            raise ApiError(400, "The input is empty", param="messages")
        n = stack.count_tokens(text)
        if n > settings.max_prompt_tokens:
            raise ApiError(400, f"The input has {n} tokens; the limit is {settings.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")  # fmt: skip

    def served(endpoint: str, start: float) -> None:
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def answer(req: CompletionRequest, request: Request) -> StackResult:
        pending = await batchers[req.model].submit(stacks[req.model], req.text, req.max_tokens,
                                                   overrides=req.overrides)  # fmt: skip
        waiter = asyncio.ensure_future(pending.future)
        while not waiter.done():
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if not done and await request.is_disconnected():
                pending.future.cancel()  # frees its slot if its batch has not started
                raise ApiError(499, "Client closed the request")
        return waiter.result()

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        from importlib import resources

        from fastapi.responses import HTMLResponse

        return HTMLResponse((resources.files("slmstack.serving") / "static" / "index.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmstack",
                                            "slmstack_stages": [s.name for s in st.config.stages]}
                                           for n, st in stacks.items()]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        start = time.perf_counter()
        req = parse_completion(await read_json(request), settings.max_tokens)
        name, stack = stack_for(req.model)
        if req.stream:
            raise ApiError(400, "'stream' is supported on /v1/chat/completions only", param="stream")
        check_prompt(stack, req.text)
        result = await answer(req, request)
        served("/v1/completions", start)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "text": result.answer, "finish_reason": "stop",
                                            "logprobs": None}],
                "usage": _usage(result), "slmstack_trace": _trace(result)}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        start = time.perf_counter()
        req = parse_chat(await read_json(request), settings.max_tokens)
        name, stack = stack_for(req.model)
        check_prompt(stack, req.text)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if not req.stream:
            result = await answer(req, request)
            served("/v1/chat/completions", start)
            return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                                 "finish_reason": "stop"}],
                    "usage": _usage(result), "slmstack_trace": _trace(result)}  # fmt: skip
        pending = await batchers[name].submit(stack, req.text, req.max_tokens, stream=True, overrides=req.overrides)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await pending.events.get()
                    if event is None:
                        break
                    if isinstance(event, str):  # a piece of the final stage's text, as it is decoded
                        yield chunk({"content": event})
                    else:  # a stage finished (the earlier ones before the final stage's text starts)
                        yield chunk({}, slmstack_stage=asdict(event))
                result = await pending.future
                yield chunk({}, "stop", slmstack_trace=_trace(result), usage=_usage(result))
                yield "data: [DONE]\n\n"
                served("/v1/chat/completions", start)
            except asyncio.CancelledError:
                pending.future.cancel()  # the client left: free the slot if its batch has not started
                raise
            except GenerationCancelled:
                yield f"data: {json.dumps(ApiError(503, 'The server is shutting down', 'server_error').body())}\n\n"
            except Exception:  # noqa: BLE001
                logger.exception("stream failed")
                yield f"data: {json.dumps(ApiError(500, 'Internal server error', 'server_error').body())}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
