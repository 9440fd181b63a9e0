"""The study's retrieval corpus (no held-out rationale in it) and the go/no-go counts, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.retrieval import Passage
from slmstack.study.retrieval import build_corpus, contains_option, go_no_go, own_ids


def _tsv(root: Path, name: str, lines: list[str]) -> None:
    (root / "flan_cot").mkdir(parents=True, exist_ok=True)
    (root / "flan_cot" / f"{name}_train.tsv").write_text("\n".join(lines) + "\n")


def test_the_corpus_holds_training_rationales_only(tmp_path: Path) -> None:
    # Prepare: 10 StrategyQA rows (5 held out: min(400, 10 // 2)) and 2 AQuA rows (corpus only, read whole)
    _tsv(
        tmp_path,
        "strategyqa",
        [f"Is {i} even?\t{'yes' if i % 2 == 0 else 'no'}\tBecause {i} mod 2." for i in range(10)],
    )
    _tsv(
        tmp_path,
        "aqua",
        ["1 + 1?\\nOptions:\\n(A) 2\\n(B) 3\t(A)\tOne plus one.", "2 + 2?\\nOptions:\\n(A) 4\t(A)\tTwo."],
    )
    from slmstack.evaluation.flan_cot import flan_cot_split

    train, test = flan_cot_split("strategyqa", tmp_path)
    # Execute
    out = build_corpus(tmp_path, tmp_path / "corpus.jsonl", sets=("strategyqa", "aqua"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # Assert: the 5 training rationales and both AQuA ones, none of the 5 held-out items'
    assert len(rows) == 5 + 2 and {r["set"] for r in rows} == {"strategyqa", "aqua"}
    assert {r["id"] for r in rows} & {t["id"] for t in test} == set()
    assert {r["id"] for r in rows if r["set"] == "strategyqa"} == {t["id"] for t in train}
    assert own_ids(train[0]) == {train[0]["id"]}


@pytest.mark.parametrize(
    ("option", "text", "named"),
    [("bank", "Money is kept in a Bank.", True), ("bank", "the riverbank", False),
     ("fast food", "Fast   food is quick.", True), ("food fast", "fast food", False), ("?!", "anything", False)],
)  # fmt: skip
def test_an_option_is_named_by_its_words_on_word_boundaries(option: str, text: str, named: bool) -> None:
    assert contains_option(option, text) is named


def test_go_no_go_counts_by_hand() -> None:
    class Fixed:  # a retriever whose passages are given per query
        def search(self, queries, k, exclude=None):
            texts = {"q1": ["a bank holds money"], "q2": ["a shop and a park"], "q3": ["nothing here"]}
            return [[Passage(str(i), t, 1.0) for i, t in enumerate(texts[q][:k])] for q in queries]

    items = [{"query": "q1", "options": ["bank", "park", "shop"], "gold": 0},  # gold named only
             {"query": "q2", "options": ["bank", "park", "shop"], "gold": 0},  # both distractors named
             {"query": "q3", "options": ["bank", "park"], "gold": 1}]  # nothing named  # fmt: skip
    r = go_no_go(Fixed(), items, k=3)
    assert r["gold"] == pytest.approx(1 / 3)  # 1 of 3 items
    assert r["distractor"] == pytest.approx((0 + 1 + 0) / 3)  # per item: 0/2, 2/2, 0/1
    assert (r["gold_only"], r["distractor_only"], r["lift"]) == pytest.approx((1 / 3, 1 / 3, 1.0))
