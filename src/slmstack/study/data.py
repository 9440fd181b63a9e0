"""The study's data: task prompts per protocol, the training pool, and each kind of training example.

Protocol 2 shows the options (``Options:`` then one ``- option`` a line) to every stage that writes text and to the
retrieve stage's query: the human rationales were written with the options in view, and a stage that never sees
them must name the answer from an open vocabulary. The answer stage, which is scored by each option's
log-likelihood, reads the question as lm-eval's tasks write it, without the list: listing the options collapses
that score for a 135M model (zero-shot ARC-Easy 0.427 to 0.253, and a protocol-2 A1 that saw them at ECQA 0.259
against 0.420; docs/study.md). The options reach the stages as the stack's declared input field ``options``. Texts
that a stage reads at test time from another stage are cut, in training, to the length that stage writes at test
time (``reason_tokens``, ``recall_tokens``), so that the answer stage trains on what it will read.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from slmstack.io import atomic_dir
from slmstack.study.arms import (
    ANSWER_TEMPLATES,
    ARMS,
    ROLE_ANSWER,
    ROLE_REASON,
    ROLE_RECALL,
    AdapterPlan,
    stages_for,
    upstream_templates,
)

__all__ = ["StudyData", "first_sentence", "mixed", "render_example", "stage_prompt", "truncate_tokens"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (a knowledge sentence from a rationale)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].replace("\n", " ")


def truncate_tokens(text: str, tokenizer: Any, n: int) -> str:
    """``text`` cut to its first ``n`` tokens, as a stage that may write ``n`` tokens would leave it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n], skip_special_tokens=True).strip()


def _values(row: dict[str, Any]) -> dict[str, str]:
    return {"input": row["context"], "facts": row.get("facts", ""), "options": row["options_text"]}


def render_example(kind: str, row: dict[str, Any], upstream: str | None = None,
                   options: bool = False) -> tuple[str, str, str]:  # fmt: skip
    """One ``(role, prompt, completion)`` example of ``kind`` for a pool row, rendered as its stage renders it.

    ``upstream`` is the text the stage reads from the stage before it (a rationale, a knowledge sentence); the
    passages come from the row's ``facts``; ``options``: the writing stages list the options (protocol 2).
    """
    values, templates = _values(row), upstream_templates(options)
    if kind == "answer":
        return ROLE_ANSWER, ANSWER_TEMPLATES[None].format(**values), row["answer"]
    if kind == "reason":
        return (
            ROLE_REASON,
            templates["reason"].format(**values),
            upstream if upstream is not None else row["rationale"],
        )
    if kind == "answer|passages":
        return ROLE_ANSWER, ANSWER_TEMPLATES["facts"].format(**values), row["answer"]
    if kind == "recall":
        return (
            ROLE_RECALL,
            templates["recall"].format(**values),
            upstream if upstream is not None else row["knowledge"],
        )
    if kind in ("answer|gold", "answer|mix"):
        return ROLE_ANSWER, ANSWER_TEMPLATES["reason"].format(**values, reason=upstream), row["answer"]
    if kind == "answer|recall":
        return ROLE_ANSWER, ANSWER_TEMPLATES["recall"].format(**values, recall=upstream), row["answer"]
    raise ValueError(f"unknown example kind {kind!r}")


def stage_prompt(stages: list[Any], name: str, row: dict[str, Any]) -> str:
    """The prompt stage ``name`` gets for a pool row: its template on the row's question, passages and options."""
    stage = next(s for s in stages if s.name == name)
    return stage.template.format(**_values(row))


def mixed(texts: list[str], share: float, seed: str) -> list[int]:
    """The seeded indices (a ``share`` of them) whose text a trained stage rewrites."""
    return sorted(random.Random(seed).sample(range(len(texts)), round(share * len(texts))))


