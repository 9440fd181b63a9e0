"""A stack of small-LM stages passing natural language to each other (FSLM, arXiv 2410.15570).

Unlike the paper, which holds one model copy per stage, every stage here shares ONE loaded base
model; a stage's specialisation is a named LoRA adapter on it. A batch of inputs goes through
each stage together, and every stage's text is kept in the trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.errors import InputError
from slmstack.models import LoadedModel, load_model
from slmstack.stack.adapters import attach_adapters
from slmstack.stack.config import INPUT_FIELD, StackConfig, StageConfig, load_stack_config
from slmstack.stack.generation import BASE_ADAPTER, format_prompt, generate_batch

logger = logging.getLogger(__name__)

__all__ = ["Stack", "StackResult", "StageTrace"]


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

    def __init__(self, config: StackConfig, loaded: LoadedModel | None = None, show_progress: bool = False) -> None:
        self.config = config
        self.show_progress = show_progress
        self.loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype)
        self.tokenizer = self.loaded.tokenizer
        adapters = {s.name: path for s in config.stages if (path := config.adapter_path(s)) is not None}
        self.model = attach_adapters(self.loaded.model, adapters, base_ref=config.model)
        self._chat = config.chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self._adapter_of = {s.name: (s.name if s.name in adapters else BASE_ADAPTER) for s in config.stages}

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
        return format_prompt(self.tokenizer, stage.role, self.render(stage, values), self.config.chat_template)

    def run_batch(
        self, texts: Sequence[str], batch_size: int | None = None, stages: Sequence[str] | None = None
    ) -> list[StackResult]:
        """Run every text through the stack, ``batch_size`` inputs at a time through each stage.

        Args:
            texts: user inputs; each must be a non-empty string.
            batch_size: inputs per batch (default: the config's ``batch_size``).
            stages: run only these stages' prefix of the stack (e.g. all but the last, for scoring).

        Raises:
            InputError: an empty or non-string input, named by its index.
        """
        _check_inputs(texts)
        size = batch_size or self.config.batch_size
        chosen = [s for s in self.config.stages if stages is None or s.name in stages]
        results: list[StackResult] = []
        bar = tqdm(total=len(texts), desc="stack", unit="input", disable=not self.show_progress)
        for start in range(0, len(texts), size):
            results.extend(self._run_chunk(list(texts[start : start + size]), chosen))
            bar.update(min(size, len(texts) - start))
        bar.close()
        return results

    def _run_chunk(self, texts: list[str], stages: list[StageConfig]) -> list[StackResult]:
        values = [{INPUT_FIELD: t} for t in texts]
        results = [StackResult(input=t, answer="") for t in texts]
        for stage in stages:
            self.run_stage(stage, values, results)
        return results

    def run_stage(self, stage: StageConfig, values: list[dict[str, str]], results: list[StackResult]) -> None:
        """Run one stage on a batch whose earlier stages have run; appends to ``values`` and ``results``.

        ``values`` holds each row's input and earlier outputs (the template fields). Serving calls this
        stage by stage, to report each stage as soon as it finishes.
        """
        prompts = [self.render(stage, v) for v in values]
        inputs = [format_prompt(self.tokenizer, stage.role, p, self.config.chat_template) for p in prompts]
        adapter = self._adapter_of[stage.name]
        start = time.perf_counter()
        outs = generate_batch(
            self.model, self.tokenizer, inputs, stage.generation,
            adapter_names=[adapter] * len(inputs), max_input_tokens=self.config.max_input_tokens,
            on_overflow=self.config.on_overflow, chat=self._chat,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        logger.debug("stage %s: %d inputs in %.2fs", stage.name, len(values), seconds)
        for value, result, prompt, out in zip(values, results, prompts, outs, strict=True):
            value[stage.name] = out.text
            result.trace.append(StageTrace(
                stage.name, prompt, out.text, out.tokens_in, out.tokens_out, round(seconds, 4),
                None if adapter == BASE_ADAPTER else adapter, out.truncated,
            ))  # fmt: skip
            result.answer = out.text


def _check_inputs(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise InputError("run_batch takes a list of inputs; call the stack directly for a single input")
    if not texts:
        raise InputError("no inputs given: pass at least one question")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"input {i} is empty; every input needs some text")
