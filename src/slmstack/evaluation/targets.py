"""What can be evaluated: a model (optionally with one LoRA adapter), or a stack.

A target supplies a :class:`Scorer` and maps a task's context to what the scoring model sees. For a
stack, an item is scored by the *final* stage (its adapter and prompt) given the question and the
upstream stages' outputs for it; the upstream stages run once per item, batched and cached, not once
per choice. Generative tasks use the stack's final answer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import torch

from slmstack.engine.text import BASE_ADAPTER
from slmstack.errors import ConfigError
from slmstack.evaluation.scorer import Scorer
from slmstack.models import LoadedModel, load_model
from slmstack.stack.adapters import attach_adapters
from slmstack.stack.backends import LocalBackend, Row
from slmstack.stack.config import GenerationSettings
from slmstack.stack.runtime import Stack

__all__ = ["ENGINE_ROWS", "EvalTarget", "ModelTarget", "StackTarget", "parameter_counts"]

# On the engine, evaluation runs the upstream stages at least this many rows a step, whatever the stack's batch_size
# (a serving setting): on a CPU a decode step reads every weight once whatever its rows, so 32 rows make several
# times the tokens per second of 8, for 45 KB of cache per token and row (the default model).
ENGINE_ROWS = 32


class EvalTarget(Protocol):
    """The contract the harness needs (3 methods + identity)."""

    identity: dict[str, Any]

    def scorer(self, batch_size: int) -> Scorer:
        """The scorer for log-likelihood requests."""
        ...

    def prepare(self, contexts: list[str], delimiter: str,
                fields: list[dict[str, str]] | None = None) -> tuple[list[str], str]:  # fmt: skip
        """Map task contexts (and the choice delimiter) to what the scoring model sees.

        ``fields``: per context, more values a stack's stages may name (a multiple-choice item's ``options``).
        """
        ...

    def generate(self, contexts: list[str], until: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy answers for generative tasks."""
        ...


def parameter_counts(model: Any, active_adapters: int = 1) -> dict[str, int]:
    """Total, trainable (adapter) and per-token-active (non-zero base weights + one adapter) parameters."""
    base, adapter, nonzero = 0, 0, 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapter += p.numel()
        else:
            base += p.numel()
            nonzero += int(torch.count_nonzero(p))
    n_adapters = max(1, len(getattr(model, "peft_config", {}) or {}))
    per_adapter = adapter // n_adapters if adapter else 0
    return {"total": base + adapter, "trainable": adapter, "active_per_token": nonzero + per_adapter * active_adapters}