class StudyData:
    """The study's training data, as a part of :class:`slmstack.study.run.Study` (which holds ``cfg`` and ``out``)."""

    cfg: Any
    out: Path
    data_dir: Path
    _pool: list[dict[str, Any]] | None

    # ---- data
    def pool(self) -> list[dict[str, Any]]:
        """The training questions: an even, seeded draw from each set's training split, with their contexts.

        Each row also holds its ``knowledge`` sentence (the rationale's first) and, when an arm retrieves, its
        top-k ``facts`` from the study's index with the row's own rationale excluded.
        """
        if self._pool is None:
            from slmstack.evaluation.flan_cot import flan_cot_split
            from slmstack.evaluation.harness import options_text, task_context
            from slmstack.evaluation.tasks import Doc, get_task

            per_set = self.cfg.train_questions // len(self.cfg.train_sets)
            pool = []
            for name in self.cfg.train_sets:
                train, _ = flan_cot_split(name, self.data_dir)
                chosen = random.Random(f"study/{name}").sample(train, min(per_set, len(train)))
                spec = get_task(name)
                pool += [{**r, "set": name, "context": task_context(spec, Doc(r["id"], r)),
                          "options_text": options_text(r["options"]),
                          "knowledge": first_sentence(r["rationale"])} for r in chosen]  # fmt: skip
            random.Random("study/pool").shuffle(pool)
            if self._retrieves:
                self._add_facts(pool)
            self._pool = pool
        return self._pool

    def check_data(self) -> None:
        """Read every training and corpus set once, so that missing or malformed data is named before any work."""
        from slmstack.evaluation.flan_cot import FLAN_COT, flan_cot_split, read_flan_cot

        for name in dict.fromkeys(self.cfg.train_sets + (self.cfg.corpus_sets if self._retrieves else [])):
            if name in FLAN_COT:
                flan_cot_split(name, self.data_dir)
            else:
                read_flan_cot(name, self.data_dir)

    @property
    def _retrieves(self) -> bool:
        return any(ARMS[a].retrieves for a in self.cfg.arms + self.cfg.reference)

    def _add_facts(self, pool: list[dict[str, Any]]) -> None:
        from slmstack.retrieval import format_passages, load_retriever
        from slmstack.study.retrieval import own_ids

        query = upstream_templates(self.cfg.protocol == 2)["facts"]  # as the arm's retrieve stage renders it
        found = load_retriever(self.ensure_index()).search([query.format(**_values(r)) for r in pool], self.cfg.k,
                                                           [own_ids(r) for r in pool])  # fmt: skip
        for row, passages in zip(pool, found, strict=True):
            row["facts"] = format_passages(passages)

    def ensure_index(self) -> Path:
        """The study's passage index (built once): the training rationales of the six FLAN CoT sets."""
        from slmstack.retrieval import build_index
        from slmstack.study.retrieval import build_corpus

        folder = self.out / "retrieval"
        if not (folder / "index" / "index.json").is_file():

            def write(tmp: Path) -> None:
                corpus = build_corpus(self.data_dir, tmp / "corpus.jsonl", tuple(self.cfg.corpus_sets))
                build_index(corpus, tmp / "index", show_progress=False)

            atomic_dir(folder, write)
        return folder / "index"

    def examples(self, cell: Any, plan: AdapterPlan, tokenizer: Any) -> list[tuple[str, str, str]]:
        """(role, prompt, completion) training examples for one adapter, rendered as its stages render them.

        Protocol 2 cuts every text one stage reads from another to the length that stage writes at test time.
        """
        pool = self.pool()
        cut = self.cfg.protocol == 2

        def short(text: str, n: int) -> str:
            return truncate_tokens(text, tokenizer, n) if cut else text

        out: list[tuple[str, str, str]] = []
        for kind in plan.data:
            if kind in ("reason", "answer|gold", "answer|mix"):
                texts = [short(r["rationale"], self.cfg.reason_tokens) for r in pool]
            elif kind in ("recall", "answer|recall"):
                texts = [short(r["knowledge"], self.cfg.recall_tokens) for r in pool]
            else:
                texts = [None] * len(pool)
            if kind in ("answer|mix", "answer|recall"):
                texts = self._mix(cell, "reason" if kind == "answer|mix" else "recall", texts)
            options = self.cfg.protocol == 2
            out += [render_example(kind, r, t, options) for r, t in zip(pool, texts, strict=True)]
        random.Random(f"study/{cell.id}/{'+'.join(plan.data)}").shuffle(out)
        return out

    def _mix(self, cell: Any, stage_name: str, gold: list[str]) -> list[str]:
        """Gold texts, a ``generated_mix`` share replaced by what the arm's trained ``stage_name`` stage writes."""
        from slmstack.stack.config import StackConfig
        from slmstack.stack.runtime import Stack

        pool = self.pool()
        chosen = mixed(gold, self.cfg.generated_mix, f"study/{cell.id}/mix")
        if not chosen:
            return gold
        stage = next(s for s in self._stages(cell) if s.name == stage_name)
        # the stage as it runs in the arm, its earlier stages' text given: the same prompt as at test time, and
        # the row's own rationale still excluded from its passages
        stage = replace(stage, template="{input}", adapter=str(self.adapter_dir(cell, stage_name)))
        prompts = [stage_prompt(self._stages(cell), stage_name, pool[i]) for i in chosen]
        stack = Stack(StackConfig(name=stage_name, model=self.model_for(cell), device=self.cfg.device, stages=[stage],
                                  batch_size=self.cfg.batch_size, dtype=self.cfg.dtype))  # fmt: skip
        written = stack.run_batch(prompts)
        out = list(gold)
        for i, result in zip(chosen, written, strict=True):
            out[i] = result.answer
        return out

    def model_for(self, cell: Any) -> str:
        """The cell's base model: the study's, or a reference arm's own."""
        return ARMS[cell.arm].model or self.cfg.model

    def _stages(self, cell: Any) -> list[Any]:
        index = self.out / "retrieval" / "index"
        return stages_for(ARMS[cell.arm], self.cfg.reason_tokens, self.cfg.recall_tokens, index, self.cfg.k,
                          options=self.cfg.protocol == 2)  # fmt: skip
