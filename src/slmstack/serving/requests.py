"""Read and validate an OpenAI request body: each field is checked as OpenAI checks it, with a 400 naming it.

Honoured (applied per request): ``model``, ``messages`` (the last user message is the stack's input; text
content parts are joined), ``prompt`` (completions: a string, token ids, or a list of either, one choice each),
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options``, ``logprobs`` and ``top_logprobs`` (log-probabilities of the answer's tokens; on completions
``logprobs`` is the number of top tokens, as vLLM reads it), ``echo`` (completions: the prompt scored token by
token, as lm-eval's ``local-completions`` model asks), ``response_format`` (``json_object`` / ``json_schema``: the
final stage's decoding is constrained by a grammar) and ``user`` (recorded nowhere, as OpenAI's own is metadata).
The sampling fields apply to the stack's final stage, or to every stage when the stack sets
``request_sampling: all``.

Not implemented, so accepted only at the value that changes nothing (:data:`NEUTRAL`), and refused with a 400
naming the field otherwise: ``n``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``tools``,
``tool_choice``, ``functions``, ``function_call``, ``best_of``, ``suffix``, ``audio``, ``modalities``,
``prediction`` and ``reasoning_effort``. A field that would change the reply is never accepted and ignored.
Fields OpenAI does not define are ignored, as vLLM does.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from slmstack.engine.text import MIN_TEMPERATURE

__all__ = ["MAX_TOP_LOGPROBS", "ApiError", "CompletionRequest", "parse_chat", "parse_completion"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (5 for completions; vLLM allows 20 on both)
MAX_STOP = 16  # OpenAI allows 4; vLLM any number; lm-eval's completions client sends every stop string it has


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """What the server runs for one request: the input text, the per-request decoding overrides, streaming."""

    model: str
    text: str
    stream: bool = False
    include_usage: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # GenerationSettings fields for the sampled stage(s)
    max_tokens: int | None = None  # the final stage's budget (0 only with echo)
    logprobs: bool = False  # report the answer's (or, with echo, the prompt's) token log-probabilities
    top_logprobs: int = 0  # and this many most likely tokens at each position
    echo: bool = False  # completions: score the prompt (and at most one next token) instead of answering it
    prompt_ids: list[int] | None = None  # completions: a prompt given as token ids


def _number(body: dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer from {low} to {high}", param=name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {type(value).__name__}", param=name)
    return value


def _stop(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty strings",
                       param="stop")  # fmt: skip
    return stops


def _is(value: Any, neutral: Any) -> bool:
    """``value == neutral`` without Python's ``True == 1`` and ``0 == False`` (``echo: 1`` is not ``false``)."""
    return type(value) is type(neutral) and value == neutral


# field -> the values that change nothing (None, the field left out, is always one); anything else is a 400
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),
    "best_of": (1,),
    "suffix": ("",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
}


def _check_unsupported(body: dict[str, Any]) -> None:
    """Every field slmstack does not implement is refused unless it holds a value that changes nothing."""
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(_is(value, v) for v in neutral):
            shown = " or ".join(json.dumps(v) for v in neutral)
            allowed = f" (only {shown} is accepted)" if neutral else ""
            raise ApiError(400, f"'{name}' is not supported by slmstack{allowed}", param=name,
                           code="unsupported_parameter")  # fmt: skip
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", param="user")


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    from slmstack.engine.grammar import normalize_response_format
    from slmstack.errors import InputError

    try:
        return normalize_response_format(body.get("response_format"))
    except InputError as exc:
        raise ApiError(400, str(exc), param="response_format") from None


