"""A stack of small-LM stages passing natural language to each other (FSLM, arXiv 2410.15570).

Unlike the paper, which holds one model copy per stage, every stage here shares ONE loaded base
model; a stage's specialisation is a named LoRA adapter on it. Each input runs as a chain of requests
(:mod:`slmstack.stack.chains`, the one executor), and every stage's text is kept in the trace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.engine.text import BASE_ADAPTER
from slmstack.errors import InputError
from slmstack.models import LoadedModel, load_model
from slmstack.retrieval.base import load_stage_retrievers
from slmstack.stack.adapters import attach_adapters
from slmstack.stack.backends import LocalBackend, make_backend
from slmstack.stack.chains import Chain, run_chains
from slmstack.stack.config import INPUT_FIELD, StackConfig, StageConfig, load_stack_config
from slmstack.stack.trace import StackResult, StageTrace

logger = logging.getLogger(__name__)

__all__ = ["Stack", "StackResult", "StageTrace"]


class Stack:
    """Run a :class:`StackConfig` on one shared base model.

    Example:
        >>> stack = Stack.default()
        >>> result = stack("Why is the sky blue?")
        >>> [t.stage for t in result.trace], result.answer
    """

    def __init__(self, config: StackConfig, loaded: LoadedModel | None = None, show_progress: bool = False,
                 adapter_prefix: str = "", job: str = "generate") -> None:  # fmt: skip
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
                                    max_batch=config.batch_size, job=job)  # fmt: skip

    @classmethod
    def sharing_bases(cls, configs: list[StackConfig]) -> list[Stack]:
        """Load several stacks, one base model per distinct (model, device, dtype).

        Stacks on the same base share one loaded model and one peft wrapper holding every stack's adapters
        (named ``<stack>/<stage>``), so rows of different stacks can share a forward pass
        (:mod:`slmstack.stack.chains`). Stacks with a remote ``backend`` load nothing.
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

    def generation_info(self) -> dict[str, Any]:
        """Where and in which weight format this stack generates (``run --json`` and the trace say it)."""
        if not isinstance(self.backend, LocalBackend):
            return {"engine": "remote", "backend": self.config.backend.type if self.config.backend else None}
        engine = self.backend.engine
        if engine is None:
            return {"engine": "transformers", "dtype": self.config.dtype}
        return {"engine": "slmstack", "dtype": self.config.dtype, "weights": engine.weight_formats}

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
        bar = tqdm(total=len(texts), desc="stack", unit="input", disable=not self.show_progress)
        if isinstance(self.backend, LocalBackend):
            self.backend.reserve_rows(size)  # batch_size rows a step on the engine too
        # each input is a chain that moves on as soon as its stage ends (micro-batches off the engine)
        results = [StackResult(input=t, answer="") for t in texts]
        chains = [Chain(self, chosen, v, r) for v, r in zip(values, results, strict=True)]
        run_chains(chains, on_finished=lambda chain: bar.update(1))
        bar.close()
        return results

    def input_values(self, text: str, fields: dict[str, str] | None = None) -> dict[str, str]:
        """The template values an input starts with: ``input`` and each declared field (``""`` where not given)."""
        return {INPUT_FIELD: text, **{name: str((fields or {}).get(name, "")) for name in self.config.inputs}}


def _check_inputs(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise InputError("run_batch takes a list of inputs; call the stack directly for a single input")
    if not texts:
        raise InputError("no inputs given: pass at least one question")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"input {i} is empty; every input needs some text")
