"""The study's arms: what each runs at test time, and what its adapters are trained on.

Every arm is a stack on the same base model (so every arm is scored the same way: the final stage's log-likelihood
of each option, after the chat template), with the same LoRA targets, learning rate, seeds, training token budget
and total rank (one adapter of rank r, or two of r/2: the same number of trainable parameters). The training
examples are stage calls, rendered as the stages render them at test time:

- ``answer``: the question -> the answer (the option's text);
- ``reason``: the question -> its gold rationale (the reason stage's role);
- ``answer|gold``: the gold rationale and the question -> the answer;
- ``answer|mix``: the same with a share (``generated_mix``) of the rationales written by the arm's own trained
  reason stage, as SCoTD (arXiv 2306.14050) and CasCoD (arXiv 2405.19842) train a step on its predecessor's output.

| arm | test time | adapters (rank) | trained on |
|---|---|---|---|
| A0 | answer directly | none | nothing (zero-shot) |
| A1 | answer directly | one (r) | ``answer`` |
| A2 | answer directly | one (r) | ``answer`` + ``reason`` (multi-task, distilling step-by-step) |
| A3 | reason, then answer | one (r), both stages | ``reason`` + ``answer|gold`` |
| S2 | reason, then answer | two (r/2 each) | reason: ``reason``; answer: ``answer|mix`` |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slmstack.stack.config import GenerationSettings, StageConfig

__all__ = ["ARMS", "ROLE_ANSWER", "ROLE_REASON", "AdapterPlan", "Arm", "stages_for"]

ROLE_REASON = "You explain, in a few sentences, the reasoning that answers a question."
ROLE_ANSWER = "You answer a question with one of its options."


def stages_for(two_stage: bool, reason_tokens: int) -> list[StageConfig]:
    """The stages of a one-stage (answer) or two-stage (reason -> answer) arm."""
    answer = StageConfig(
        name="answer", role=ROLE_ANSWER, template="{input}", generation=GenerationSettings(max_new_tokens=16)
    )
    if not two_stage:
        return [answer]
    reason = StageConfig(
        name="reason",
        role=ROLE_REASON,
        template="{input}",
        generation=GenerationSettings(max_new_tokens=reason_tokens),
    )
    return [
        reason,
        StageConfig(
            name="answer",
            role=ROLE_ANSWER,
            template="Reasoning: {reason}\n{input}",
            generation=GenerationSettings(max_new_tokens=16),
        ),
    ]


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter: its share of the arm's rank and token budget, and the kinds of examples it is trained on."""

    share: float
    data: tuple[str, ...]
    after: str | None = None  # an adapter that must be trained first (S2's answer needs its reason stage)


@dataclass(frozen=True)
class Arm:
    """An arm: one- or two-stage, its adapters, and which stage runs under which adapter."""

    name: str
    two_stage: bool
    adapters: dict[str, AdapterPlan] = field(default_factory=dict)
    stage_adapter: dict[str, str] = field(default_factory=dict)
    description: str = ""


# the names (upper case), so a plain table rather than a (lower-case) Registry
ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("A0", False, description="the base model, zero-shot"),
        Arm("A1", False, {"main": AdapterPlan(1.0, ("answer",))}, {"answer": "main"}, "one LoRA, question -> answer"),
        Arm(
            "A2",
            False,
            {"main": AdapterPlan(1.0, ("answer", "reason"))},
            {"answer": "main"},
            "one LoRA, answer + rationale multi-task; answers directly",
        ),
        Arm(
            "A3",
            True,
            {"main": AdapterPlan(1.0, ("reason", "answer|gold"))},
            {"reason": "main", "answer": "main"},
            "one LoRA, question -> rationale -> answer (both calls)",
        ),
        Arm(
            "S2",
            True,
            {"reason": AdapterPlan(0.5, ("reason",)), "answer": AdapterPlan(0.5, ("answer|mix",), "reason")},
            {"reason": "reason", "answer": "answer"},
            "two-stage stack, a LoRA per stage",
        ),
    )
}
