"""Teachers for distillation: a local model (any model reference) or an OpenAI-compatible endpoint.

A teacher answers a batch of (role, message) requests with one :class:`TeacherReply` each. The HTTP
teacher speaks ``/v1/chat/completions`` (llama.cpp, vLLM, Ollama, OpenAI), retries with exponential
backoff, and then fails with :class:`TeacherUnavailableError`; the caller keeps its progress.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from slmstack.engine.text import BASE_ADAPTER
from slmstack.errors import SlmstackError
from slmstack.models import LoadedModel
from slmstack.stack.backends import LocalBackend, Row
from slmstack.stack.config import GenerationSettings
from slmstack.stack.openai_client import BackendError, OpenAIClient

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
    """An OpenAI-compatible chat endpoint, e.g. ``http://127.0.0.1:8080/v1`` (llama.cpp server).

    Requests go through the same client as the remote stack backend
    (:class:`slmstack.stack.openai_client.OpenAIClient`), retried ``retries`` times on a transient failure.
    """

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
        self.url, self.model, self.workers = url.rstrip("/"), model, workers
        self.client = OpenAIClient(url, api_key_env, timeout_s, retries, backoff_s)
        self.identity = f"openai:{model}@{url}"

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherReply]:
        """Send the requests concurrently (``workers`` at a time); order is kept."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda req: self._one(req[0], req[1], settings), requests))

    def _one(self, role: str, message: str, settings: GenerationSettings) -> TeacherReply:
        path, body = self.client.body(self.model, settings, role, message)
        try:
            done = self.client.complete(path, body)
        except BackendError as exc:
            raise TeacherUnavailableError(f"teacher endpoint {exc}. Check that the server is running; rerun the same "
                                          "command to resume, progress so far is kept.") from None  # fmt: skip
        return TeacherReply(done.text, done.finish_reason != "length")
