"""A stack of small-LM stages passing natural language to each other (FSLM, arXiv 2410.15570).

Unlike the paper, which holds one model copy per stage, every stage here shares ONE loaded base
model; a stage's specialisation is a named LoRA adapter on it. A batch of inputs goes through
each stage together, and every stage's text is kept in the trace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.engine.text import BASE_ADAPTER, GenerationCancelled
from slmstack.errors import InputError
from slmstack.models import LoadedModel, load_model
from slmstack.retrieval.base import load_stage_retrievers
from slmstack.stack.adapters import attach_adapters
from slmstack.stack.backends import LocalBackend, Row, make_backend
from slmstack.stack.chains import Chain, run_chains
from slmstack.stack.config import INPUT_FIELD, StackConfig, StageConfig, load_stack_config

logger = logging.getLogger(__name__)

__all__ = ["Stack", "StackResult", "StageCall", "StageTrace", "retrieve_stage", "run_stage_calls"]


@dataclass
class StageTrace:
    """What one stage saw and said for one input.

    ``seconds`` is the wall time of the batched stage call that produced this row (shared by the batch).
    """

    stage: str
    prompt: str
    output: str
    tokens_in: int
    tokens_out: int
    seconds: float
    adapter: str | None = None
    truncated: bool = False
    kind: str = "generate"  # or "retrieve": the output is passages from an index, and no model ran


@dataclass
class StackResult:
    """The final answer (the last stage's output) and the full trace."""

    input: str
    answer: str
    trace: list[StageTrace] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"answer": ..., "trace": [...]}`` (plus the input)."""
        return {"input": self.input, "answer": self.answer, "trace": [asdict(t) for t in self.trace]}

    @property
    def outputs(self) -> dict[str, str]:
        """Stage name -> output text."""
        return {t.stage: t.output for t in self.trace}


class Stack:
    """Run a :class:`StackConfig` on one shared base model.

    Example:
        >>> stack = Stack.default()
        >>> result = stack("Why is the sky blue?")
        >>> [t.stage for t in result.trace], result.answer
    """

    def __init__(self, config: StackConfig, loaded: LoadedModel | None = None, show_progress: bool = False,
                 adapter_prefix: str = "") -> None:  # fmt: skip
        self.config = config
        self.show_progress = show_progress
        self.retrievers = load_stage_retrievers(config)  # before the model: a missing index fails at once
        if config.backend is not None:  # a remote engine generates; nothing is loaded here
            self.loaded = self.model = self.tokenizer = None
            self._chat = config.chat_template
            self.backend: Any = make_backend(config.backend, self._chat)
            remote = set(config.backend.models)
            self._adapter_of = {s.name: (s.name if s.name in remote or s.adapter else BASE_ADAPTER)
                                for s in config.stages}  # fmt: skip
            return
        self.loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype)
        self.tokenizer = self.loaded.tokenizer
        adapters = {s.name: path for s in config.stages if (path := config.adapter_path(s)) is not None}
        named = {f"{adapter_prefix}{name}": path for name, path in adapters.items()}
        self.model = attach_adapters(self.loaded.model, named, base_ref=config.model)
        self._chat = config.chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self._adapter_of = {s.name: (f"{adapter_prefix}{s.name}" if s.name in adapters else BASE_ADAPTER)
                            for s in config.stages}  # fmt: skip
        self.backend = LocalBackend(self.model, self.tokenizer, dtype=config.dtype, engine=config.engine,
                                    max_batch=config.batch_size)  # fmt: skip

    @classmethod
    def sharing_bases(cls, configs: list[StackConfig]) -> list[Stack]:
        """Load several stacks, one base model per distinct (model, device, dtype).

        Stacks on the same base share one loaded model and one peft wrapper holding every stack's adapters
        (named ``<stack>/<stage>``), so rows of different stacks can share a forward pass
        (:func:`run_stage_calls`). Stacks with a remote ``backend`` load nothing.
        """
        stacks: list[Stack] = []
        shared: dict[tuple[str, str, str], Stack] = {}
        for config in configs:
            if config.backend is not None:
                stacks.append(cls(config))
                continue
            key = (config.model, config.device, config.dtype)
            first = shared.get(key)
            loaded = replace(first.loaded, model=first.model) if first else None
            stack = cls(config, loaded=loaded, adapter_prefix=config.name.replace(".", "_") + "/")
            for other in stacks:  # everyone on this base now uses the wrapper that holds every adapter
                if other.loaded is not None and (other.config.model, other.config.device, other.config.dtype) == key:
                    other.model, other.backend = stack.model, stack.backend
            shared[key] = stack
            stacks.append(stack)
        return stacks

    @classmethod
    def from_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, **kwargs: Any) -> Stack:
        """Load a stack YAML (the default stack when ``path`` is None) and its model."""
        return cls(load_stack_config(path, overrides), **kwargs)

    @classmethod
    def default(cls, **kwargs: Any) -> Stack:
        """The packaged 4-stage stack on the embedded SmolLM2-135M-Instruct."""
        return cls.from_config(None, **kwargs)

    def __call__(self, text: str) -> StackResult:
        """Answer one input; same as ``run_batch([text])[0]``."""
        return self.run_batch([text])[0]

    @property
    def on_engine(self) -> bool:
        """Whether this stack generates on slmstack's engine (else transformers or a remote backend)."""
        return isinstance(self.backend, LocalBackend) and self.backend.engine is not None

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts are wrapped in the tokenizer's chat template."""
        return self._chat

    def adapter_for(self, stage: str) -> str:
        """The peft adapter name a stage runs under (``"__base__"`` for the bare base model)."""
        return self._adapter_of[stage]

    def render(self, stage: StageConfig, values: dict[str, str]) -> str:
        """The stage's prompt with ``{input}`` and earlier outputs filled in."""
        return stage.template.format(**values)

    def model_input(self, stage: StageConfig, values: dict[str, str]) -> str:
        """The exact text the model sees for ``stage`` (chat template applied)."""
        return self.backend.model_input(stage.role, self.render(stage, values), self._chat)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this stack's model (an estimate for a remote backend)."""
        return self.backend.count_tokens(text)

    def run_batch(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        stages: Sequence[str] | None = None,
        fields: Sequence[dict[str, str]] | None = None,
    ) -> list[StackResult]:
        """Run every text through the stack, ``batch_size`` inputs at a time through each stage.

        Args:
            texts: user inputs; each must be a non-empty string.
            batch_size: inputs per batch (default: the config's ``batch_size``).
            stages: run only these stages' prefix of the stack (e.g. all but the last, for scoring).
            fields: per input, the values of the stack's declared ``inputs`` (a missing one is ``""``).

        Raises:
            InputError: an empty or non-string input, named by its index.
        """
        _check_inputs(texts)
        size = batch_size or self.config.batch_size
        chosen = [s for s in self.config.stages if stages is None or s.name in stages]
        values = [self.input_values(t, fields[i] if fields else None) for i, t in enumerate(texts)]
        results: list[StackResult] = []
        bar = tqdm(total=len(texts), desc="stack", unit="input", disable=not self.show_progress)
        if isinstance(self.backend, LocalBackend):
            self.backend.reserve_rows(size)  # batch_size rows a step on the engine too
        if self.on_engine:  # continuous: each input moves on as soon as its stage ends
            results = [StackResult(input=t, answer="") for t in texts]
            chains = [Chain(self, chosen, v, r) for v, r in zip(values, results, strict=True)]
            run_chains(chains, on_finished=lambda chain: bar.update(1))
            bar.close()
            return results
        for start in range(0, len(texts), size):
            results.extend(self._run_chunk(values[start : start + size], chosen))
            bar.update(min(size, len(texts) - start))
        bar.close()
        return results

    def input_values(self, text: str, fields: dict[str, str] | None = None) -> dict[str, str]:
        """The template values an input starts with: ``input`` and each declared field (``""`` where not given)."""
        return {INPUT_FIELD: text, **{name: str((fields or {}).get(name, "")) for name in self.config.inputs}}

    def _run_chunk(self, values: list[dict[str, str]], stages: list[StageConfig]) -> list[StackResult]:
        results = [StackResult(input=v[INPUT_FIELD], answer="") for v in values]
        for stage in stages:
            self.run_stage(stage, values, results)
        return results

    def run_stage(self, stage: StageConfig, values: list[dict[str, str]], results: list[StackResult]) -> None:
        """Run one stage on a batch whose earlier stages have run; appends to ``values`` and ``results``.

        ``values`` holds each row's input and earlier outputs (the template fields).
        """
        run_stage_calls([StageCall(self, stage, v, r) for v, r in zip(values, results, strict=True)])


