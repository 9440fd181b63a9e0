"""The study's retrieval corpus and its go/no-go check, which needs no training.

The corpus is the human rationales of the training pools of all six FLAN CoT sets (ECQA, QASC, StrategyQA and
CREAK without their held-out tests; SenseMaking and AQuA whole), one passage per row, id ``<set>-<line>``. No
held-out question's rationale is in it: the four tests are split off first, and ECQA is read without the
CommonsenseQA dev questions (:mod:`slmstack.evaluation.flan_cot`), so ``commonsenseqa_clean`` is held out too. A
training item's own row is in the corpus, and is excluded from that item's results by id (:func:`own_ids`).

The go/no-go table asks, per evaluation task, whether the top-``k`` passages of a query (the question and its
options, as a retrieve stage would send them) name the gold option more often than a distractor: if they do not,
a stage that reads them has nothing to add.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from slmstack.evaluation.flan_cot import CORPUS_ONLY, FLAN_COT, flan_cot_split, read_flan_cot
from slmstack.io import atomic_write_text

__all__ = ["build_corpus", "contains_option", "go_no_go", "own_ids"]


def build_corpus(data_dir: str | Path, out: str | Path, sets: tuple[str, ...] = FLAN_COT + CORPUS_ONLY) -> Path:
    """Write the corpus JSONL (``{"id", "text", "set"}`` per rationale) from the sets' training rows."""
    rows = []
    for name in sets:
        records = flan_cot_split(name, data_dir)[0] if name in FLAN_COT else read_flan_cot(name, data_dir)
        rows += [{"id": r["id"], "text": r["rationale"], "set": name} for r in records]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(Path(out), text)


def own_ids(record: dict[str, Any]) -> set[str]:
    """The passage ids a training item must not retrieve: its own row's rationale."""
    return {record["id"]}


def contains_option(option: str, text: str) -> bool:
    """Whether ``text`` names ``option``: its words in order, on word boundaries, ignoring case."""
    words = re.findall(r"\w+", option.lower())
    if not words:
        return False
    return re.search(r"\b" + r"\W+".join(map(re.escape, words)) + r"\b", text.lower()) is not None


def go_no_go(retriever: Any, items: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """How often the top-``k`` passages name the gold option, against the average distractor option.

    Args:
        retriever: a :class:`~slmstack.retrieval.Retriever`.
        items: ``{"query", "options", "gold"}`` per evaluation item (the query as a retrieve stage sends it).
        k: passages per query.

    Returns:
        ``{"n", "k", "gold", "distractor", "gold_only", "distractor_only", "lift"}``: the share of items whose
        passages name the gold option; the mean, over items, of the share of distractors named; the share where
        the passages name the gold and no distractor, or a distractor and not the gold; and gold / distractor.
    """
    found = retriever.search([it["query"] for it in items], k)
    gold, distractor, gold_only, distractor_only = [], [], 0, 0
    for item, passages in zip(items, found, strict=True):
        text = "\n".join(p.text for p in passages)
        named = [contains_option(o, text) for o in item["options"]]
        others = [n for i, n in enumerate(named) if i != item["gold"]]
        gold.append(float(named[item["gold"]]))
        distractor.append(sum(others) / len(others))
        gold_only += named[item["gold"]] and not any(others)
        distractor_only += not named[item["gold"]] and any(others)
    n = len(items)
    g, d = statistics.fmean(gold), statistics.fmean(distractor)
    return {"n": n, "k": k, "gold": g, "distractor": d, "gold_only": gold_only / n,
            "distractor_only": distractor_only / n, "lift": g / d if d else None}  # fmt: skip
