"""The study's data: task prompts per protocol, the training pool, and each kind of training example.

Protocol 2's prompts show the options (``Options:`` then one ``- option`` a line, before ``Answer:``) to every stage:
the human rationales were written with the options in view, and a stage that never sees them must name the answer
from an open vocabulary. Texts that a stage reads at test time from another stage are cut, in training, to the
length that stage writes at test time (``reason_tokens``, ``recall_tokens``), so that the answer stage trains on
what it will read.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Any

from slmstack.study.arms import ANSWER_TEMPLATES, RECALL_TEMPLATE, ROLE_ANSWER, ROLE_REASON, ROLE_RECALL

__all__ = ["first_sentence", "mixed", "render_example", "stage_prompt", "task_spec", "truncate_tokens", "with_options"]

OPTIONS = "Options:\n{{options_text}}\n"


def with_options(spec: Any) -> Any:
    """The task with its options listed before ``Answer:`` (or at the end of its text)."""
    text = spec.text
    at = text.rfind("Answer:")
    text = text[:at] + OPTIONS + text[at:] if at >= 0 else f"{text}\n{OPTIONS.rstrip()}"
    return replace(spec, text=text)


def task_spec(name: str, protocol: int) -> Any:
    """A study task as the protocol prompts it: protocol 2 shows the options, protocol 1 does not."""
    from slmstack.evaluation.tasks import get_task

    spec = get_task(name)
    return with_options(spec) if protocol == 2 and spec.kind == "multiple_choice" else spec


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (a knowledge sentence from a rationale)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].replace("\n", " ")


def truncate_tokens(text: str, tokenizer: Any, n: int) -> str:
    """``text`` cut to its first ``n`` tokens, as a stage that may write ``n`` tokens would leave it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n], skip_special_tokens=True).strip()


def render_example(kind: str, row: dict[str, Any], upstream: str | None = None) -> tuple[str, str, str]:
    """One ``(role, prompt, completion)`` example of ``kind`` for a pool row, rendered as its stage renders it.

    ``upstream`` is the text the stage reads from the stage before it (a rationale, a knowledge sentence); the
    passages come from the row's ``facts``.
    """
    values = {"input": row["context"], "facts": row.get("facts", "")}
    if kind == "answer":
        return ROLE_ANSWER, ANSWER_TEMPLATES[None].format(**values), row["answer"]
    if kind == "reason":
        return ROLE_REASON, row["context"], upstream if upstream is not None else row["rationale"]
    if kind == "answer|passages":
        return ROLE_ANSWER, ANSWER_TEMPLATES["facts"].format(**values), row["answer"]
    if kind == "recall":
        return ROLE_RECALL, RECALL_TEMPLATE.format(**values), upstream if upstream is not None else row["knowledge"]
    if kind in ("answer|gold", "answer|mix"):
        return ROLE_ANSWER, ANSWER_TEMPLATES["reason"].format(**values, reason=upstream), row["answer"]
    if kind == "answer|recall":
        return ROLE_ANSWER, ANSWER_TEMPLATES["recall"].format(**values, recall=upstream), row["answer"]
    raise ValueError(f"unknown example kind {kind!r}")


def stage_prompt(stages: list[Any], name: str, row: dict[str, Any]) -> str:
    """The prompt stage ``name`` gets for a pool row: its template on the row's question and passages."""
    stage = next(s for s in stages if s.name == name)
    return stage.template.format(input=row["context"], facts=row.get("facts", ""))


def mixed(texts: list[str], share: float, seed: str) -> list[int]:
    """The seeded indices (a ``share`` of them) whose text a trained stage rewrites."""
    return sorted(random.Random(seed).sample(range(len(texts)), round(share * len(texts))))
