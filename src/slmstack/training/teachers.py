"""Teachers for distillation: a local model (any model reference) or an OpenAI-compatible endpoint.

A teacher answers a batch of (role, message) requests with one :class:`TeacherReply` each. The HTTP
teacher speaks ``/v1/chat/completions`` (llama.cpp, vLLM, Ollama, OpenAI), retries with exponential
backoff, and then fails with :class:`TeacherUnavailableError`; the caller keeps its progress.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from slmstack.engine.text import BASE_ADAPTER
from slmstack.errors import SlmstackError
from slmstack.models import LoadedModel
from slmstack.stack.backends import LocalBackend, Row
from slmstack.stack.config import GenerationSettings

logger = logging.getLogger(__name__)

__all__ = ["LocalTeacher", "OpenAITeacher", "Teacher", "TeacherReply", "TeacherUnavailableError"]


class TeacherUnavailableError(SlmstackError):
    """The teacher endpoint did not answer after all retries."""


@dataclass
class TeacherReply:
    """The teacher's text, and whether it stopped on its own (False = cut at the token limit)."""

    text: str
    finished: bool = True


class Teacher(Protocol):
    """Anything that answers (role, message) pairs; ``identity`` goes into each record's provenance."""

    identity: str

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherReply]:
        """One reply per request, in order."""
        ...


class LocalTeacher:
    """A locally loaded model, run through the in-process backend (slmstack's engine where it runs the model)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 16, chat_template: bool = True,
                 engine: str = "auto") -> None:  # fmt: skip
        self.loaded = loaded
        self.batch_size = batch_size
        self.chat = chat_template and bool(getattr(loaded.tokenizer, "chat_template", None))
        self.identity = f"local:{loaded.ref.ref}"
        self.backend = LocalBackend(loaded.model, loaded.tokenizer, engine=engine, max_batch=batch_size)

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherReply]:
        """Generate in batches of ``batch_size``; a reply that used every new token is marked unfinished."""
        replies = []
        for start in range(0, len(requests), self.batch_size):
            rows = [Row(role, message, BASE_ADAPTER) for role, message in requests[start : start + self.batch_size]]
            outs = self.backend.generate(rows, settings, self.chat, None, "truncate")
            replies += [TeacherReply(o.text, o.tokens_out < settings.max_new_tokens) for o in outs]
        return replies


class OpenAITeacher:
    """An OpenAI-compatible chat endpoint, e.g. ``http://127.0.0.1:8080/v1`` (llama.cpp server)."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        retries: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        workers: int = 4,
    ) -> None:
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env)
        self.retries, self.backoff_s, self.timeout_s, self.workers = retries, backoff_s, timeout_s, workers
        self.identity = f"openai:{model}@{url}"

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherReply]:
        """Send the requests concurrently (``workers`` at a time); order is kept."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda req: self._one(req[0], req[1], settings), requests))

    def _one(self, role: str, message: str, settings: GenerationSettings) -> TeacherReply:
        messages = ([{"role": "system", "content": role}] if role else []) + [{"role": "user", "content": message}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": settings.max_new_tokens}
        body["temperature"] = settings.temperature if settings.do_sample else 0.0
        if settings.do_sample:
            body.update(top_p=settings.top_p, seed=settings.seed)
        if settings.stop:
            body["stop"] = settings.stop
        data = self._post(body)
        try:
            choice = data["choices"][0]
            return TeacherReply(choice["message"]["content"].strip(), choice.get("finish_reason") != "length")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TeacherUnavailableError(f"{self.url}: unexpected reply {str(data)[:200]!r}") from None

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    detail = exc.read()[:300].decode(errors="replace")
                    raise TeacherUnavailableError(f"{self.url} refused the request ({exc.code}): {detail}") from None
                last = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                last = exc
            if attempt < self.retries:
                delay = self.backoff_s * 2**attempt
                logger.warning("teacher %s failed (%s); retry %d in %.1fs", self.url, last, attempt + 1, delay)
                time.sleep(delay)
        raise TeacherUnavailableError(
            f"teacher endpoint {self.url} did not answer after {self.retries + 1} tries ({last}). "
            "Check that the server is running; rerun the same command to resume, progress so far is kept."
        )
