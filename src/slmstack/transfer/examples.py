"""A transfer task and its examples: the input without instruction, the instruction wordings, the targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmstack.errors import ConfigError

__all__ = ["Example", "Task", "Wording"]


@dataclass(frozen=True)
class Wording:
    """One instruction wording: text placed before and after the instruction-free input."""

    prefix: str = ""
    suffix: str = ""

    def apply(self, text: str) -> str:
        """The input with this instruction around it (a newline between them where neither brings whitespace)."""
        before = self.prefix + ("\n" if self.prefix and not self.prefix[-1].isspace() else "")
        after = ("\n" if self.suffix and not self.suffix[0].isspace() else "") + self.suffix
        return f"{before}{text}{after}"


@dataclass
class Example:
    """One example: the input without instruction, the target(s), and the original rendering if there is one."""

    input: str
    targets: list[str]
    original: str | None = None  # e.g. the PromptSource rendering, with its instruction where it was

    @property
    def target(self) -> str:
        """The first (training) target."""
        return self.targets[0]


@dataclass
class Task:
    """A task: its category (domain), type, metric, label set, instruction wordings and examples."""

    name: str
    category: str
    kind: Literal["classification", "generation"]
    metric: Literal["accuracy", "rouge_l"]
    examples: list[Example]
    wordings: list[Wording] = field(default_factory=list)
    labels: list[str] | None = None
    instruction_split: bool = True  # False: the input could not be separated from the instruction

    def __post_init__(self) -> None:
        if self.metric == "accuracy" and not (self.labels and len(self.labels) >= 2):
            raise ConfigError(f"task {self.name}: accuracy needs a label set of at least 2 labels; "
                              "give labels, or use metric rouge_l")  # fmt: skip
        if not self.examples:
            raise ConfigError(f"task {self.name}: no examples")

    def render(self, example: Example, wording: int | None) -> str:
        """The prompt: the input alone (``None``), or with instruction wording ``wording``.

        Wording 0 of a task with original renderings is that rendering itself.
        """
        if wording is None:
            return example.input
        if wording == 0 and example.original is not None:
            return example.original
        return self.wordings[wording].apply(example.input)

    @property
    def n_wordings(self) -> int:
        """How many instruction wordings the task has (the original rendering counts as one)."""
        return max(len(self.wordings), 1 if self.examples[0].original is not None else 0)
