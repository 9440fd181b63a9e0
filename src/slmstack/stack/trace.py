"""What a stack run leaves behind: each stage's prompt and text (:class:`StageTrace`), and the answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StackResult", "StageTrace"]


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
    # the final stage's prompt and generated token ids (EOS left out), where it ran on the engine
    token_ids: tuple[list[int], list[int]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"answer": ..., "trace": [...]}`` (plus the input)."""
        return {"input": self.input, "answer": self.answer, "trace": [asdict(t) for t in self.trace]}

    @property
    def outputs(self) -> dict[str, str]:
        """Stage name -> output text."""
        return {t.stage: t.output for t in self.trace}