class ModelTarget:
    """A model reference, optionally with one peft LoRA adapter (checked against the base)."""

    def __init__(self, loaded: LoadedModel, adapter: str | Path | None = None, engine: str = "auto") -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.adapter_name = None
        if adapter is not None:
            self.model = attach_adapters(loaded.model, {"adapter": Path(adapter)}, base_ref=loaded.ref.ref)
            self.adapter_name = "adapter"
        self.backend = LocalBackend(self.model, loaded.tokenizer, engine=engine, job="score")  # lm-eval's float32
        self.identity = {"kind": "model", "model": loaded.ref.ref, "adapter": str(adapter) if adapter else None,
                         **parameter_counts(self.model)}  # fmt: skip

    @classmethod
    def from_ref(cls, ref: str, adapter: str | Path | None = None, device: str = "auto", dtype: str = "float32",
                 engine: str = "auto"):  # fmt: skip
        """Load ``ref`` (and the adapter) and wrap it."""
        return cls(load_model(ref, device=device, dtype=dtype), adapter, engine)

    def scorer(self, batch_size: int) -> Scorer:
        """Scores with the model (through the adapter, if any)."""
        return Scorer(self.model, self.loaded.tokenizer, adapter=self.adapter_name, batch_size=batch_size,
                      engine=self.backend.scoring_engine)  # fmt: skip

    def prepare(self, contexts: list[str], delimiter: str,
                fields: list[dict[str, str]] | None = None) -> tuple[list[str], str]:  # fmt: skip
        """Plain text, as lm-eval's hf model sees it (``fields`` are for stacks)."""
        return contexts, delimiter

    def generate(self, contexts: list[str], until: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy continuation of the raw context, cut at the first stop string (lm-eval's generate_until)."""
        settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=[s for s in until if s])
        adapter = self.adapter_name or BASE_ADAPTER
        self.backend.max_batch = batch_size
        out = []
        for s in range(0, len(contexts), batch_size):
            rows = [Row("", context, adapter) for context in contexts[s : s + batch_size]]
            out += [g.text for g in self.backend.generate(rows, settings, False, None, "truncate")]
        return out


class StackTarget:
    """A stack: the final stage scores, given the question and the upstream stages' outputs."""

    def __init__(self, stack: Stack) -> None:
        if stack.model is None:
            raise ConfigError(f"stack {stack.config.name!r} generates on a remote backend; evaluation scores "
                              "log-likelihoods in process: remove its backend: section to evaluate it")  # fmt: skip
        self.stack = stack
        self.final = stack.config.stages[-1]
        self._upstream: dict[str, dict[str, str]] = {}
        self.upstream_tokens = 0  # tokens in and out of the upstream stages (part of the cost)
        self.upstream_generated = 0  # tokens the upstream stages generated
        adapters = sum(1 for s in stack.config.stages if s.adapter)
        self.identity = {"kind": "stack", "stack": str(stack.config.source), "name": stack.config.name,
                         "model": stack.config.model, "stages": [s.name for s in stack.config.stages],
                         "adapters": adapters, **parameter_counts(stack.model)}  # fmt: skip

    def scorer(self, batch_size: int) -> Scorer:
        """Scores with the final stage's adapter (or the bare base)."""
        adapter = self.stack.adapter_for(self.final.name)
        peft = hasattr(self.stack.model, "peft_config")
        engine = self.stack.backend.scoring_engine if isinstance(self.stack.backend, LocalBackend) else None
        return Scorer(self.stack.model, self.stack.tokenizer, adapter=adapter if peft else None, batch_size=batch_size,
                      engine=engine)  # fmt: skip

    def _upstream_outputs(self, questions: list[str], fields: list[dict[str, str]] | None = None) -> None:
        todo = sorted({q for q in questions if q not in self._upstream})
        if not todo:
            return
        given = dict(zip(questions, fields, strict=True)) if fields else {}
        declared = {q: {k: v for k, v in self.stack.input_values(q, given.get(q)).items() if k != "input"}
                    for q in todo}  # fmt: skip
        upstream = [s.name for s in self.stack.config.stages[:-1]]
        if upstream:
            rows = max(self.stack.config.batch_size, ENGINE_ROWS) if self.stack.on_engine else None
            results = self.stack.run_batch(todo, batch_size=rows, stages=upstream, fields=[declared[q] for q in todo])
            for q, result in zip(todo, results, strict=True):
                self._upstream[q] = {**declared[q], **result.outputs}
                self.upstream_tokens += sum(t.tokens_in + t.tokens_out for t in result.trace)
                self.upstream_generated += sum(t.tokens_out for t in result.trace)
        else:
            self._upstream.update(declared)

    def prepare(self, contexts: list[str], delimiter: str,
                fields: list[dict[str, str]] | None = None) -> tuple[list[str], str]:  # fmt: skip
        """The final stage's chat-templated input; the choice follows the assistant header directly."""
        self._upstream_outputs(contexts, fields)
        full = [self.stack.model_input(self.final, {"input": q, **self._upstream[q]}) for q in contexts]
        return full, delimiter.lstrip() if self.stack.uses_chat_template else delimiter

    def generate(self, contexts: list[str], until: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """The stack's final answers, cut at the first stop string."""
        answers = [r.answer for r in self.stack.run_batch(contexts, batch_size=batch_size)]
        return [_cut(a, until) for a in answers]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def extract(regex: str | None, text: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's ``regex`` filter: the ``group_select``-th match (its first non-empty group), stripped.

    Without a regex the text itself, stripped.

    Example:
        >>> extract(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "3 apples, then 12.", group_select=-1)
        '12.'
    """
    if regex is None:
        return text.strip()
    found = re.findall(regex, text)
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def normalize_answer(text: str, ignore_regexes: list[str], ignore_case: bool) -> str:
    """lm-eval's ``exact_match`` preprocessing: delete each regex's matches in order, then lower-case."""
    for pattern in ignore_regexes:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text
