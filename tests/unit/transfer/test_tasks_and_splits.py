"""Instruction separation, metrics by hand, and the held-out splits: nothing held out reaches training."""

from __future__ import annotations

import pytest

from slmstack.errors import ConfigError
from slmstack.transfer.config import SplitConfig
from slmstack.transfer.metrics import accuracy, rouge_l
from slmstack.transfer.splits import make_split
from slmstack.transfer.t0 import split_instruction
from slmstack.transfer.tasks import Example, Task, load_collection
from tests.conftest import SHARED_DATA

SHARED_T0 = SHARED_DATA / "t0_multitask"


def test_rouge_l_and_accuracy_by_hand() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 words each way
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # best of the references; stemming makes "cats" match "cat": P = R = 1
    assert rouge_l("cats sleep", ["dogs bark", "cat sleeping"]) == pytest.approx(1.0)
    assert rouge_l("a b c d", ["a x c y"]) == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert accuracy("yes", ["yes"]) == 1.0 and accuracy(" no", ["yes"]) == 0.0


def test_the_shared_instruction_is_cut_and_field_labels_stay() -> None:
    prompts = [f"Title: {t}\nReview: {r}\nIs the review positive or negative?\n"
               for t, r in [("Great", "I loved it."), ("Bad", "Broke at once."), ("Fine", "It works.")]]  # fmt: skip
    split = split_instruction(prompts)
    assert split.reliable and split.prefix == "" and split.suffix == "Is the review positive or negative?\n"
    assert split.inputs == ["Title: Great\nReview: I loved it.", "Title: Bad\nReview: Broke at once.",
                            "Title: Fine\nReview: It works."]  # fmt: skip
    # a prefix instruction, and a recurring middle line
    prompts = [f"Given the following passage\n\n\"{p}\"\n\nanswer the question below carefully.\nQuestion: {q}\n"
               for p, q in [("A b.", "what a?"), ("C d.", "what c?")]]  # fmt: skip
    split = split_instruction(prompts)
    assert split.prefix == "Given the following passage\n\n"
    assert split.lines == ["answer the question below carefully."]
    assert split.inputs == ['"A b."\n\nQuestion: what a?', '"C d."\n\nQuestion: what c?']
    # only a field label is shared: no instruction, not reliable, inputs untouched
    split = split_instruction(["Q: one?\n", "Q: two?\n"])
    assert not split.reliable and split.inputs == ["Q: one?", "Q: two?"]


@pytest.mark.needs_data("t0_multitask")
def test_t0_templates_render_without_their_instruction() -> None:
    tasks = {t.name: t for t in load_collection("t0", SHARED_T0, per_task=4)}
    amazon = tasks["amazon_polarity__Is_this_review"]
    example = amazon.examples[0]
    assert amazon.kind == "classification" and amazon.labels == ["Negative", "Positive"]
    assert example.original.endswith("Is the review positive or negative?\n")
    assert amazon.render(example, None).startswith("Title: ") and "positive or negative" not in amazon.render(
        example, None)  # fmt: skip
    assert amazon.render(example, 0) == example.original
    assert amazon.n_wordings == 2 and "convey a negative or positive" in amazon.render(example, 1)
    assert not tasks["adversarial_qa_dbidaf__question_context_answer"].instruction_split
    assert tasks["samsum__Summarize_this_dialogue_"].metric == "rouge_l"


@pytest.mark.needs_data("t0_multitask")
def test_dialogsum_is_one_rouge_task_with_every_reference() -> None:
    (task,) = load_collection("dialogsum", SHARED_T0.parent / "dialogsum", per_task=3)
    assert task.kind == "generation" and task.metric == "rouge_l" and task.n_wordings == 3
    assert [len(e.targets) for e in task.examples] == [1, 1, 1, 3, 3, 3]  # dev: one summary; test: three
    prompt = task.render(task.examples[0], 0)
    assert prompt.startswith("Summarize the following dialogue.") and task.examples[0].input in prompt


def _task(name: str, category: str, inputs: list[str]) -> Task:
    return Task(name, category, "classification", "accuracy", [Example(i, ["yes"]) for i in inputs], [],
                ["yes", "no"])  # fmt: skip


def test_no_heldout_task_or_example_reaches_training() -> None:
    held = _task("h", "a", [f"h{i}" for i in range(10)])
    sibling = _task("s", "a", ["h1", "h2", "s1", "s2"])  # shares two inputs with the held-out task
    other = _task("o", "b", ["o1", "o2"])
    split = make_split(SplitConfig(name="x", heldout=["h"]), [held, sibling, other], 4, 4, [2], True, False)
    trained = {e.input for t in split.general for e in t.examples}
    assert {t.name for t in split.general} == {"s", "o"} and [t.name for t in split.in_domain] == ["s"]
    assert trained == {"s1", "s2", "o1", "o2"}
    assert not trained & {e.input for e in held.examples}
    assert len(split.test["h"]) == 4 and len(split.pool["h"]) == 4
    assert not {e.input for e in split.test["h"]} & {e.input for e in split.pool["h"]}


@pytest.mark.parametrize(
    ("split", "few_shot", "message"),
    [
        (SplitConfig(name="x", heldout=["hh"]), [2], "Did you mean 'h'"),
        (SplitConfig(name="x", heldout=["h"], train=["h", "o"]), [2], "both held out and in train"),
        (SplitConfig(name="x", heldout=["h", "s"]), [2], "domain 'a' has no training task"),
        (SplitConfig(name="x", heldout=["h"]), [5], "k=5 exceeds the 4 training examples of h"),
        (SplitConfig(name="x", heldout_category="bb"), [2], "Did you mean 'b'"),
    ],
)
def test_bad_splits_are_one_clear_error(split: SplitConfig, few_shot: list[int], message: str) -> None:
    tasks = [_task("h", "a", [f"h{i}" for i in range(10)]), _task("s", "a", ["s1"]), _task("o", "b", ["o1"])]
    with pytest.raises(ConfigError, match=message):
        make_split(split, tasks, 4, 4, few_shot, True, False)


def test_accuracy_without_a_label_set_is_refused() -> None:
    with pytest.raises(ConfigError, match="accuracy needs a label set"):
        Task("t", "c", "classification", "accuracy", [Example("a", ["b"])], [], None)
