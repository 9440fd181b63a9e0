"""Where a stage's text is generated: in process on the shared base model, or on a remote OpenAI-compatible engine.

Every backend offers one interface, the engine's: :meth:`Backend.submit` queues one (role, prompt, adapter) row and
returns a handle whose ``on_done`` runs when the row ends; :meth:`Backend.run` steps until a condition holds, and
:meth:`Backend.serve_forever` steps for a server. ``local`` runs rows on the loaded base with one LoRA adapter per
row: on slmstack's engine (continuous batching), or through transformers' ``generate`` in micro-batches
(:class:`slmstack.engine.microbatch.MicroBatchRunner`). ``openai`` sends each row to an OpenAI-compatible server
(vLLM with ``--enable-lora``, llama.cpp's server, ...) under the model name the stack's ``backend.models`` maps the
stage's adapter to, in micro-batches of concurrent requests. Stacks (:mod:`slmstack.stack.chains`), the server's
batcher, evaluation and teachers all generate through this one interface. Each remote kind is a few lines behind
the ``BACKENDS`` registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slmstack.engine.hf import generate_batch
from slmstack.engine.microbatch import MicroBatchRunner
from slmstack.engine.options import EngineOptions
from slmstack.engine.text import (
    BASE_ADAPTER,
    Generated,
    GenerationCancelled,
    encode_prompts,
    format_prompt,
    prompt_token_limit,
)
from slmstack.errors import ConfigError
from slmstack.formats import FP16_WEIGHTS, WEIGHT_FORMATS, engine_weights
from slmstack.fp16_weights import use_float16_weights
from slmstack.registry import Registry
from slmstack.stack.config import BackendConfig
from slmstack.stack.openai_client import MAX_STOP, BackendError, OpenAIClient

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "LlamaCppBackend",
    "LocalBackend",
    "OpenAIBackend",
    "Row",
    "VLLMBackend",
    "make_backend",
]

RESPONSE_FORMAT_NEEDS_ENGINE = (
    "response_format needs slmstack's engine (engine: auto or native), which cannot run this model or was turned off"
)
OnText = Callable[[int, str], None]
OnDone = Callable[[Any], None]


@dataclass
class Row:
    """One row of a stage call: the system role, the rendered prompt and the adapter it runs under."""

    role: str
    prompt: str
    adapter: str


@dataclass(frozen=True)
class _Key:
    """Rows that may share a micro-batch: the same decoding settings and input rules."""

    settings: Any
    chat: bool
    max_input_tokens: int | None
    on_overflow: str


class Backend:
    """The one generation interface (the engine's): submit rows, step until done.

    A subclass provides :meth:`submit` and the ``runner`` it steps (an :class:`slmstack.engine.Engine` or a
    :class:`MicroBatchRunner`); :meth:`generate` is a batch of submits, run to the end.
    """

    max_batch = 16

    @property
    def runner(self) -> Any:
        """What steps this backend's requests (``run``, ``serve_forever``, ``has_work``, ``steps``, ``on_step``)."""
        raise NotImplementedError

    def submit(self, row: Row, settings: Any, chat: bool, max_input_tokens: int | None, on_overflow: str,
               on_text: Callable[[str], None] | None = None, on_done: OnDone | None = None) -> Any:  # fmt: skip
        """Queue one row; the returned handle has ``done``, ``cancel()``, ``generated()`` and ``admitted``."""
        raise NotImplementedError

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until no request is left, or until ``until()`` is true."""
        self.runner.run(until)

    def serve_forever(self, stop: Any, max_wait: float = 0.0) -> None:
        """Step whenever there is work until ``stop`` is set (a micro-batch waits ``max_wait`` seconds for company)."""
        runner = self.runner
        if isinstance(runner, MicroBatchRunner):
            runner.max_batch, runner.max_wait = self.max_batch, max_wait
        runner.serve_forever(stop)

    def generate(self, rows: list[Row], settings: Any, chat: bool, max_input_tokens: int | None,
                 on_overflow: str, on_text: OnText | None = None, cancel: Any = None) -> list[Generated]:  # fmt: skip
        """Generate every row and wait for all (``cancel``, a ``threading.Event``, stops them at the next step)."""
        handles = [self.submit(r, settings, chat, max_input_tokens, on_overflow,
                               on_text=None if on_text is None else (lambda d, i=i: on_text(i, d)))
                   for i, r in enumerate(rows)]  # fmt: skip
        self.run(until=lambda: all(h.done.is_set() for h in handles) or (cancel is not None and cancel.is_set()))
        if not all(h.done.is_set() for h in handles):
            for h in handles:
                h.cancel()
            self.run(until=lambda: all(h.done.is_set() for h in handles))
            raise GenerationCancelled("generation was cancelled")
        return [h.generated() for h in handles]


class LocalBackend(Backend):
    """The loaded (peft-wrapped) base model: the one way slmstack generates in process.

    With ``engine`` ``auto`` (the default) rows run on slmstack's engine (:mod:`slmstack.engine`: continuous
    batching, one LoRA adapter per row) when it runs this model, else on transformers' ``generate`` (left-padded
    batch, routed per row by adapter), which stays the reference; ``native`` requires the engine and ``hf``
    always uses transformers. The engine is built at the first generate, once every adapter is attached, and
    reads adapters attached later as they appear. Stacks, evaluation, distillation teachers and transfer
    studies all generate through this class.
    """

    def __init__(self, model: Any, tokenizer: Any, dtype: str = "auto", engine: str = "auto",
                 max_batch: int = 16, job: str = "generate") -> None:  # fmt: skip
        # the options read SLMSTACK_ENGINE (hf turns the engine off for a whole process; the tests run both ways)
        self.options = EngineOptions(mode=engine, weights=engine_weights(dtype, job), max_batch=max_batch)
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.engine_mode, self.max_batch = self.options.mode, max_batch
        self._engine: Any = None
        self._scoring: Any = None
        self.score_apart = False  # score on an engine of its own even where generation is exact (the server)
        self._hf: MicroBatchRunner | None = None
        self._converted = False
        self._lora_version: tuple = ()

    @property
    def engine(self) -> Any:
        """The :class:`slmstack.engine.Engine` rows run on, or None when they run on transformers."""
        if self.engine_mode == "hf":
            return None
        if self._engine is None:
            from slmstack.engine import Engine, engine_supports

            reason = engine_supports(self.model)
            if reason is not None:
                if self.engine_mode in ("native", "compiled"):
                    raise ConfigError(f"engine: {self.engine_mode} cannot run this model ({reason}); use engine: auto "
                                      "or hf")  # fmt: skip
                logger.info("generating with transformers: the engine cannot run this model (%s)", reason)
                self.engine_mode = "hf"
                return None
            self._engine = Engine(self.model, self.tokenizer, replace(self.options, max_batch=self.max_batch))
            self._lora_version = _lora_version(self.model)  # the engine has just read every adapter
            logger.info("generating with slmstack's engine (%s; up to %d rows a step)",
                        self._engine.weights.describe(), self.max_batch)  # fmt: skip
        # adapters attached since (another stack), or trained since; while requests are in flight only newly
        # attached adapters are looked for (a stack submits each stage's request as the last one ends, and reading
        # every LoRA tensor's version there cost more than the bare base's whole host work on a GPU)
        busy = self._engine.has_work() and _adapter_key(self.model) == self._lora_version[:1]
        version = self._lora_version if busy else _lora_version(self.model)
        if version != self._lora_version:
            for name in getattr(self.model, "peft_config", {}) or {}:
                for engine in (self._engine, self._scoring):
                    if engine is not None:
                        engine.add_adapter(self.model, name)
            self._lora_version = version
        return self._engine

    @property
    def scoring_engine(self) -> Any:
        """The engine log-likelihoods are scored on: float32 whatever the generating engine's format.

        Scores stay lm-eval's: where the generating engine is not exact, a second engine over the same weights
        (with ``score_apart``, always a second one, so that scoring never waits for generation to finish).
        """
        engine = self.engine
        if engine is None or (engine.exact and not self.score_apart):
            return engine
        if self._scoring is None:
            from slmstack.engine import Engine

            self._scoring = Engine(self.model, self.tokenizer, replace(self.options, weights="dense",
                                                                       max_batch=self.max_batch))  # fmt: skip
        return self._scoring

    def reserve_rows(self, rows: int) -> None:
        """Let the engine run ``rows`` rows a step (its cache slots), as a batch of that size asks.

        The engine is rebuilt at the new size when it is idle; while another caller's requests are in flight it
        keeps its size.
        """
        if rows <= self.max_batch:
            return
        if self._engine is not None:
            if self._engine.has_work():
                return
            self._engine, self._scoring, self._lora_version = None, None, ()
        self.max_batch = rows

    def default_adapter(self) -> str:
        """The adapter rows run under when the caller names none: peft's active adapter, else the bare base."""
        active = getattr(self.model, "active_adapter", None) if hasattr(self.model, "peft_config") else None
        return active if isinstance(active, str) else BASE_ADAPTER

    def model_input(self, role: str, prompt: str, chat: bool) -> str:
        """The exact text the model sees (the chat template applied when ``chat``)."""
        return format_prompt(self.tokenizer, role, prompt, chat)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as this model counts them."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, texts: list[str], settings: Any, chat: bool, max_input_tokens: int | None,
               on_overflow: str) -> tuple[list[list[int]], list[bool]]:  # fmt: skip
        """Token ids of full model inputs, cut to fit as ``on_overflow`` says."""
        limit = prompt_token_limit(self.model, settings.max_new_tokens, max_input_tokens)
        return encode_prompts(self.tokenizer, texts, limit, on_overflow, chat)

    @property
    def runner(self) -> Any:
        """The engine, or the transformers micro-batcher where the engine does not run."""
        engine = self.engine
        return engine if engine is not None else self._hf_runner()

    def _hf_runner(self) -> MicroBatchRunner:
        if self._hf is None:
            self._hf = MicroBatchRunner(self._hf_batch, self.max_batch)
        self._hf.max_batch = self.max_batch
        return self._hf

    def submit(self, row: Row, settings: Any, chat: bool, max_input_tokens: int | None, on_overflow: str,
               on_text: Callable[[str], None] | None = None, on_done: OnDone | None = None) -> Any:  # fmt: skip
        """Queue one row on the engine, or for the next transformers micro-batch.

        Raises:
            InputError: the prompt is over the limit and ``on_overflow`` is ``error``.
        """
        text = self.model_input(row.role, row.prompt, chat)
        ids, cut = self.encode([text], settings, chat, max_input_tokens, on_overflow)
        engine = self.engine  # once: it looks for adapters attached or trained since
        if engine is not None:
            return engine.submit(ids[0], row.adapter, settings, truncated=cut[0], on_text=on_text, on_done=on_done)
        if settings.response_format is not None:
            raise ConfigError(RESPONSE_FORMAT_NEEDS_ENGINE)
        return self._hf_runner().submit((text, row.adapter), _Key(settings, chat, max_input_tokens, on_overflow),
                                        on_text, on_done)  # fmt: skip

    def _hf_batch(self, key: _Key, items: list[tuple[str, str]], on_text: OnText | None,
                  cancel: Any) -> list[Generated]:  # fmt: skip
        """One micro-batch through transformers' ``generate``, each row under its adapter."""
        if self.dtype in WEIGHT_FORMATS and self.dtype != FP16_WEIGHTS:
            raise ConfigError(f"dtype {self.dtype!r} needs the engine, which cannot run this model")

        if self.dtype == FP16_WEIGHTS and not self._converted:
            use_float16_weights(self.model)  # once every adapter is attached
            self._converted = True
        return generate_batch(
            self.model, self.tokenizer, [t for t, _ in items], key.settings, adapter_names=[a for _, a in items],
            max_input_tokens=key.max_input_tokens, on_overflow=key.on_overflow, chat=key.chat, on_text=on_text,
            cancel=cancel,
        )  # fmt: skip