def _common(body: dict[str, Any], model: str, text: str, max_tokens_limit: int,
            allow_zero: bool = False) -> CompletionRequest:  # fmt: skip
    _check_unsupported(body)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    low = 0 if allow_zero else 1
    max_tokens = _integer(body, "max_completion_tokens", low, max_tokens_limit)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low, max_tokens_limit)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stop = _stop(body)
    overrides: dict[str, Any] = {}
    if temperature is not None:  # OpenAI: 0 is greedy; anything else samples (a random seed unless one is given)
        overrides["do_sample"] = temperature >= MIN_TEMPERATURE  # below it, logits / T overflows: greedy
        if overrides["do_sample"]:
            overrides["temperature"] = temperature
            overrides["seed"] = (seed % 2**63) if seed is not None else secrets.randbelow(2**63)
    if top_p is not None:
        overrides["top_p"] = max(top_p, 1e-9)  # OpenAI allows 0: keep only the most likely token
    if seed is not None and "seed" not in overrides:
        overrides["seed"] = seed % 2**63
    if stop is not None:
        overrides["stop"] = stop
    response_format = _response_format(body)
    if response_format is not None:
        overrides["response_format"] = response_format
    return CompletionRequest(model, text, stream, include_usage, overrides, max_tokens)


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts are understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""  # an assistant turn that only called tools
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def model_name(body: dict[str, Any]) -> str:
    """The ``model`` field, which every completion request needs."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "Missing required field 'model' (a string)", param="model")
    return name


def parse_chat(body: dict[str, Any], max_tokens_limit: int) -> CompletionRequest:
    """A ``/v1/chat/completions`` body: the stack's input is the last user message."""
    model = model_name(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Missing required field 'messages' (a non-empty list)", param="messages")
    last_user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {str(role)[:40]!r} is not one of {', '.join(ROLES)}",
                           param="messages")  # fmt: skip
        text = _content(message, i)
        if role == "user":
            last_user = text
    if last_user is None:
        raise ApiError(400, "messages needs a user message", param="messages")
    if body.get("echo") is not None and not _is(body["echo"], False):
        raise ApiError(400, "'echo' is supported on /v1/completions only", param="echo", code="unsupported_parameter")
    req = _common(body, model, last_user, max_tokens_limit)
    req.logprobs = _boolean(body, "logprobs")
    req.top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    _check_logprobs_stream(req)
    return req


def parse_completion(body: dict[str, Any], max_tokens_limit: int) -> list[CompletionRequest]:
    """A ``/v1/completions`` body: one request per prompt (a string or token ids, or a list of those)."""
    model = model_name(body)
    prompts = _prompts(body.get("prompt"))
    echo = _boolean(body, "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):  # fmt: skip
        raise ApiError(400, f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (the top tokens to list)",
                       param="logprobs")  # fmt: skip
    requests = []
    for prompt in prompts:
        req = _common(body, model, prompt if isinstance(prompt, str) else "", max_tokens_limit, allow_zero=echo)
        req.prompt_ids = None if isinstance(prompt, str) else prompt
        req.echo, req.logprobs, req.top_logprobs = echo, logprobs is not None, logprobs or 0
        if req.stream:
            raise ApiError(400, "'stream' is supported on /v1/chat/completions only", param="stream")
        if echo and (req.max_tokens or 0) > 1:
            raise ApiError(400, "'echo' scores the prompt: give max_tokens 0 or 1 (a stack answers a prompt rather "
                           "than continuing it)", param="max_tokens")  # fmt: skip
        if echo and req.overrides.get("do_sample") or echo and "response_format" in req.overrides:
            raise ApiError(400, "'echo' scores the prompt and its greedy next token: leave out temperature "
                           "(or give 0) and response_format", param="echo")  # fmt: skip
        requests.append(req)
    return requests


def _prompts(prompt: Any) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each a string or a list of token ids."""

    def ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)  # fmt: skip

    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return list(prompt)
    raise ApiError(400, "Missing required field 'prompt' (a string, a list of token ids, or a non-empty list of "
                   "those)", param="prompt")  # fmt: skip


def _check_logprobs_stream(req: CompletionRequest) -> None:
    if req.logprobs and req.stream:
        raise ApiError(400, "'logprobs' is not supported with 'stream': true", param="logprobs",
                       code="unsupported_parameter")  # fmt: skip
