"""The engine: requests in, text out, one step at a time.

:class:`Engine` keeps the requests, their handles and the threads; the scheduler picks each step's rows, the
model runner (:mod:`.runner`) turns them into tensors and logits, and each handle (:mod:`.request`) takes its
token, streams its text and ends on EOS, a stop string or its token budget. :meth:`Engine.submit` queues a
tokenized prompt with its adapter and decoding settings and returns an :class:`EngineRequest`. A request's
``on_done`` runs as soon as it ends, before the next step, so a stack's next stage (a new request) joins the very
next step (see ``slmstack.stack.chains``).

Thread use: any thread may submit, cancel and step; steps are serialised by a lock, and each step serves every
request in flight, whichever thread submitted it (so a server's stepping thread and a caller's ``run`` share one
engine safely).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from slmstack.cpu import cpu_features
from slmstack.engine.lora import LoraBank
from slmstack.engine.options import EngineOptions
from slmstack.engine.request import EngineRequest
from slmstack.engine.runner import ModelRunner
from slmstack.engine.sampling import SamplingParams, choose_tokens
from slmstack.engine.scheduler import Request, Scheduler, State
from slmstack.engine.text import GenerationSettings, eos_token_ids
from slmstack.engine.weights import EngineUnsupported, engine_supports, read_weights
from slmstack.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineRequest", "EngineUnsupported", "engine_supports"]


class Engine:
    """Continuous batching of many requests, each under its own LoRA adapter, on one loaded model.

    Args:
        model: a loaded causal LM the engine supports (:func:`engine_supports`), optionally a peft model whose
            LoRA adapters are all read in.
        tokenizer: its tokenizer (for stop strings and streaming text).
        options: every switch (:class:`slmstack.engine.options.EngineOptions`); keyword arguments build one
            (``Engine(model, tokenizer, weights="int8-weights", max_batch=8)``).

    Example:
        >>> engine = Engine(lm.model, lm.tokenizer)
        >>> request = engine.submit(lm.tokenizer("Hello")["input_ids"], settings=GenerationSettings())
        >>> engine.run(); request.generated().text
    """

    def __init__(self, model: Any, tokenizer: Any, options: EngineOptions | None = None, **overrides: Any) -> None:
        reason = engine_supports(model)
        if reason is not None:
            raise EngineUnsupported(f"the engine cannot run this model: {reason}")
        self.options = options or EngineOptions(**overrides)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokenizer = tokenizer
        context = model.config.max_position_embeddings
        self.max_length = min(self.options.max_length or context, context)
        fmt = self.options.weights
        if fmt == "auto" and not (self.device.type == "cpu" and self.dtype == torch.float32
                                  and cpu_features().fast_int4):  # fmt: skip
            fmt = "dense"  # int4 weights are a CPU format of float32 models, vectorised with AVX2 / AVX-512
        self.weights = read_weights(model, fmt, self.dtype, self.max_length)
        self.lora = LoraBank(self.options.max_lora_rank)
        for name in getattr(model, "peft_config", {}) or {}:
            self.lora.add(model, name, self.dtype)
        self.runner = ModelRunner(self.weights, self.lora, self.options, self.max_length)
        self.cache = self.runner.cache
        self.scheduler = Scheduler(self.options.max_batch, self.options.tokens_per_step(self.device))
        self.eos = frozenset(eos_token_ids(model, tokenizer))
        self.vocab_size = int(model.config.vocab_size)  # the width of a row of logits
        self._grammars: dict[str, str] = {}  # response_format -> its compiled grammar
        self._handles: dict[Request, EngineRequest] = {}
        self._lock = threading.Condition()  # the queues and handles
        self._stepping = threading.RLock()  # one step at a time (re-entered by adapter changes in a callback)
        self.steps = 0
        self.tokens_decoded = 0
        self.on_step: Callable[[int], None] | None = None  # rows of each step (the server's batch-size metric)

    @property
    def weight_formats(self) -> dict[str, Any]:
        """Which formats ran: the option asked for, each format's count of projections, the output layer's, the CPU."""
        from dataclasses import asdict

        return {"requested": self.options.weights, "projections": self.weights.formats(),
                "output_layer": self.weights.lm_head.fmt, "summary": self.weights.describe(),
                "cpu": asdict(cpu_features()) if self.device.type == "cpu" else None}  # fmt: skip

    @property
    def exact(self) -> bool:
        """Whether every linear layer is ``dense`` (the exact path lm-eval identity is defined on)."""
        return set(self.weights.formats()) == {"dense"} and self.weights.lm_head.fmt == "dense"

    # ---- adapters
    def add_adapter(self, model: Any, name: str) -> None:
        """Read adapter ``name`` from the peft model ``model`` (loaded there by peft) into the engine."""
        with self._stepping:
            self.lora.add(model, name, self.dtype)
            self.runner.clear_prefixes()  # keys and values computed under the old factors

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``; no running request may use it."""
        aid = self.lora.id(name)
        if any(r.adapter == aid for r in self.scheduler.running + list(self.scheduler.waiting)):
            raise ConfigError(f"adapter {name!r} is in use by a running request")
        with self._stepping:
            self.lora.remove(name)
            self.runner.clear_prefixes()

    # ---- requests
    def submit(self, prompt: list[int], adapter: str | None = None, settings: GenerationSettings | None = None,
               on_text: Callable[[str], None] | None = None, on_done: Callable[[EngineRequest], None] | None = None,
               truncated: bool = False) -> EngineRequest:  # fmt: skip
        """Queue a tokenized prompt; it joins the batch at the next step.

        Args:
            prompt: token ids (already cut to fit, as the stack's ``on_overflow`` rule says).
            adapter: the LoRA adapter's name; None or ``"__base__"`` for the bare base model.
            settings: ``max_new_tokens``, sampling, ``stop``, ``seed``.
            on_text: called with each new piece of text as it becomes final (streaming).
            on_done: called with the handle as soon as the request ends (in the stepping thread).
            truncated: recorded in the result (the prompt was cut to fit).

        Raises:
            InputError: an empty prompt, or one that leaves no room for ``max_new_tokens``.
        """
        settings = settings or GenerationSettings()
        if not prompt:
            raise InputError("the prompt is empty: give at least one token to continue")
        if len(prompt) + settings.max_new_tokens > self.max_length:
            raise InputError(f"a prompt of {len(prompt)} tokens plus max_new_tokens={settings.max_new_tokens} "
                             f"exceeds the {self.max_length}-token context; shorten the prompt")  # fmt: skip
        params = SamplingParams(settings.do_sample, settings.temperature, settings.top_p, settings.top_k,
                                settings.repetition_penalty, settings.seed)  # fmt: skip
        constraint = self.constraint(settings.response_format) if settings.response_format else None
        request = Request(list(prompt), self.lora.id(adapter), settings.max_new_tokens, params, self.eos)
        handle = EngineRequest(self, request, self.tokenizer, list(settings.stop), len(prompt), truncated, on_text,
                               on_done, params.generator(self.device), constraint)  # fmt: skip
        with self._lock:
            self._handles[request] = handle
            self.scheduler.add(request)
            self._lock.notify_all()
        return handle

    def constraint(self, response_format: dict[str, Any]) -> Any:
        """A fresh :class:`slmstack.engine.grammar.Constraint` for one row (``response_format`` normalized).

        Raises:
            InputError: the schema cannot be enforced.
        """
        from slmstack.engine.grammar import Constraint, compile_response_format

        key = json.dumps(response_format, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = compile_response_format(response_format, self.tokenizer, self.vocab_size)
            self._grammars = {**dict(list(self._grammars.items())[-31:]), key: grammar}  # the last 32 kept
        return Constraint(grammar, self.tokenizer, self.vocab_size)

    def warm_up(self, length: int = 512) -> float:
        """Run a decode step of every batch-size bucket now (compiling or capturing it); seconds spent.

        Compiled steps (``engine: compiled``) and CUDA graphs are built at the first step of each bucket and cache
        length; ``serve`` calls this before it reports ready, so that no client's first request pays for it. The
        cache is first grown to ``length`` tokens (capped at the context), the length the steps are built for;
        a longer request grows it and builds them once more. Eager steps: nothing.
        """
        graphs = self.runner.graphs
        if graphs is None:
            return 0.0
        start = time.perf_counter()
        self.cache.ensure(min(length, self.max_length))
        prompt = [next(iter(self.eos), 0)] * 2
        for bucket in graphs.buckets:
            handles = [self.submit(prompt, None, GenerationSettings(max_new_tokens=3)) for _ in range(bucket)]
            for handle in handles:
                handle.request.eos = frozenset()  # decode the full 3 tokens: steps of exactly ``bucket`` rows
            self.run()
        seconds = time.perf_counter() - start
        logger.info("warmed up the decode steps of %d batch sizes in %.1fs", len(graphs.buckets), seconds)
        return seconds

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    def cancel_all(self) -> None:
        """Cancel every request (the server's shutdown)."""
        with self._lock:
            for handle in self._handles.values():
                handle.cancelled = True
            self._lock.notify_all()

    def _wake_up(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- scoring
    def loglikelihoods(self, groups: list[tuple[list[int], list[list[int]]]], adapter: str | None = None,
                       progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:  # fmt: skip
        """lm-eval's (log-likelihood, greedy) of each continuation of each (context, continuations) group.

        Token ids as ``slmstack.evaluation.scorer`` splits them; each context runs once (see
        :mod:`slmstack.engine.scoring`). Scoring takes every cache slot, so no request may be in flight.

        Raises:
            ConfigError: requests are in flight, or a sequence does not fit the context window.
        """
        from slmstack.engine.scoring import score_groups

        return self._score(score_groups, groups, adapter, progress=progress)

    def prompt_logprobs(self, sequences: list[list[int]], adapter: str | None = None,
                        top: int = 1) -> list[list[Any]]:  # fmt: skip
        """Each sequence's tokens scored as an OpenAI server's ``echo`` + ``logprobs`` reports them.

        For a sequence of n tokens, n :class:`slmstack.engine.scoring.TokenScore`: tokens 1..n-1 given the ones
        before (each with the ``top`` most likely tokens at its position), then the greedy next token after the
        whole sequence (its id and log-probability are its top one's). The first token has no score. Runs on the
        scoring steps (:func:`slmstack.engine.scoring.score_tokens`), so the values are :meth:`loglikelihoods`'.

        Raises:
            ConfigError: requests are in flight, or a sequence does not fit the context window.
        """
        from slmstack.engine.scoring import score_tokens

        # the next token's distribution comes from one more scored position: any token id stands in for it
        groups = [(seq[:1], [seq[1:] + [0]]) for seq in sequences]
        scored = self._score(score_tokens, groups, adapter, top=max(top, 1))
        out = []
        for (tokens,) in scored:
            last = tokens[-1]
            tokens[-1] = type(last)(last.top[0][0], last.top[0][1], last.top)
            out.append(tokens)
        return out

    def _score(self, scorer: Callable[..., Any], groups: list[tuple[list[int], list[list[int]]]],
               adapter: str | None, **kwargs: Any) -> Any:  # fmt: skip
        longest = max((len(c) - 1 + max(map(len, conts)) for c, conts in groups), default=0)
        if longest > self.max_length:
            raise ConfigError(f"a scored sequence of {longest} tokens exceeds the {self.max_length}-token context")
        if any(not c or not conts or not all(conts) for c, conts in groups):
            raise ConfigError("every scored context and continuation needs at least one token")
        with self._stepping:
            if self.scheduler.has_work():
                raise ConfigError("the engine is generating; score when its requests have finished")
            rows = self.scheduler.max_rows  # slots 0..rows-1, and the spare slot after them
            return scorer(self.runner.decoder, self.cache, groups, self.lora.id(adapter), rows, rows, **kwargs)

    # ---- running
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until no request is left, or until ``until()`` is true.

        With ``until``, a step that finds nothing to do (another thread stepped first) waits and looks again.
        """
        while until is None or not until():
            if not self.step():
                if until is None:
                    return
                with self._lock:
                    self._lock.wait(timeout=0.01)

    def serve_forever(self, stop: threading.Event) -> None:
        """Step whenever there is work, sleep when there is none, until ``stop`` is set (then cancel the rest)."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                logger.exception("an engine step failed; failing the %d requests in flight", len(self._handles))
                self._fail_all(exc)
                continue
            if not worked:
                with self._lock:
                    if not self.scheduler.has_work() and not stop.is_set():
                        self._lock.wait(timeout=0.1)
        self.cancel_all()
        self._drop_cancelled()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.error = error
            self._finish(handle, "error")

    def step(self) -> bool:
        """Run one step; False when there was nothing to do."""
        with self._stepping:
            return self._step()

    def _step(self) -> bool:
        self._drop_cancelled()
        with self._lock:
            plan = self.scheduler.schedule()
            budget = max((r.budget for r in self.scheduler.running), default=0)
        if plan is None:
            return False
        self.cache.ensure(budget)
        self.runner.reuse_prefixes(plan)
        sampled = [row for row in plan.rows if row.sample]
        handles = [self._handles[row.request] for row in sampled]
        params = [r.request.params for r in sampled]
        constrained = [i for i, h in enumerate(handles) if h.constraint is not None]
        greedy = not constrained and all(not p.do_sample and p.repetition_penalty == 1.0 for p in params)
        logits, best = self.runner.forward(plan)
        if best is not None and greedy:  # the static path's argmax: n token ids come back, not n rows of logits
            tokens = best.tolist()
        else:
            if best is not None:
                logits = logits.clone()  # sampling edits it in place (a repetition penalty, a grammar's mask)
            for i in constrained:
                handles[i].constraint.mask(logits[i])
            histories = [torch.tensor(row.request.prompt + row.request.output, device=self.device)
                         if row.request.params.repetition_penalty != 1.0 else None for row in sampled]  # fmt: skip
            tokens = choose_tokens(logits, params, [h.generator for h in handles], histories)
        for row in plan.rows:
            row.request.computed += len(row.tokens)
        self.runner.keep_prefixes()
        self.steps += 1
        self.tokens_decoded += len(tokens)
        if self.on_step is not None:
            self.on_step(len(plan.rows))
        for handle, token in zip(handles, tokens, strict=True):
            reason = handle.append(token, self.max_length)
            if reason is not None:
                self._finish(handle, reason)
        return True

    def _finish(self, handle: EngineRequest, reason: str) -> None:
        with self._lock:
            self.scheduler.finish(handle.request, reason)
            del self._handles[handle.request]
            self.runner.forget(handle.request)
        handle.finish(reason)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [h for h in self._handles.values() if h.cancelled and h.request.state is not State.FINISHED]
        for handle in cancelled:
            self._finish(handle, "cancelled")
