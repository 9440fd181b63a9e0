"""The server's route handlers, each a plain function over the app's :class:`~slmstack.serving.state.ServerState`.

``GET /`` (a page that shows each stage as a card; no CDN, everything served from here), ``GET /health``,
``GET /metrics``, ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (non-streaming and
SSE streaming). Every completion carries the stage trace in ``slmstack_trace`` (OpenAI clients ignore unknown
fields). (This module imports FastAPI: import it only where the ``serve`` extra is installed.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

from slmstack.engine.text import GenerationCancelled
from slmstack.serving.logprobs import (
    answer_sequence,
    chat_logprobs,
    completion_logprobs,
    score,
    scoring_engine,
    token_text,
)
from slmstack.serving.requests import ApiError, parse_chat, parse_completion
from slmstack.serving.state import state_of, trace_of, usage_of

logger = logging.getLogger(__name__)

__all__ = ["router"]

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Any:
    """The web page: each stage of an answer as a card."""
    from importlib import resources

    return HTMLResponse((resources.files("slmstack.serving") / "static" / "index.html").read_text("utf-8"))


@router.get("/health")
async def health() -> dict[str, str]:
    """Alive (answers while a batch decodes)."""
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request) -> Any:
    """Prometheus' text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return PlainTextResponse(generate_latest(state_of(request).metrics.registry).decode(),
                             media_type=CONTENT_TYPE_LATEST)  # fmt: skip


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served stacks, each with its stages' names."""
    state = state_of(request)
    state.metrics.requests.labels("/v1/models", "200").inc()
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmstack",
                                        "slmstack_stages": [s.name for s in st.config.stages]}
                                       for n, st in state.stacks.items()]}  # fmt: skip


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Any:
    """Serve a LoRA adapter on a served base model (vLLM's endpoint and body)."""
    return await _adapter_change(request, "load")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Any:
    """Stop serving an adapter added with ``/v1/load_lora_adapter``."""
    return await _adapter_change(request, "unload")


async def _adapter_change(request: Request, action: str) -> Any:
    state = state_of(request)
    change = state.runtime.load_adapter if action == "load" else state.runtime.unload_adapter
    message = await change(await state.read_json(request))
    state.metrics.requests.labels(request.url.path, "200").inc()
    return PlainTextResponse(message)


@router.post("/v1/stacks")
async def add_stack(request: Request) -> dict[str, Any]:
    """Serve a stack YAML (``{"path": ...}``) under its name."""
    state = state_of(request)
    name = await state.runtime.load_stack(await state.read_json(request))
    state.metrics.requests.labels("/v1/stacks", "200").inc()
    stages = [s.name for s in state.stacks[name].config.stages]
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "slmstack",
            "slmstack_stages": stages}  # fmt: skip


@router.delete("/v1/stacks/{name}")
async def remove_stack(name: str, request: Request) -> dict[str, Any]:
    """Stop serving a stack added with ``POST /v1/stacks``."""
    state = state_of(request)
    await state.runtime.remove(name)
    state.metrics.requests.labels("/v1/stacks", "200").inc()
    return {"id": name, "object": "model", "deleted": True}


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    """A completion of each prompt by the named stack (no streaming here); with ``echo``, the prompt scored."""
    state, start = state_of(request), time.perf_counter()
    reqs = parse_completion(await state.read_json(request), state.settings.max_tokens)
    name, stack = state.stack_for(reqs[0].model)
    for req in reqs:
        state.check_prompt_ids(stack, req)
        if not req.echo:
            state.check_prompt(stack, req.text)
            state.check_response_format(stack, name, req)
    replies = await asyncio.gather(*(_complete(state, name, stack, req, request) for req in reqs))
    state.served("/v1/completions", start)
    usage = {k: sum(u[k] for _, u, _ in replies) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    choices = [{"index": i, **choice} for i, (choice, _, _) in enumerate(replies)]
    traces = [t for _, _, t in replies]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": usage,
            "slmstack_trace": traces[0] if len(traces) == 1 else traces}  # fmt: skip


