"""Log-probabilities for the server: a prompt scored token by token (``echo``), and an answer's tokens (``logprobs``).

Both run on the engine's scoring steps (:meth:`slmstack.engine.Engine.prompt_logprobs`), on the stack's scoring
engine: float32 whatever the generating engine's format, and an engine of its own, so that scoring never waits for
the requests being generated. The values are therefore the ones ``slmstack eval`` and lm-eval's ``hf`` model
compute. A prompt is scored as raw text (no chat template), under the final stage's adapter.

An answer's log-probabilities are those of the tokens the final stage generated (a stop string's tokens included,
the end-of-sequence token left out), after its full prompt (the chat template applied as the stage applied it).
For a greedy answer on the float32 engine each token is the top one at its position.

Shapes: completions use the legacy ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (vLLM's,
which lm-eval's ``local-completions`` reads), chat completions ``{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from slmstack.serving.requests import ApiError
from slmstack.stack.runtime import Stack, StackResult

__all__ = ["answer_sequence", "chat_logprobs", "completion_logprobs", "scoring_engine", "score", "token_text"]


def scoring_engine(stack: Stack, name: str, what: str) -> Any:
    """The engine ``stack`` scores on, or a 400 naming ``what`` needs one."""
    from slmstack.stack.backends import LocalBackend

    backend = stack.backend
    engine = backend.engine if isinstance(backend, LocalBackend) else None
    if engine is None:
        where = "a remote backend" if not isinstance(backend, LocalBackend) else "transformers"
        raise ApiError(400, f"{what} needs a model that runs on slmstack's engine; '{name[:100]}' runs on {where}",
                       param=what.strip("'"), code="unsupported_parameter")  # fmt: skip
    backend.score_apart = True
    return backend.scoring_engine


async def score(engine: Any, sequences: list[list[int]], adapter: str, top: int) -> list[list[Any]]:
    """:meth:`Engine.prompt_logprobs` off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, engine.prompt_logprobs, sequences, adapter, top)


def token_text(tokenizer: Any, token: int) -> str:
    """One token as text (a piece of a multi-byte character shows as U+FFFD, as in vLLM's replies)."""
    return tokenizer.decode([token])


def answer_sequence(stack: Stack, result: StackResult) -> tuple[list[int], int]:
    """The final stage's prompt and answer as token ids, and where the answer starts.

    The ids the engine generated (a stop string's tokens included, EOS left out); else the answer's text as the
    tokenizer splits it after the stage's prompt.
    """
    if result.token_ids is not None:
        prompt, output = result.token_ids
        return prompt + output, len(prompt)
    stage, trace = stack.config.stages[-1], result.trace[-1]
    chat = stack.uses_chat_template
    text = stack.backend.model_input(stage.role, trace.prompt, chat)
    prompt = stack.tokenizer(text, add_special_tokens=not chat)["input_ids"]
    answer = stack.tokenizer(trace.output, add_special_tokens=False)["input_ids"] if trace.output else []
    return prompt + answer, len(prompt)


def _top(tokenizer: Any, top: list[tuple[int, float]], n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, value in top[:n]:
        out.setdefault(token_text(tokenizer, token), value)
    return out


def completion_logprobs(tokenizer: Any, ids: list[int], scored: list[Any], first: int, top: int,
                        extra: int = 0) -> dict[str, Any]:  # fmt: skip
    """The legacy shape for tokens ``first..`` of ``ids`` (and ``extra`` next tokens): token 0 has no score."""
    tokens = [*ids, *(s.token for s in scored[len(ids) - 1 :][:extra])]
    texts = [token_text(tokenizer, t) for t in tokens]
    values: list[float | None] = [None] + [s.logprob for s in scored[: len(tokens) - 1]]
    tops: list[dict[str, float] | None] = [None] + [_top(tokenizer, s.top, top) for s in scored[: len(tokens) - 1]]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    start = offsets[first] if first < len(offsets) else at
    return {"tokens": texts[first:], "token_logprobs": values[first:], "top_logprobs": tops[first:],
            "text_offset": [o - start for o in offsets[first:]]}  # fmt: skip


def chat_logprobs(tokenizer: Any, ids: list[int], scored: list[Any], first: int, top: int) -> dict[str, Any]:
    """Chat's shape for the answer tokens ``ids[first:]``."""

    def entry(token: int, value: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for j in range(first, len(ids)):
        s = scored[j - 1]
        content.append({**entry(ids[j], s.logprob), "top_logprobs": [entry(t, v) for t, v in s.top[:top]]})
    return {"content": content}
