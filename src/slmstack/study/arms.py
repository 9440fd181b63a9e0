"""The study's arms: what each runs at test time, and what its adapters are trained on.

Every arm is a stack on the same base model (so every arm is scored the same way: the final stage's log-likelihood
of each option, after the chat template), with the same LoRA targets, learning rate, seeds and total rank (one
adapter of rank r, or two of r/2: the same number of trainable parameters). Under protocol 2 every adapter trains
for the same number of epochs over the same training questions, so every answer adapter sees the same number of
answer examples. The training examples are stage calls, rendered as the stages render them at test time:

- ``answer``: the question -> the answer (the option's text);
- ``reason``: the question -> its gold rationale (the reason stage's role);
- ``answer|gold``: the gold rationale and the question -> the answer;
- ``answer|mix``: the same with a share (``generated_mix``) of the rationales written by the arm's own trained
  reason stage, as SCoTD (arXiv 2306.14050) and CasCoD (arXiv 2405.19842) train a step on its predecessor's output;
- ``answer|passages``: the top-k retrieved passages (the item's own rationale excluded) and the question -> the
  answer;
- ``recall``: the passages and the question -> one knowledge sentence (the gold rationale's first sentence);
- ``answer|recall``: the knowledge sentence and the question -> the answer, a share of the sentences written by
  the arm's own trained recall stage (as ``answer|mix``).

| arm | test time | adapters (rank) | trained on |
|---|---|---|---|
| A0 | answer directly | none | nothing (zero-shot) |
| A1 | answer directly | one (r) | ``answer`` |
| A2 | answer directly | one (r) | ``answer`` + ``reason`` (multi-task, distilling step-by-step) |
| A3 | reason, then answer | one (r), both stages | ``reason`` + ``answer|gold`` |
| S2 | reason, then answer | two (r/2 each) | reason: ``reason``; answer: ``answer|mix`` |
| R1 | retrieve, then answer | one (r) | ``answer|passages``: the single model with the stack's information |
| RS2 | retrieve, recall, answer | two (r/2 each) | recall: ``recall``; answer: ``answer|recall`` |
| G1 | answer directly, **on Gemma 3 270M** | one (r) | ``answer`` (A1 on a base twice the size: the reference) |

G1 is a *reference* arm (``reference:`` in the study config): another base, so not one of the stack's arms; it
answers whether a 135M stack reaches a 270M single model trained on the same data (issue #34).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmstack.stack.config import GenerationSettings, StageConfig

__all__ = ["ANSWER_TEMPLATES", "ARMS", "ROLE_ANSWER", "ROLE_REASON", "ROLE_RECALL", "AdapterPlan", "Arm",
           "stages_for", "upstream_templates"]  # fmt: skip

ROLE_REASON = "You explain, in a few sentences, the reasoning that answers a question."
ROLE_ANSWER = "You answer a question with one of its options."
ROLE_RECALL = "You state, in one sentence, the fact from the passages that answers the question."
# protocol 2: the stages that write text (and the retrieve stage's query) see the options; the answer stage, which
# is scored by the log-likelihood of each option, does not: listed options collapse that score at 135M (zero-shot
# ARC-Easy 0.427 -> 0.253, measured; docs/study.md)
OPTIONS_BEFORE = "Options:\n{options}\n"
QUERY_TEMPLATE = "{input}\n{options}"
# the answer stage's template, by the stage before it (none: the question alone)
ANSWER_TEMPLATES = {None: "{input}", "reason": "Reasoning: {reason}\n{input}", "facts": "Passages:\n{facts}\n{input}",
                    "recall": "Knowledge: {recall}\n{input}"}  # fmt: skip


def upstream_templates(options: bool) -> dict[str, str]:
    """The templates of the stages before the answer: with the options listed (protocol 2) or not."""
    lead = OPTIONS_BEFORE if options else ""
    return {"facts": QUERY_TEMPLATE if options else "{input}", "reason": lead + "{input}",
            "recall": "Passages:\n{facts}\n" + lead + "{input}"}  # fmt: skip


def stages_for(arm: Arm, reason_tokens: int, recall_tokens: int = 32, index: Path | None = None,
               k: int = 3, options: bool = False) -> list[StageConfig]:  # fmt: skip
    """The arm's stages, from its kinds: ``facts`` (retrieve), ``reason``, ``recall``, then ``answer``."""
    stages: list[StageConfig] = []
    templates = upstream_templates(options)
    for kind in arm.stages[:-1]:
        if kind == "facts":
            stages.append(StageConfig(name="facts", kind="retrieve", index=str(index), k=k, template=templates[kind]))
        elif kind == "reason":
            settings = GenerationSettings(max_new_tokens=reason_tokens)
            stages.append(StageConfig(name="reason", role=ROLE_REASON, template=templates[kind], generation=settings))
        else:  # recall: one sentence
            settings = GenerationSettings(max_new_tokens=recall_tokens, stop=["\n"])
            stages.append(StageConfig(name="recall", role=ROLE_RECALL, template=templates[kind], generation=settings))
    last = arm.stages[-2] if len(arm.stages) > 1 else None
    stages.append(StageConfig(name="answer", role=ROLE_ANSWER, template=ANSWER_TEMPLATES[last],
                              generation=GenerationSettings(max_new_tokens=16)))  # fmt: skip
    return stages


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter: its share of the arm's rank and token budget, and the kinds of examples it is trained on."""

    share: float
    data: tuple[str, ...]
    after: str | None = None  # an adapter that must be trained first (S2's answer needs its reason stage)


