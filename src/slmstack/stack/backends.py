"""Where a stage's text is generated: in process on the shared base model, or on a remote OpenAI-compatible engine.

A backend turns a batch of (role, prompt, adapter) rows into :class:`Generated` rows. ``local`` runs
:func:`generate_batch` on the loaded base with one LoRA adapter per row. ``openai`` sends each row to an
OpenAI-compatible server (vLLM with ``--enable-lora``, llama.cpp's server, ...) under the model name the
stack's ``backend.models`` maps the stage's adapter to, so the same stack, trace and server run while the
generation happens on the remote engine. Each backend is a few lines behind the ``BACKENDS`` registry.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from slmstack.errors import SlmstackError
from slmstack.fp16_weights import use_float16_weights
from slmstack.registry import Registry
from slmstack.stack.config import BackendConfig
from slmstack.stack.generation import BASE_ADAPTER, Generated, format_prompt, generate_batch

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BackendError", "LocalBackend", "OpenAIBackend", "Row", "make_backend"]

OnText = Callable[[int, str], None]


class BackendError(SlmstackError, RuntimeError):
    """A remote generation backend did not answer, or answered with an error."""


@dataclass
class Row:
    """One row of a stage call: the system role, the rendered prompt and the adapter it runs under."""

    role: str
    prompt: str
    adapter: str


class LocalBackend:
    """The loaded (peft-wrapped) base model: rows share one left-padded batch, routed per row by adapter."""

    def __init__(self, model: Any, tokenizer: Any, float16_weights: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._convert = float16_weights  # done at the first generate, once every adapter is attached

    def model_input(self, role: str, prompt: str, chat: bool) -> str:
        """The exact text the model sees (the chat template applied when ``chat``)."""
        return format_prompt(self.tokenizer, role, prompt, chat)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as this model counts them."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, rows: list[Row], settings: Any, chat: bool, max_input_tokens: int | None,
                 on_overflow: str, on_text: OnText | None = None, cancel: Any = None) -> list[Generated]:  # fmt: skip
        """Generate every row in one batch (``cancel``, a ``threading.Event``, stops it at the next token)."""
        if self._convert:
            use_float16_weights(self.model)
            self._convert = False
        return generate_batch(
            self.model, self.tokenizer, [self.model_input(r.role, r.prompt, chat) for r in rows], settings,
            adapter_names=[r.adapter for r in rows], max_input_tokens=max_input_tokens, on_overflow=on_overflow,
            chat=chat, on_text=on_text, cancel=cancel,
        )  # fmt: skip


class OpenAIBackend:
    """An OpenAI-compatible server: each row is one chat (or completion) request under its adapter's model name.

    The server batches concurrent requests itself (vLLM's continuous batching), so rows are sent
    concurrently, ``max_concurrency`` at a time. With ``on_text`` the requests stream and each row's
    deltas are passed on as they arrive.
    """

    def __init__(self, config: BackendConfig, chat: bool) -> None:
        import httpx

        self.config, self.chat = config, chat
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=config.url.rstrip("/"), headers=headers, timeout=config.timeout_s)

    def model_input(self, role: str, prompt: str, chat: bool) -> str:
        """What is sent: the prompt (the server applies its own chat template), or role and prompt as plain text."""
        return f"{role}\n\n{prompt}" if role and not chat else prompt

    def count_tokens(self, text: str) -> int:
        """An estimate (about 4 characters per token): the remote engine enforces its own context limit."""
        return max(1, len(text) // 4)

    def model_name(self, adapter: str) -> str:
        """The remote model name a stage's adapter is served under."""
        return self.config.base_model if adapter == BASE_ADAPTER else self.config.models.get(adapter, adapter)

    def generate(self, rows: list[Row], settings: Any, chat: bool, max_input_tokens: int | None,
                 on_overflow: str, on_text: OnText | None = None, cancel: Any = None) -> list[Generated]:  # fmt: skip
        """Send every row (concurrently) and wait for all (the remote engine applies its own input limit)."""
        workers = min(len(rows), self.config.max_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slmstack-backend") as pool:
            return list(pool.map(lambda i: self._one(i, rows[i], settings, on_text), range(len(rows))))

    def _request(self, row: Row, settings: Any, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model_name(row.adapter), "max_tokens": settings.max_new_tokens,
                                "temperature": settings.temperature if settings.do_sample else 0.0}  # fmt: skip
        if settings.do_sample:
            body.update(top_p=settings.top_p, seed=settings.seed)
        if settings.stop:
            body["stop"] = list(settings.stop)[:4]
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty  # vLLM and llama.cpp accept it
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if self.chat:
            messages = [{"role": "system", "content": row.role}] if row.role else []
            body["messages"] = [*messages, {"role": "user", "content": row.prompt}]
            return "/chat/completions", body
        body["prompt"] = self.model_input(row.role, row.prompt, chat=False)
        return "/completions", body

    def _one(self, index: int, row: Row, settings: Any, on_text: OnText | None) -> Generated:
        import httpx

        path, body = self._request(row, settings, stream=on_text is not None)
        try:
            if on_text is None:
                response = self.client.post(path, json=body)
                _raise_for(response, body["model"])
                data = response.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if self.chat else choice["text"]
                return _generated(text or "", data.get("usage"))
            pieces, usage = [], None
            with self.client.stream("POST", path, json=body) as response:
                _raise_for(response, body["model"])
                for line in response.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    data = json.loads(line[5:])
                    usage = data.get("usage") or usage
                    for choice in data.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                        if piece:
                            pieces.append(piece)
                            on_text(index, piece)
            return _generated("".join(pieces), usage)
        except httpx.HTTPError as exc:
            raise BackendError(f"backend {self.config.url} ({body['model']}): {exc}") from None
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise BackendError(f"backend {self.config.url} ({body['model']}): malformed answer ({exc})") from None


def _raise_for(response: Any, model: str) -> None:
    if response.status_code >= 400:
        response.read()
        raise BackendError(f"backend answered {response.status_code} for model {model!r}: {response.text[:200]}")


def _generated(text: str, usage: dict[str, Any] | None) -> Generated:
    usage = usage or {}
    return Generated(text.strip(), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


BACKENDS: Registry[Callable[[BackendConfig, bool], Any]] = Registry("backend")
BACKENDS.add("openai", OpenAIBackend)


def make_backend(config: BackendConfig, chat: bool) -> Any:
    """The remote backend ``config`` names."""
    return BACKENDS.get(config.type)(config, chat)
