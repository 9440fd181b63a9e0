"""FLAN CoT tasks: parsing, seeded held-out splits without duplicates, and ECQA kept apart from CommonsenseQA dev."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.errors import InputError
from slmstack.evaluation.flan_cot import FLAN_COT, HELDOUT, flan_cot_split, normalise, read_flan_cot
from slmstack.evaluation.tasks import get_task, load_docs
from tests.conftest import SHARED_DATA

DATA = SHARED_DATA
real = pytest.mark.needs_data("flan_cot")


def _tsv(root: Path, name: str, lines: list[str]) -> Path:
    (root / "flan_cot").mkdir(parents=True, exist_ok=True)
    (root / "flan_cot" / f"{name}_train.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_each_layout_parses_to_options_gold_and_rationale(tmp_path: Path) -> None:
    _tsv(
        tmp_path, "qasc", ["What helps?\\nOptions:\\n- (A) sun\\n- (B) rain\\n- (C) rock\t(B)\tRain helps.\\nIt does."]
    )
    _tsv(tmp_path, "strategyqa", ["Is ice cold?\tyes\tIce is frozen water."])
    _tsv(tmp_path, "creak", ['Claim: "X."\\nIs the claim true?\\nOptions:\\n- yes\\n- no\tno\tIt is not.'])
    (tmp_path / "commonsenseqa").mkdir()
    (tmp_path / "commonsenseqa" / "dev_rand_split.jsonl").write_text("")
    _tsv(tmp_path, "ecqa", ["Where is a pan?\\nOptions:\\n- kitchen\\n- moon\tkitchen\tPans are in kitchens."])
    assert read_flan_cot("qasc", tmp_path)[0] == {"question": "What helps?", "options": ["sun", "rain", "rock"],
                                                  "gold": 1, "answer": "rain", "rationale": "Rain helps.\nIt does.",
                                                  "id": "qasc-1"}  # fmt: skip
    assert read_flan_cot("strategyqa", tmp_path)[0]["options"] == ["yes", "no"]
    creak = read_flan_cot("creak", tmp_path)[0]
    assert creak["question"] == 'Claim: "X."\nIs the claim true?' and creak["gold"] == 1
    assert read_flan_cot("ecqa", tmp_path)[0]["options"] == ["kitchen", "moon"]


def test_the_corpus_only_sets_parse_too(tmp_path: Path) -> None:
    _tsv(tmp_path, "aqua", ["What is 2 + 2?\\nOptions:\\n(A)  3\\n(B) 4\t(B)\t2 + 2 = 4"])  # AQuA: no "- ", 2 spaces
    line = 'Which is odd?\\nOptions:\\n- Sentence A: "He drinks apple."\\n- Sentence B: "He drinks milk."\\n'
    _tsv(tmp_path, "sensemaking", [line + "\tSentence A\tAn apple is not drunk."])
    aqua, sense = read_flan_cot("aqua", tmp_path)[0], read_flan_cot("sensemaking", tmp_path)[0]
    assert (aqua["options"], aqua["answer"]) == (["3", "4"], "4")
    assert sense["answer"] == 'Sentence A: "He drinks apple."' and sense["gold"] == 0


def test_yes_no_sets_report_acc_only_and_every_mc_template_can_list_the_options(tmp_path: Path) -> None:
    from slmstack.evaluation.harness import task_context
    from slmstack.evaluation.tasks import Doc, TaskSpec

    # acc_norm divides by the answer's characters: "yes" 3, "no" 2, so it would favour an answer
    assert get_task("strategyqa").metrics == ["acc"] and get_task("creak").metrics == ["acc"]
    assert get_task("ecqa").metrics == ["acc", "acc_norm"]
    spec = TaskSpec(name="t", kind="multiple_choice", text="Q: {{question}}\nOptions:\n{{options_text}}\nA:",
                    choices="options")  # fmt: skip
    doc = Doc("x", {"question": "Where?", "options": ["kitchen", "moon"], "gold": 0})
    assert task_context(spec, doc) == "Q: Where?\nOptions:\n- kitchen\n- moon\nA:"


def test_a_bad_line_and_a_missing_file_are_named(tmp_path: Path) -> None:
    _tsv(tmp_path, "strategyqa", ["Is ice cold?\tyes\tIce is cold.", "only two\tfields"])
    with pytest.raises(InputError, match=r"strategyqa_train.tsv:2: a strategyqa line needs three"):
        read_flan_cot("strategyqa", tmp_path)
    with pytest.raises(InputError, match="Put FLAN v2's cot_data/qasc_train.tsv at"):
        read_flan_cot("qasc", tmp_path)


@real
@pytest.mark.parametrize("name", FLAN_COT)
def test_held_out_splits_are_seeded_disjoint_and_without_duplicates(name: str) -> None:
    train, test = flan_cot_split(name, DATA)
    assert len(test) == HELDOUT[name] and len(train) > len(test) // 2
    keys = [normalise(r["question"]) for r in train + test]
    assert len(keys) == len(set(keys))  # no question twice, so none on both sides
    assert (train, test) == flan_cot_split(name, DATA)  # the same split every time
    assert all(r["rationale"] and 0 <= r["gold"] < len(r["options"]) for r in test)


@real
def test_ecqa_holds_no_commonsenseqa_dev_question_and_the_clean_test_is_all_of_dev() -> None:
    dev = [json.loads(line) for line in (DATA / "commonsenseqa/dev_rand_split.jsonl").read_text().splitlines()]
    dev_questions = {normalise(r["question"]["stem"]) for r in dev}
    raw = (DATA / "flan_cot/ecqa_train.tsv").read_text().splitlines()
    overlap = {normalise(line.split("\t")[0].split("\\nOptions:")[0]) for line in raw} & dev_questions
    assert len(overlap) >= 723  # the SOURCE.txt's count, word for word
    train, test = flan_cot_split("ecqa", DATA)
    assert not {normalise(r["question"]) for r in train + test} & dev_questions
    clean = load_docs(get_task("commonsenseqa_clean"), DATA)
    assert len(clean) == len(dev) == 1221
    assert clean[0].data["options"][clean[0].data["gold"]] == clean[0].data["answer"]


@real
def test_the_built_in_tasks_read_the_held_out_split() -> None:
    docs = load_docs(get_task("qasc"), DATA)
    assert [d.data for d in docs] == flan_cot_split("qasc", DATA)[1]
    assert get_task("ecqa").gold_text == "rationale" and get_task("commonsenseqa_clean").gold_text is None