@dataclass
class StageCall:
    """One row's next stage: its stack, the stage, the row's template values and its result so far.

    ``overrides`` replaces fields of the stage's :class:`GenerationSettings` for this row (serving's per-request
    ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop``).
    """

    stack: Stack
    stage: StageConfig
    values: dict[str, str]
    result: StackResult
    overrides: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # run under this adapter instead of the stage's own (``"__base__"``: none)


def run_stage_calls(calls: list[StageCall], on_text: Callable[[int, str], None] | None = None,
                    cancel: threading.Event | None = None) -> None:  # fmt: skip
    """Run one stage for each call; calls may come from different stacks.

    Calls on the same backend (for in-process stacks: the same loaded base) with the same decoding
    settings run as one batch, each row under its own adapter. Appends each row's output to its
    ``values`` and trace. ``on_text(call_index, delta)`` streams the text as it is decoded. Setting ``cancel``
    stops generation at the next token with :class:`GenerationCancelled`.
    """
    searches: dict[tuple[int, str], list[int]] = {}  # retrieve stages run no model: one search per stack and stage
    for i, call in enumerate(calls):
        if call.stage.kind == "retrieve":
            searches.setdefault((id(call.stack), call.stage.name), []).append(i)
    for members in searches.values():
        first = calls[members[0]]
        for i, trace in zip(members, retrieve_stage(first.stack, first.stage, [calls[i].values for i in members]),
                            strict=True):  # fmt: skip
            calls[i].result.trace.append(trace)
            calls[i].result.answer = trace.output
    groups: list[tuple[Any, tuple, list[int]]] = []
    for i, call in enumerate(calls):
        if call.stage.kind == "retrieve":
            continue
        settings = replace(call.stage.generation, **call.overrides) if call.overrides else call.stage.generation
        cfg = call.stack.config
        key = (call.stack._chat, settings, cfg.max_input_tokens, cfg.on_overflow)
        group = next((g for g in groups if g[0] is call.stack.backend and g[1] == key), None)
        if group is None:
            groups.append(group := (call.stack.backend, key, []))
        group[2].append(i)
    for backend, (chat, settings, max_input, overflow), members in groups:
        rows = [Row(calls[i].stage.role, calls[i].stack.render(calls[i].stage, calls[i].values),
                    calls[i].adapter or calls[i].stack.adapter_for(calls[i].stage.name)) for i in members]  # fmt: skip
        stream = None if on_text is None else (lambda row, delta, m=members: on_text(m[row], delta))
        start = time.perf_counter()
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation was cancelled")
        outs = backend.generate(rows, settings, chat, max_input, overflow, stream, cancel)
        seconds = time.perf_counter() - start
        logger.debug("%d rows of %d stages in %.2fs", len(rows), len({calls[i].stage.name for i in members}), seconds)
        for i, row, out in zip(members, rows, outs, strict=True):
            call = calls[i]
            call.values[call.stage.name] = out.text
            adapter = None if row.adapter == BASE_ADAPTER else row.adapter
            call.result.trace.append(StageTrace(call.stage.name, row.prompt, out.text, out.tokens_in, out.tokens_out,
                                                round(seconds, 4), adapter, out.truncated))  # fmt: skip
            call.result.answer = out.text


def retrieve_stage(stack: Stack, stage: StageConfig, values: list[dict[str, str]]) -> list[StageTrace]:
    """Run a ``retrieve`` stage for a batch of rows: one search, each row's passages as its output and trace.

    The query is the stage's rendered template; the stage's ``exclude`` ids are never returned (per-query
    exclusions, such as an item's own passage, go through the retriever's ``search`` directly).
    """
    from slmstack.retrieval import format_passages

    start = time.perf_counter()
    queries = [stack.render(stage, v) for v in values]
    exclude = [set(stage.exclude or ()) for _ in values]
    found = stack.retrievers[stage.name].search(queries, stage.k, exclude)
    seconds = round(time.perf_counter() - start, 4)
    traces = []
    for query, row_values, passages in zip(queries, values, found, strict=True):
        text = format_passages(passages)
        row_values[stage.name] = text
        traces.append(StageTrace(stage.name, query, text, 0, 0, seconds, None, False, "retrieve"))
    return traces


def _check_inputs(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise InputError("run_batch takes a list of inputs; call the stack directly for a single input")
    if not texts:
        raise InputError("no inputs given: pass at least one question")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"input {i} is empty; every input needs some text")
