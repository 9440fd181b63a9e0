"""One client for OpenAI-compatible servers (vLLM, llama.cpp's server, Ollama, OpenAI), over httpx.

The remote backend (:class:`slmstack.stack.backends.OpenAIBackend`) and the remote teacher
(:class:`slmstack.training.teachers.OpenAITeacher`) both talk through it: the request body of one row built from a
stage's :class:`GenerationSettings`, transient failures (a connection error, a timeout, 429 or a 5xx) retried with
exponential backoff, streams read as server-sent events, and every failure one :class:`BackendError` line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from slmstack.errors import SlmstackError

logger = logging.getLogger(__name__)

__all__ = ["BackendError", "Completion", "OpenAIClient"]

MAX_STOP = 4  # OpenAI's API takes at most four stop strings


class BackendError(SlmstackError, RuntimeError):
    """A remote OpenAI-compatible server did not answer, or answered with an error."""


class _Transient(Exception):
    """A failure worth retrying (429, a 5xx)."""


@dataclass
class Completion:
    """One answer: its text, why it ended (``stop``, ``length``, ...), and the server's token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIClient:
    """Requests to one server's ``/v1`` API.

    Args:
        url: the base URL, ending in ``/v1``.
        api_key_env: the environment variable holding the API key (read once, here); None for no key.
        timeout_s: seconds per request.
        retries: extra tries after a transient failure (0: none), ``backoff_s`` x 2^attempt apart.
    """

    def __init__(self, url: str, api_key_env: str | None = None, timeout_s: float = 300.0, retries: int = 0,
                 backoff_s: float = 1.0) -> None:  # fmt: skip
        import httpx

        self.url = url.rstrip("/")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.retries, self.backoff_s = retries, backoff_s

    @staticmethod
    def body(model: str, settings: Any, role: str, prompt: str, chat: bool = True,
             stream: bool = False) -> tuple[str, dict[str, Any]]:  # fmt: skip
        """The path and JSON body of one row: a chat (system = role) or, with ``chat`` off, a plain completion."""
        body: dict[str, Any] = {"model": model, "max_tokens": settings.max_new_tokens,
                                "temperature": settings.temperature if settings.do_sample else 0.0}  # fmt: skip
        if settings.do_sample:
            body.update(top_p=settings.top_p, seed=settings.seed)
        if settings.stop:
            body["stop"] = list(settings.stop)[:MAX_STOP]
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if chat:
            messages = [{"role": "system", "content": role}] if role else []
            body["messages"] = [*messages, {"role": "user", "content": prompt}]
            return "/chat/completions", body
        body["prompt"] = f"{role}\n\n{prompt}" if role else prompt
        return "/completions", body

    def complete(self, path: str, body: dict[str, Any]) -> Completion:
        """Send one request and read its answer (retrying transient failures)."""
        data = self._post(path, body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if "messages" in body else choice["text"]
            usage = data.get("usage") or {}
            return Completion((text or "").strip(), choice.get("finish_reason"), int(usage.get("prompt_tokens", 0)),
                              int(usage.get("completion_tokens", 0)))  # fmt: skip
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise BackendError(f"{self.url} ({body['model']}): malformed answer ({exc})") from None

    def stream(self, path: str, body: dict[str, Any],
               cancelled: Any = None) -> Iterator[str | Completion]:  # fmt: skip
        """Send one streaming request: each piece of text as it arrives, then the whole :class:`Completion`.

        ``cancelled()`` is asked before each piece: when true the connection is closed (the server aborts the
        request) and nothing more is yielded. A transient failure before the first piece is retried.
        """
        import httpx

        pieces, usage, reason = [], {}, None
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream("POST", path, json=body) as response:
                    if response.status_code >= 500 or response.status_code == 429:
                        response.read()
                        raise _Transient(f"answered {response.status_code}")
                    self._raise_for(response, body["model"])
                    for line in response.iter_lines():
                        if cancelled is not None and cancelled():
                            return  # leaving the block closes the connection
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        data = json.loads(line[5:])
                        usage = data.get("usage") or usage
                        for choice in data.get("choices") or []:
                            delta = choice.get("delta") or {}
                            piece = delta.get("content") if "messages" in body else choice.get("text")
                            reason = choice.get("finish_reason") or reason
                            if piece:
                                pieces.append(piece)
                                yield piece
                break
            except (_Transient, httpx.TransportError) as exc:
                if pieces or attempt == self.retries:
                    raise BackendError(f"{self.url} ({body['model']}) failed after {attempt + 1} tries "
                                       f"({exc})") from None  # fmt: skip
                delay = self.backoff_s * 2**attempt
                logger.warning("%s failed (%s); retry %d in %.1fs", self.url, exc, attempt + 1, delay)
                time.sleep(delay)
            except httpx.HTTPError as exc:
                raise BackendError(f"{self.url} ({body['model']}): {exc}") from None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BackendError(f"{self.url} ({body['model']}): malformed answer ({exc})") from None
        yield Completion("".join(pieces).strip(), reason, int(usage.get("prompt_tokens", 0)),
                         int(usage.get("completion_tokens", 0)))  # fmt: skip

    def get_json(self, url: str) -> Any:
        """GET a JSON document (``url`` absolute, or relative to the base URL).

        Raises:
            ConfigError: the server cannot be reached or does not answer JSON (a start-up check's one line).
        """
        import httpx

        from slmstack.errors import ConfigError

        try:
            response = self.http.get(url)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise ConfigError(f"backend {self.url}: {url} did not answer ({type(exc).__name__}: {str(exc)[:120]}); "
                              "is the server running there?") from None  # fmt: skip

    def model_ids(self) -> list[str]:
        """The model names ``/models`` lists."""
        data = self.get_json("/models")
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError) as exc:
            from slmstack.errors import ConfigError

            raise ConfigError(f"backend {self.url}: /models answered no model list ({exc})") from None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = self.http.post(path, json=body)
                if response.status_code < 500 and response.status_code != 429:
                    self._raise_for(response, body["model"])
                    return response.json()
                last = BackendError(f"answered {response.status_code}")
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                last = exc
            if attempt < self.retries:
                delay = self.backoff_s * 2**attempt
                logger.warning("%s failed (%s); retry %d in %.1fs", self.url, last, attempt + 1, delay)
                time.sleep(delay)
        raise BackendError(f"{self.url} ({body['model']}) did not answer after {self.retries + 1} tries ({last})")

    @staticmethod
    def _raise_for(response: Any, model: str) -> None:
        if response.status_code >= 400:
            response.read()
            raise BackendError(f"the server answered {response.status_code} for model {model!r}: "
                               f"{response.text[:200]}")  # fmt: skip