@dataclass(frozen=True)
class Arm:
    """An arm: its stages (by name, the last one answers), its adapters, and which stage runs under which."""

    name: str
    stages: tuple[str, ...]
    adapters: dict[str, AdapterPlan] = field(default_factory=dict)
    stage_adapter: dict[str, str] = field(default_factory=dict)
    description: str = ""
    model: str | None = None  # another base model (a reference arm); None: the study's

    @property
    def retrieves(self) -> bool:
        """Whether the arm's first stage queries the study's passage index."""
        return "facts" in self.stages


# the names (upper case), so a plain table rather than a (lower-case) Registry
ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("A0", ("answer",), description="the base model, zero-shot"),
        Arm(
            "A1",
            ("answer",),
            {"main": AdapterPlan(1.0, ("answer",))},
            {"answer": "main"},
            "one LoRA, question -> answer",
        ),  # fmt: skip
        Arm(
            "A2",
            ("answer",),
            {"main": AdapterPlan(1.0, ("answer", "reason"))},
            {"answer": "main"},
            "one LoRA, answer + rationale multi-task; answers directly",
        ),
        Arm(
            "A3",
            ("reason", "answer"),
            {"main": AdapterPlan(1.0, ("reason", "answer|gold"))},
            {"reason": "main", "answer": "main"},
            "one LoRA, question -> rationale -> answer (both calls)",
        ),
        Arm(
            "S2",
            ("reason", "answer"),
            {"reason": AdapterPlan(0.5, ("reason",)), "answer": AdapterPlan(0.5, ("answer|mix",), "reason")},
            {"reason": "reason", "answer": "answer"},
            "two-stage stack, a LoRA per stage",
        ),
        Arm(
            "R1",
            ("facts", "answer"),
            {"main": AdapterPlan(1.0, ("answer|passages",))},
            {"answer": "main"},
            "one LoRA that reads the retrieved passages and answers: the single model with the stack's information",
        ),
        Arm(
            "RS2",
            ("facts", "recall", "answer"),
            {"recall": AdapterPlan(0.5, ("recall",)), "answer": AdapterPlan(0.5, ("answer|recall",), "recall")},
            {"recall": "recall", "answer": "answer"},
            "retrieve -> a recall stage that writes one knowledge sentence -> answer, a LoRA per model stage",
        ),
        Arm(
            "G1",
            ("answer",),
            {"main": AdapterPlan(1.0, ("answer",))},
            {"answer": "main"},
            "the reference: Gemma 3 270M with one LoRA, question -> answer (A1 on a base twice the size)",
            model="gemma3-270m",
        ),
    )
}
