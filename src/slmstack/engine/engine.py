"""The engine: requests in, text out, one step at a time.

:class:`Engine` owns the decoder (weights read once from the loaded model), the KV cache, the LoRA adapters
and the scheduler. :meth:`Engine.submit` queues a tokenized prompt with its adapter and decoding settings and
returns an :class:`EngineRequest`; each :meth:`Engine.step` asks the scheduler for the next rows, runs one
forward pass over them, samples a token for each row that needs one, streams text, and ends requests on EOS,
a stop string or their token budget. A request's ``on_done`` runs as soon as it ends, before the next step,
so a stack's next stage (a new request) joins the very next step (see ``slmstack.stack.runtime``).

Thread use: any thread may submit, cancel and step; steps are serialised by a lock, and each step serves every
request in flight, whichever thread submitted it (so a server's stepping thread and a caller's ``run`` share one
engine safely).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from slmstack.engine.cache import KVCache
from slmstack.engine.graphs import DecodeGraphs
from slmstack.engine.lora import LoraBank, StepAdapters
from slmstack.engine.model import Decoder, StepInput
from slmstack.engine.prefix import PrefixCache
from slmstack.engine.sampling import SamplingParams, choose_tokens
from slmstack.engine.scheduler import Request, Scheduler, State, StepPlan
from slmstack.engine.text import Generated, GenerationCancelled, TextStream, eos_token_ids, finish_row, tail_text
from slmstack.engine.weights import engine_support, read_weights
from slmstack.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

# decode attention reads the cache's first m slots in place while m <= VIEW_SLOTS x the decode rows, and copies
# the rows' keys and values beyond that (the copy costs about as much as attending over 2.3x the rows)
VIEW_SLOTS = 2

__all__ = ["Engine", "EngineRequest", "EngineUnsupported", "engine_supports"]


@functools.cache
def _can_compile() -> bool:
    """Whether ``torch.compile`` works here (it needs a C++ compiler on a CPU): a tiny function compiled once."""
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(4)).sum() == 12)
    except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported platform, ...
        logger.warning("torch.compile does not work here (%s); decode steps run eagerly", _first_line(exc))
        return False


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for a one-line warning."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class EngineUnsupported(ConfigError):
    """The engine cannot run this model or adapter (the caller falls back to transformers)."""


def engine_supports(model: Any) -> str | None:
    """None when the engine can run ``model`` (adapters included), else why not."""
    reason = engine_support(model)
    if reason is None and hasattr(model, "peft_config"):
        for name, cfg in model.peft_config.items():
            if (
                getattr(cfg, "peft_type", None) is not None
                and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA"
            ):
                return f"adapter {name!r} is a {cfg.peft_type} adapter"
            if getattr(cfg, "use_dora", False):
                return f"adapter {name!r} uses DoRA"
    return reason


class EngineRequest:
    """A caller's handle on one request: its text as it grows, and its :class:`Generated` result once done."""

    def __init__(self, engine: Engine, request: Request, stop: list[str], tokens_in: int, truncated: bool,
                 on_text: Callable[[str], None] | None, on_done: Callable[[EngineRequest], None] | None,
                 generator: torch.Generator | None) -> None:  # fmt: skip
        self.engine, self.request, self.stop = engine, request, [s for s in stop if s]
        self.tokens_in, self.truncated = tokens_in, truncated
        self.stream = TextStream(engine.tokenizer, stop, on_text) if on_text is not None else None
        self.on_done, self.generator = on_done, generator
        self.cancelled = False
        self.error: BaseException | None = None  # the failure of the step it was in
        self.result: Generated | None = None
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop this request at the next step (its result is then a :class:`GenerationCancelled`)."""
        self.cancelled = True
        self.engine._wake_up()

    @property
    def admitted(self) -> float | None:
        """When the request first joined a step (None while it waits)."""
        return self.request.admitted

    @property
    def finish_reason(self) -> str | None:
        """``stop`` (EOS or a stop string), ``length``, ``cancelled``, or None while running."""
        return self.request.finish_reason

    def generated(self) -> Generated:
        """The finished result.

        Raises:
            GenerationCancelled: the request was cancelled.
        """
        if self.request.finish_reason == "cancelled":
            raise GenerationCancelled("generation was cancelled")
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("the request has not finished")
        return self.result


class Engine:
    """Continuous batching of many requests, each under its own LoRA adapter, on one loaded model.

    Args:
        model: a loaded causal LM the engine supports (:func:`engine_supports`), optionally a peft model whose
            LoRA adapters are all read in.
        tokenizer: its tokenizer (for stop strings and streaming text).
        weights: the linear layers' weight format (``dense``, ``float16-weights``, ``bfloat16-weights``,
            ``int8-weights``; see :class:`slmstack.engine.layers.Linear`).
        max_batch: rows per step, which is also the number of cache slots.
        max_tokens_per_step: tokens per step; prompts are fed in chunks that fit beside the decoding rows.
            Default: 256 on a CPU, where a step's time grows with its tokens and the decoding rows wait for it;
            2048 on a GPU, where a step of a few hundred tokens is bound by kernel launches, so larger prompt
            chunks mean fewer eager steps at nearly the same cost each.
        max_lora_rank: the largest adapter rank accepted.
        max_length: the longest sequence (prompt + output); default: the model's context window.
        graphs: ``auto`` (CUDA graphs for decode steps on a GPU, none on a CPU), ``capture``, ``off``, ``static``
            (the graphs' static path run eagerly: what the CPU tests check), or ``compile``: on a CPU the static
            path through ``torch.compile`` (a C++ compiler needed; without one, a warning and eager steps), on a
            GPU ``capture``.
        prefix_slots: cache slots reserved for prompt prefixes shared across requests (a stage's system turn, role
            and template text; see :mod:`slmstack.engine.prefix`); 0 turns the reuse off.

    Example:
        >>> engine = Engine(lm.model, lm.tokenizer)
        >>> request = engine.submit(lm.tokenizer("Hello")["input_ids"], settings=GenerationSettings())
        >>> engine.run(); request.generated().text
    """

    def __init__(self, model: Any, tokenizer: Any, weights: str = "dense", max_batch: int = 16,
                 max_tokens_per_step: int | None = None, max_lora_rank: int = 64, max_length: int | None = None,
                 graphs: str = "auto", prefix_slots: int = 4) -> None:  # fmt: skip
        reason = engine_supports(model)
        if reason is not None:
            raise EngineUnsupported(f"the engine cannot run this model: {reason}")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokenizer = tokenizer
        context = model.config.max_position_embeddings
        self.max_length = min(max_length or context, context)
        self.weights = read_weights(model, weights, self.dtype, self.max_length)
        self.lora = LoraBank(max_lora_rank)
        for name in getattr(model, "peft_config", {}) or {}:
            self.lora.add(model, name, self.dtype)
        s = self.weights.shape
        # one slot more than the rows (the padding rows of a CUDA-graph step write there), then the prefixes' slots
        self.cache = KVCache(s.layers, s.kv_heads, s.head_dim, max_batch + 1 + prefix_slots, self.max_length,
                             self.dtype, self.device)  # fmt: skip
        self.prefixes = PrefixCache(list(range(max_batch + 1, max_batch + 1 + prefix_slots))) if prefix_slots else None
        self._keep: dict[Request, int] = {}  # request -> leading prompt tokens to keep as a prefix once computed
        self.decoder = Decoder(self.weights, self.cache, self.lora)
        if graphs not in ("auto", "capture", "off", "static", "compile"):
            raise ConfigError(f"graphs {graphs!r}: use auto, capture, off, static or compile")
        capture = graphs == "capture" or (graphs in ("auto", "compile") and self.device.type == "cuda")
        if graphs == "compile" and not capture and not _can_compile():
            graphs = "off"
        self.graphs = (DecodeGraphs(self.decoder, max_batch, scratch_slot=max_batch, capture=capture,
                                    compile=graphs == "compile")
                       if capture or graphs in ("static", "compile") else None)  # fmt: skip
        if max_tokens_per_step is None:
            max_tokens_per_step = 2048 if self.device.type == "cuda" else 256
        self.scheduler = Scheduler(max_batch, max_tokens_per_step)
        self.eos = frozenset(eos_token_ids(model, tokenizer))
        self._handles: dict[Request, EngineRequest] = {}
        self._lock = threading.Condition()  # the queues and handles
        self._stepping = threading.RLock()  # one step at a time (re-entered by adapter changes in a callback)
        self.steps = 0
        self.tokens_decoded = 0
        self.on_step: Callable[[int], None] | None = None  # rows of each step (the server's batch-size metric)

    # ---- adapters
    def add_adapter(self, model: Any, name: str) -> None:
        """Read adapter ``name`` from the peft model ``model`` (loaded there by peft) into the engine."""
        with self._stepping:
            self.lora.add(model, name, self.dtype)
            if self.prefixes is not None:  # keys and values computed under the old factors
                self.prefixes.clear()

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``; no running request may use it."""
        aid = self.lora.id(name)
        if any(r.adapter == aid for r in self.scheduler.running + list(self.scheduler.waiting)):
            raise ConfigError(f"adapter {name!r} is in use by a running request")
        with self._stepping:
            self.lora.remove(name)
            if self.prefixes is not None:
                self.prefixes.clear()

    # ---- requests
    def submit(self, prompt: list[int], adapter: str | None = None, settings: Any = None,
               on_text: Callable[[str], None] | None = None, on_done: Callable[[EngineRequest], None] | None = None,
               truncated: bool = False) -> EngineRequest:  # fmt: skip
        """Queue a tokenized prompt; it joins the batch at the next step.

        Args:
            prompt: token ids (already cut to fit, as the stack's ``on_overflow`` rule says).
            adapter: the LoRA adapter's name; None or ``"__base__"`` for the bare base model.
            settings: a ``GenerationSettings`` (``max_new_tokens``, sampling, ``stop``, ``seed``).
            on_text: called with each new piece of text as it becomes final (streaming).
            on_done: called with the handle as soon as the request ends (in the stepping thread).
            truncated: recorded in the result (the prompt was cut to fit).

        Raises:
            InputError: an empty prompt, or one that leaves no room for ``max_new_tokens``.
        """
        from slmstack.engine.text import GenerationSettings

        settings = settings or GenerationSettings()
        if not prompt:
            raise InputError("the prompt is empty: give at least one token to continue")
        if len(prompt) + settings.max_new_tokens > self.max_length:
            raise InputError(f"a prompt of {len(prompt)} tokens plus max_new_tokens={settings.max_new_tokens} "
                             f"exceeds the {self.max_length}-token context; shorten the prompt")  # fmt: skip
        params = SamplingParams(settings.do_sample, settings.temperature, settings.top_p, settings.top_k,
                                settings.repetition_penalty, settings.seed)  # fmt: skip
        request = Request(list(prompt), self.lora.id(adapter), settings.max_new_tokens, params, self.eos)
        handle = EngineRequest(self, request, list(settings.stop), len(prompt), truncated, on_text, on_done,
                               params.generator(self.device))  # fmt: skip
        with self._lock:
            self._handles[request] = handle
            self.scheduler.add(request)
            self._lock.notify_all()
        return handle

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

        longest = max((len(c) - 1 + max(map(len, conts)) for c, conts in groups), default=0)
        if longest > self.max_length:
            raise ConfigError(f"a scored sequence of {longest} tokens exceeds the {self.max_length}-token context")
        if any(not c or not conts or not all(conts) for c, conts in groups):
            raise ConfigError("every scored context and continuation needs at least one token")
        with self._stepping:
            if self.scheduler.has_work():
                raise ConfigError("the engine is generating; score when its requests have finished")
            rows = self.scheduler.max_rows  # slots 0..rows-1, and the spare slot after them
            return score_groups(self.decoder, self.cache, groups, self.lora.id(adapter), rows, rows,
                                progress=progress)  # fmt: skip

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
        if self.prefixes is not None:
            self._reuse_prefixes(plan)
        sampled = [row for row in plan.rows if row.sample]
        handles = [self._handles[row.request] for row in sampled]
        params = [r.request.params for r in sampled]
        greedy = all(not p.do_sample and p.repetition_penalty == 1.0 for p in params)
        tokens = None
        ran = self._graph_step(plan)
        if ran is not None:
            logits, best = ran
            if greedy:  # the graph's argmax: n token ids come back, not n rows of logits
                tokens = best.tolist()
            else:
                logits = logits.clone()  # sampling edits it in place (a repetition penalty)
        else:
            logits = self.decoder.forward(self._inputs(plan))
        if tokens is None:
            histories = [torch.tensor(row.request.prompt + row.request.output, device=self.device)
                         if row.request.params.repetition_penalty != 1.0 else None for row in sampled]  # fmt: skip
            tokens = choose_tokens(logits, params, [h.generator for h in handles], histories)
        for row in plan.rows:
            row.request.computed += len(row.tokens)
        if self._keep:
            self._keep_prefixes()
        self.steps += 1
        self.tokens_decoded += len(tokens)
        if self.on_step is not None:
            self.on_step(len(plan.rows))
        for handle, token in zip(handles, tokens, strict=True):
            self._append(handle, token)
        return True

    def _reuse_prefixes(self, plan: StepPlan) -> None:
        """Newly admitted rows start after the longest kept prefix of their prompt (its keys and values copied in)."""
        for row in plan.prefill:
            request = row.request
            if row.start or request.computed:
                continue  # a later chunk of a prompt
            kept = self.prefixes.lookup(request.adapter, request.prompt)
            reused = 0
            if kept is not None:
                reused = len(kept.tokens)
                self.cache.copy(kept.slot, [request.slot], reused)
                row.start, row.tokens = reused, request.prompt[reused : reused + len(row.tokens)]
                row.sample = reused + len(row.tokens) == len(request.prompt)
                request.computed = reused
            keep = self.prefixes.candidate(request.adapter, request.prompt, reused)
            if keep:
                self._keep[request] = keep

    def _keep_prefixes(self) -> None:
        """Copy the prefixes chosen at admission into reserved slots once their keys and values are computed."""
        for request, n in list(self._keep.items()):
            if request.slot is None:  # ended first
                del self._keep[request]
            elif request.computed >= n:
                del self._keep[request]
                slot = self.prefixes.keep(request.adapter, request.prompt[:n])
                if slot is not None:
                    self.cache.copy(request.slot, [slot], n)

    def _graph_step(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step on the static decode path (a CUDA graph, or compiled), or None where it runs eagerly."""
        if self.graphs is None or not self.graphs.usable(len(plan.decode), len(plan.rows)):
            return None
        args = ([r.tokens[0] for r in plan.decode], [r.start for r in plan.decode],
                [r.request.slot for r in plan.decode], [r.request.adapter for r in plan.decode])  # fmt: skip
        try:
            return self.graphs.run(*args)
        except Exception as exc:  # noqa: BLE001 - compiling fails before the step runs (no C++ compiler, ...)
            if not self.graphs.compiled:
                raise
            logger.warning("torch.compile could not compile the decode step (%s); decoding eagerly", _first_line(exc))
            self.graphs = None
            return None

    def _inputs(self, plan: StepPlan) -> StepInput:
        """The step's tensors: tokens, positions and slots flat; decode rows first; LoRA groups by adapter."""
        rows = plan.rows
        tokens, positions, slots, adapters, sample = [], [], [], [], []
        chunks = []
        for i, row in enumerate(rows):
            offset, n, slot = len(tokens), len(row.tokens), row.request.slot
            tokens += row.tokens
            positions += range(row.start, row.start + n)
            slots += [slot] * n
            adapters += [row.request.adapter] * n
            if row.sample:
                sample.append(offset + n - 1)
            if i >= len(plan.decode):
                chunks.append((offset, n, slot, row.start))
        dev = self.device

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        decode_slots = [r.request.slot for r in plan.decode]
        n, m = len(decode_slots), max(decode_slots, default=-1) + 1
        dense = decode_slots == list(range(n))
        lens = [r.start + 1 for r in plan.decode]
        length, view = max(lens, default=0), None
        if not dense and m <= VIEW_SLOTS * n:
            # attention over the first m slots where they lie: a few idle slots cost less than copying every
            # row's keys and values (benchmarks/engine.py --attention-only); an idle slot attends to its first key
            row_of, slot_lens = [0] * m, [1] * m
            for i, (slot, length_i) in enumerate(zip(decode_slots, lens, strict=True)):
                row_of[slot], slot_lens[slot] = i, length_i
            view, lens = longs(row_of), slot_lens
        lora = StepAdapters.for_tokens(adapters, n, dev)

        return StepInput(
            tokens=longs(tokens), positions=longs(positions), slots=longs(slots), n_decode=n,
            decode_slots=None if dense else longs(decode_slots), decode_lens=longs(lens),
            decode_length=length, chunks=chunks, lora=lora, decode_view=view,
            sample=None if len(sample) == len(tokens) else longs(sample),
        )  # fmt: skip

    def _append(self, handle: EngineRequest, token: int) -> None:
        request = handle.request
        request.output.append(token)
        reason = None
        if token in request.eos:
            reason = "stop"
            if handle.stream is not None:
                handle.stream.end()
        else:
            if handle.stream is not None:
                handle.stream.add(token)
            if handle.stop and self._hit_stop(handle):
                reason = "stop"
        if reason is None and (len(request.output) >= request.max_new_tokens or request.length >= self.max_length):
            reason = "length"
        if reason is not None:
            self._finish(handle, reason)

    def _hit_stop(self, handle: EngineRequest) -> bool:
        text = tail_text(self.tokenizer, handle.request.output, max(len(s) for s in handle.stop) + 4)
        return any(s in text for s in handle.stop)

    def _finish(self, handle: EngineRequest, reason: str) -> None:
        request = handle.request
        with self._lock:
            self.scheduler.finish(request, reason)
            del self._handles[request]
            self._keep.pop(request, None)
        if reason not in ("cancelled", "error"):
            handle.result = finish_row(self.tokenizer, request.output, handle.tokens_in, handle.truncated,
                                       sorted(request.eos), handle.stop)  # fmt: skip
            if handle.stream is not None:
                handle.stream.flush(handle.result.text)
        handle.done.set()
        if handle.on_done is not None:
            handle.on_done(handle)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [h for h in self._handles.values() if h.cancelled and h.request.state is not State.FINISHED]
        for handle in cancelled:
            self._finish(handle, "cancelled")