async def _complete(state: Any, name: str, stack: Any, req: Any, request: Request) -> tuple[dict, dict, list]:
    """One prompt's choice, usage and trace."""
    tokenizer = stack.tokenizer if stack.model is not None else None
    if req.echo:  # the prompt scored as raw text under the final stage's adapter, and its greedy next token
        engine = scoring_engine(stack, name, "'echo'")
        ids = req.prompt_ids or tokenizer(req.text)["input_ids"]
        if len(ids) + 1 > engine.max_length:
            raise ApiError(400, f"The prompt has {len(ids)} tokens; the limit is {engine.max_length - 1}",
                           param="prompt", code="context_length_exceeded")  # fmt: skip
        adapter = stack.adapter_for(stack.config.stages[-1].name)
        (scored,) = await score(engine, [ids], adapter, req.top_logprobs)
        extra = req.max_tokens or 0
        text = (req.text if req.prompt_ids is None else tokenizer.decode(ids)) + "".join(
            token_text(tokenizer, s.token) for s in scored[len(ids) - 1 :][:extra])  # fmt: skip
        logprobs = completion_logprobs(tokenizer, ids, scored, 0, req.top_logprobs, extra) if req.logprobs else None
        usage = {"prompt_tokens": len(ids), "completion_tokens": extra, "total_tokens": len(ids) + extra}
        return {"text": text, "finish_reason": "length", "logprobs": logprobs}, usage, []
    result = await state.answer(req, request)
    logprobs = None
    if req.logprobs:
        engine = scoring_engine(stack, name, "'logprobs'")
        ids, first = answer_sequence(stack, result)
        (scored,) = await score(engine, [ids], stack.adapter_for(stack.config.stages[-1].name), req.top_logprobs)
        logprobs = completion_logprobs(tokenizer, ids, scored, first, req.top_logprobs)
    return ({"text": result.answer, "finish_reason": "stop", "logprobs": logprobs}, usage_of(result),
            trace_of(result))  # fmt: skip


@router.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    """A chat completion of the last user message by the named stack; with ``stream``, server-sent events."""
    state, start = state_of(request), time.perf_counter()
    req = parse_chat(await state.read_json(request), state.settings.max_tokens)
    name, stack = state.stack_for(req.model)
    state.check_prompt(stack, req.text)
    state.check_response_format(stack, name, req)
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    if not req.stream:
        engine = scoring_engine(stack, name, "'logprobs'") if req.logprobs else None
        result = await state.answer(req, request)
        logprobs = None
        if engine is not None:
            ids, first = answer_sequence(stack, result)
            (scored,) = await score(engine, [ids], stack.adapter_for(stack.config.stages[-1].name), req.top_logprobs)
            logprobs = chat_logprobs(stack.tokenizer, ids, scored, first, req.top_logprobs)
        state.served("/v1/chat/completions", start)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                             "finish_reason": "stop", "logprobs": logprobs}],
                "usage": usage_of(result), "slmstack_trace": trace_of(result)}  # fmt: skip
    pending = await state.batchers[name].submit(stack, req.text, req.max_tokens, stream=True, overrides=req.overrides)

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
            yield chunk({}, "stop", slmstack_trace=trace_of(result), usage=usage_of(result))
            yield "data: [DONE]\n\n"
            state.served("/v1/chat/completions", start)
        except asyncio.CancelledError:
            pending.future.cancel()  # the client left: free its row
            raise
        except GenerationCancelled:
            yield f"data: {json.dumps(ApiError(503, 'The server is shutting down', 'server_error').body())}\n\n"
        except Exception:  # noqa: BLE001
            logger.exception("stream failed")
            yield f"data: {json.dumps(ApiError(500, 'Internal server error', 'server_error').body())}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