@dataclass
class _RemoteRow:
    """A row sent to a remote server, and its own cancel flag (the client that asked for it left)."""

    row: Row
    cancelled: threading.Event


class OpenAIBackend(Backend):
    """An OpenAI-compatible server: each row is one chat (or completion) request under its adapter's model name.

    The server batches concurrent requests itself (vLLM's continuous batching), so a micro-batch's rows are sent
    concurrently, ``max_concurrency`` at a time. Every request streams: each row's deltas are passed on as they
    arrive, and a row whose caller has gone (a server's client disconnected) closes its connection, which vLLM
    and llama.cpp's server take as an abort. Connection errors, timeouts, 429 and 5xx answers are retried
    ``retries`` times with exponential backoff before the first token arrives. The ``openai`` kind sends what
    OpenAI's API defines (at most 4 stop strings; more are cut, with a warning); :class:`VLLMBackend` and
    :class:`LlamaCppBackend` add what their engines need.
    """

    max_stop: int | None = MAX_STOP

    def __init__(self, config: BackendConfig, chat: bool) -> None:
        self.config, self.chat = config, chat
        self.client = OpenAIClient(config.url, config.api_key_env, config.timeout_s, retries=config.retries)
        self.max_batch = 4 * config.max_concurrency
        self._runner = MicroBatchRunner(self._batch, self.max_batch)
        self._warned_stop = False

    @property
    def runner(self) -> MicroBatchRunner:
        """The micro-batcher that sends rows."""
        return self._runner

    def submit(self, row: Row, settings: Any, chat: bool, max_input_tokens: int | None, on_overflow: str,
               on_text: Callable[[str], None] | None = None, on_done: OnDone | None = None) -> Any:  # fmt: skip
        """Queue one row for the next micro-batch (the remote engine applies its own input limit)."""
        item = _RemoteRow(row, threading.Event())
        handle = self._runner.submit(item, _Key(settings, chat, None, "truncate"), on_text, on_done)
        plain_cancel = handle.cancel

        def cancel() -> None:  # this row's request is closed at once, whatever its batch-mates do
            item.cancelled.set()
            plain_cancel()

        handle.cancel = cancel
        return handle

    def model_input(self, role: str, prompt: str, chat: bool) -> str:
        """What is sent: the prompt (the server applies its own chat template), or role and prompt as plain text."""
        return f"{role}\n\n{prompt}" if role and not chat else prompt

    def count_tokens(self, text: str) -> int:
        """An estimate (about 4 characters per token): the remote engine enforces its own context limit."""
        return max(1, len(text) // 4)

    def model_name(self, adapter: str) -> str:
        """The remote model name a stage's adapter is served under."""
        return self.config.base_model if adapter == BASE_ADAPTER else self.config.models.get(adapter, adapter)

    def request_fields(self, settings: Any, adapter: str) -> dict[str, Any]:
        """Fields this kind of server needs beyond OpenAI's (merged into each request's body)."""
        return {}

    def _batch(self, key: _Key, items: list[_RemoteRow], on_text: OnText | None, cancel: Any) -> list[Generated]:
        """Send a micro-batch's rows concurrently and wait for all."""
        workers = min(len(items), self.config.max_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slmstack-backend") as pool:
            return list(pool.map(lambda i: self._one(i, items[i], key.settings, on_text, cancel), range(len(items))))

    def _one(self, index: int, item: _RemoteRow, settings: Any, on_text: OnText | None, cancel: Any) -> Generated:
        row = item.row
        path, body = self.client.body(self.model_name(row.adapter), settings, row.role, row.prompt, self.chat,
                                      stream=True)  # fmt: skip
        stops = list(settings.stop)
        if self.max_stop is not None and len(stops) > self.max_stop and not self._warned_stop:
            logger.warning("backend %s takes %d stop strings; the rest are not sent", self.config.url, self.max_stop)
            self._warned_stop = True
        if stops:
            body["stop"] = stops if self.max_stop is None else stops[: self.max_stop]
        if settings.response_format is not None:
            body["response_format"] = settings.response_format
        body.update(self.request_fields(settings, row.adapter))
        done = None
        for event in self.client.stream(path, body, cancelled=lambda: item.cancelled.is_set() or cancel.is_set()):
            if isinstance(event, str):
                if on_text is not None:
                    on_text(index, event)
            else:
                done = event
        if done is None:  # the stream was closed because the row was cancelled
            raise GenerationCancelled("generation was cancelled")
        return Generated(done.text, done.prompt_tokens, done.completion_tokens)


class VLLMBackend(OpenAIBackend):
    """vLLM's OpenAI server (``vllm serve BASE --enable-lora --lora-modules NAME=PATH ...``).

    At start-up ``/v1/models`` must list the base model and every adapter name the stack maps a stage to; the
    missing ones are named in one line. Each request carries ``top_k`` and every stop string.
    """

    max_stop = None

    def __init__(self, config: BackendConfig, chat: bool) -> None:
        super().__init__(config, chat)
        served = self.client.model_ids()
        wanted = [config.base_model, *config.models.values()]
        missing = [m for m in dict.fromkeys(wanted) if m not in served]
        if missing:
            raise ConfigError(
                f"backend {config.url}: vLLM does not serve {', '.join(map(repr, missing))} (it serves "
                f"{', '.join(map(repr, served)) or 'nothing'}); start it with --enable-lora --lora-modules "
                "NAME=PATH, or fix backend.base_model / backend.models"
            )  # fmt: skip

    def request_fields(self, settings: Any, adapter: str) -> dict[str, Any]:
        """``top_k`` (vLLM's -1 for none) and the repetition penalty under vLLM's name."""
        fields: dict[str, Any] = {"top_k": settings.top_k or -1}
        if settings.repetition_penalty != 1.0:
            fields["repetition_penalty"] = settings.repetition_penalty
        return fields


class LlamaCppBackend(OpenAIBackend):
    """llama.cpp's ``llama-server``, with LoRA adapters loaded by ``--lora FILE``.

    ``slmstack export --format gguf-lora`` writes the files and the command line.
    llama-server applies every loaded adapter to every request at its global scale unless the request carries a
    ``lora`` list, so each request sends one: the stage's adapter at scale 1 and every other at 0 (all zeros for a
    bare stage). ``backend.models`` maps a stage to its adapter file (the path llama-server lists at
    ``/lora-adapters``, or its file name). Sampling is pinned so that a stage's settings mean what they mean on
    slmstack's engine: ``top_k`` (0: none), ``min_p`` 0 and ``typical_p`` 1 (llama.cpp's defaults are 40, 0.05
    and 1), and the repetition penalty as ``repeat_penalty`` over the whole context (``repeat_last_n``: the server's
    context size, read from ``/props``), as transformers applies it.
    """

    max_stop = None

    def __init__(self, config: BackendConfig, chat: bool) -> None:
        super().__init__(config, chat)
        root = config.url.rstrip("/").removesuffix("/v1")
        listed = self.client.get_json(f"{root}/lora-adapters")
        if not isinstance(listed, list):
            raise ConfigError(f"backend {config.url}: /lora-adapters did not answer a list; is this llama-server?")
        self.lora_ids: dict[str, int] = {}
        for entry in listed:
            path = str(entry.get("path", ""))
            for alias in (path, Path(path).name, Path(path).stem):
                self.lora_ids.setdefault(alias, int(entry["id"]))
        self.all_ids = sorted({int(e["id"]) for e in listed})
        props = self.client.get_json(f"{root}/props")  # the context size: the repetition penalty's window
        settings = props.get("default_generation_settings", {}) if isinstance(props, dict) else {}
        self.context = int(settings.get("n_ctx") or props.get("n_ctx") or 4096)
        missing = [m for m in dict.fromkeys(config.models.values()) if m not in self.lora_ids]
        if missing:
            loaded = ", ".join(repr(str(e.get("path"))) for e in listed) or "none"
            names = ", ".join(map(repr, missing))
            raise ConfigError(f"backend {config.url}: llama-server has no LoRA adapter {names} (loaded: {loaded}); "
                              "start it with --lora FILE for each, or fix backend.models")  # fmt: skip

    def model_name(self, adapter: str) -> str:
        """llama-server serves one model; the adapter goes in the ``lora`` field."""
        return self.config.base_model

    def request_fields(self, settings: Any, adapter: str) -> dict[str, Any]:
        """The ``lora`` scales and llama.cpp's names for the sampling settings."""
        file = None if adapter == BASE_ADAPTER else self.config.models.get(adapter, adapter)
        mine = self.lora_ids.get(file) if file is not None else None
        if file is not None and mine is None:
            raise ConfigError(f"backend {self.config.url}: no llama-server adapter for stage adapter {adapter!r}; "
                              "map it in backend.models")  # fmt: skip
        fields: dict[str, Any] = {
            "lora": [{"id": i, "scale": 1.0 if i == mine else 0.0} for i in self.all_ids],
            "top_k": settings.top_k, "min_p": 0.0, "typical_p": 1.0, "top_p": settings.top_p,
            "repeat_penalty": settings.repetition_penalty, "repeat_last_n": self.context, "seed": settings.seed,
        }  # fmt: skip
        return fields


_LORA_PARAMS = "_slmstack_lora_params"  # on the peft model: (its adapters' identity, their LoRA parameters)


def _adapter_key(model: Any) -> tuple:
    """The attached adapters' identity: ``(((name, id(config)), ...),)``, or ``()`` without adapters.

    An adapter attached, deleted, or attached again under the same name changes it (a new config object).
    """
    configs = getattr(model, "peft_config", None)
    return (tuple((name, id(config)) for name, config in configs.items()),) if configs else ()


def _lora_version(model: Any) -> tuple:
    """Changes whenever an adapter is attached or its weights change (an optimizer step bumps ``_version``).

    Its first item is :func:`_adapter_key`. The walk over the model's parameters is done once per set of attached
    adapters; each call then reads only the LoRA tensors' versions and storage.
    """
    key = _adapter_key(model)
    if not key:
        return ()
    cached = model.__dict__.get(_LORA_PARAMS)
    if cached is None or cached[0] != key:
        cached = (key, [p for name, p in model.named_parameters() if "lora_" in name])
        model.__dict__[_LORA_PARAMS] = cached
    return key + tuple((p._version, p.data_ptr()) for p in cached[1])


BACKENDS: Registry[Callable[[BackendConfig, bool], Any]] = Registry("backend")
BACKENDS.add("openai", OpenAIBackend)
BACKENDS.add("vllm", VLLMBackend)
BACKENDS.add("llamacpp", LlamaCppBackend)


def make_backend(config: BackendConfig, chat: bool) -> Any:
    """The remote backend ``config`` names."""
    return BACKENDS.get(config.type)(config, chat)
