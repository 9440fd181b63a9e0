"""What a task is: its spec (a small YAML), its records, and the checks a spec passes when it is loaded.

The registries of the task modules' plug-ins live in :mod:`slmstack.evaluation.tasks`; this module imports none of
them, so the loaders of task families (:mod:`.flan_cot`, :mod:`.mmlu`) build specs and records from here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import BaseLoader, Environment, StrictUndefined, Template, TemplateError

from slmstack.config import dataclass_to_dict
from slmstack.errors import ConfigError
from slmstack.registry import Registry, did_you_mean

__all__ = ["KIND_METRICS", "PREPROCESSORS", "Doc", "HFSource", "TaskSpec", "compile_template"]

PREPROCESSORS: Registry[Any] = Registry("preprocessor")  # name -> record -> record (filled by .tasks)


@dataclass(kw_only=True)
class HFSource:
    """Where the task lives on the Hugging Face hub (used when no local file is given)."""

    path: str
    name: str | None = None
    split: str = "test"
    preprocess: str | None = field(default=None, metadata={"help": "converts a hub record to the local layout"})


@dataclass(kw_only=True)
class TaskSpec:
    r"""One evaluation task.

    Example (a user's multiple-choice task in YAML):
        name: my_task
        kind: multiple_choice
        data_file: my_task.jsonl      # fields: question, options (list), label (int)
        text: "Question: {{question}}\\nAnswer:"
        choices: options
        gold: label
    """

    name: str
    kind: Literal["multiple_choice", "loglikelihood", "generative", "perplexity"]
    data_file: str | None = field(default=None, metadata={"help": "path relative to --data-dir (or absolute)"})
    hf: HFSource | None = None
    preprocess: str | None = field(default=None, metadata={"help": "a PREPROCESSORS name applied per record"})
    text: str = field(default="{{query}}", metadata={"help": "Jinja2 template of the context"})
    choices: str | list[str] = field(default="choices", metadata={"help": "field with the choice list, or a list"})
    gold: str = field(default="gold", metadata={"help": "field with the gold index (MC) or the answer (generative)"})
    target_delimiter: str = " "
    partial: bool = field(default=False, metadata={"help": "WinoGrande-style: the choices are contexts"})
    continuation: str = field(default="continuation", metadata={"help": "field scored after each context (partial)"})
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])
    until: list[str] = field(default_factory=lambda: ["\n\n", "Question:"])
    max_new_tokens: int = 256
    answer_regex: str | None = field(default=None, metadata={"help": "strict match: lm-eval's regex filter, first"})
    flexible_regex: str = field(
        default=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", metadata={"help": "exact_match_flexible: the last match"}
    )
    gold_regex: str | None = field(default=None, metadata={"help": "extracts the gold answer from the gold field"})
    ignore_regexes: list[str] = field(
        default_factory=list, metadata={"help": "deleted from answer and gold before comparing (lm-eval)"}
    )
    ignore_case: bool = False
    text_field: str = field(default="text", metadata={"help": "perplexity: the field holding the text"})
    description: str = field(default="", metadata={"help": "Jinja2 text put before every context (lm-eval's "
                                                           "description), e.g. MMLU's subject line"})  # fmt: skip
    filter: dict[str, Any] | None = field(
        default=None, metadata={"help": "keep only records whose fields have these values, e.g. {subject: anatomy}"}
    )
    loader: str | None = field(default=None, metadata={"help": "a LOADERS name that finds the data (mmlu)"})
    tiny_size: int = field(default=100, metadata={"help": "records in --subset tiny"})
    about: str = field(default="", metadata={"help": "a note for people; never reaches the model"})
    gold_text: str | None = field(
        default=None, metadata={"help": "field with a gold intermediate text (a rationale): attribute's oracle"}
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.tiny_size < 1:
            raise ConfigError(f"task {self.name}: max_new_tokens and tiny_size must be >= 1")
        if isinstance(self.choices, list) and not self.choices:
            raise ConfigError(f"task {self.name}: choices must not be an empty list")
        if not all(isinstance(u, str) and u for u in self.until):
            raise ConfigError(f"task {self.name}: every 'until' stop string must be non-empty text, got {self.until}")
        unknown = [m for m in self.metrics if m not in KIND_METRICS[self.kind]]
        if unknown or not self.metrics:
            raise ConfigError(f"task {self.name}: metrics {unknown or self.metrics!r} cannot be reported for kind "
                              f"{self.kind}; use some of {', '.join(KIND_METRICS[self.kind])}")  # fmt: skip
        for label, template in (("text", self.text), ("description", self.description)):
            compile_template(template, f"task {self.name}: {label}")
        patterns = {"answer_regex": self.answer_regex, "flexible_regex": self.flexible_regex,
                    "gold_regex": self.gold_regex}  # fmt: skip
        patterns.update({f"ignore_regexes[{i}]": r for i, r in enumerate(self.ignore_regexes)})
        for label, pattern in patterns.items():
            if pattern is not None:
                _compile_regex(pattern, f"task {self.name}: {label}")
        for label, name in (("preprocess", self.preprocess), ("hf.preprocess", self.hf and self.hf.preprocess)):
            if name is not None and name not in PREPROCESSORS:
                hint = did_you_mean(name, list(PREPROCESSORS))
                raise ConfigError(f"task {self.name}: {label} {name!r} is not a preprocessor.{hint} "
                                  f"Known: {', '.join(PREPROCESSORS)}")  # fmt: skip

    def spec_hash(self) -> str:
        """Short hash of everything that defines the task, recorded with every result."""
        return hashlib.sha256(json.dumps(dataclass_to_dict(self), sort_keys=True).encode()).hexdigest()[:16]


# what each kind of task can report (a metric outside its kind's list is a config error, not a silent omission)
KIND_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("acc", "perplexity"),
    "generative": ("exact_match", "exact_match_flexible"),
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"),
}
# lm-eval renders its templates with Jinja2, StrictUndefined: a field the record lacks is an error, never ""
TEMPLATES = Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)


@functools.lru_cache(maxsize=1024)
def compile_template(template: str, where: str = "template") -> Template:
    """A Jinja2 template compiled once; a syntax error or an unknown filter is a :class:`ConfigError` naming it."""
    try:
        return TEMPLATES.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"{where}: the Jinja2 template does not compile ({exc.message or exc}); "
                          "fix the template (see lm-eval's task YAMLs for examples)") from None  # fmt: skip


def _compile_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"{where}: the regex {pattern!r} does not compile ({exc}); fix it") from None


@dataclass
class Doc:
    """One record and where it came from (for error messages)."""

    where: str
    data: dict[str, Any]


# Record converters, by name: a new data layout is one function.
