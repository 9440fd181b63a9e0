"""A ``kind: retrieve`` stage inside a stack: its trace, batching beside model stages, distillation, attribution."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slmstack.cli import main
from slmstack.errors import ConfigError
from slmstack.retrieval import build_index, format_passages, load_retriever
from slmstack.stack.config import load_stack_config
from slmstack.stack.runtime import Stack
from tests.conftest import write_yaml

FACTS = [
    ("red", "red is the colour of blood and of ripe tomatoes"),
    ("dog", "a dog is a mammal that barks"),
    ("fish", "a fish lives in water and swims with fins"),
    ("bird", "a bird has feathers and most birds fly"),
    ("sky", "the sky looks blue because air scatters blue light"),
]
QUESTIONS = [("what colour is a tomato?", ["red", "blue"], 0), ("what barks?", ["a dog", "a fish"], 0),
             ("what swims with fins?", ["a bird", "a fish"], 1)]  # fmt: skip


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("facts")
    corpus = root / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in FACTS))
    build_index(corpus, root / "index", show_progress=False)
    return root / "index"


def _stack_yaml(tmp_path: Path, model: Path, index: Path, adapter: Path | None = None) -> Path:
    """retrieve -> answer; the index path is relative to the YAML, as a user writes it."""
    (tmp_path / "stack").mkdir(exist_ok=True)
    relative = os.path.relpath(index, tmp_path / "stack")
    stack = {"name": "rag", "model": str(model), "batch_size": 4, "stages": [
        {"name": "facts", "kind": "retrieve", "index": str(relative), "k": 2, "template": "{input}"},
        {"name": "answer", "template": "Facts:\n{facts}\nQ: {input}\nA:", "generation": {"max_new_tokens": 5},
         "adapter": str(adapter) if adapter else None},
    ]}  # fmt: skip
    return write_yaml(tmp_path / "stack" / "rag.yaml", stack)


def test_the_retrieve_stage_is_traced_and_feeds_the_next_stage(tiny_model_dir, tiny_adapters, index, tmp_path):
    # Prepare
    stack = Stack.from_config(_stack_yaml(tmp_path, tiny_model_dir, index, tiny_adapters["third"]))
    questions = [q for q, _, _ in QUESTIONS]
    expected = [format_passages(p) for p in load_retriever(index).search(questions, k=2)]
    # Execute: a batch, and each question alone
    batched = stack.run_batch(questions)
    alone = [stack(q) for q in questions]
    # Assert: the retrieve stage's output is the index's top 2, in the trace like any stage; the answer read it
    for result, passages in zip(batched, expected, strict=True):
        facts, answer = result.trace
        assert (facts.stage, facts.kind, facts.output, facts.adapter, facts.tokens_out) == (
            "facts", "retrieve", passages, None, 0,
        )  # fmt: skip
        assert facts.prompt == result.input and passages.split("\n")[0] in answer.prompt
        assert answer.kind == "generate" and answer.adapter is not None and result.answer == answer.output
    assert expected[0].startswith("- red is the colour") and expected[1].startswith("- a dog is a mammal")
    # a retrieve stage beside model stages batches like any stage: each input alone gives the same texts
    assert [[t.output for t in r.trace] for r in batched] == [[t.output for t in r.trace] for r in alone]


def test_run_json_shows_the_retrieve_stage(tiny_model_dir, index, tmp_path, capsys) -> None:
    path = _stack_yaml(tmp_path, tiny_model_dir, index)
    assert main(["run", "--json", "--stack", str(path), "what barks?"]) == 0
    trace = json.loads(capsys.readouterr().out)["trace"]
    assert [(t["stage"], t["kind"]) for t in trace] == [("facts", "retrieve"), ("answer", "generate")]
    assert trace[0]["output"].startswith("- a dog is a mammal that barks")


def test_the_terminal_card_of_a_retrieve_stage_says_what_it_did(tiny_model_dir, index, tmp_path) -> None:
    from slmstack.stack.render import format_cards

    text = format_cards(Stack.from_config(_stack_yaml(tmp_path, tiny_model_dir, index))("what barks?"))
    # one passage shares a word with the query (the others score 0 and are left out)
    assert "[1/2] facts  (retrieve: 1 passage, no model, " in text and "  query: what barks?" in text
    assert "[2/2] answer  (" in text and " in, " in text


def test_stage_exclude_ids_are_never_passed_on(tiny_model_dir, index, tmp_path) -> None:
    config = load_stack_config(_stack_yaml(tmp_path, tiny_model_dir, index), ["stages.0.exclude=[dog]"])
    result = Stack(config)("what barks?")
    assert "barks" not in result.trace[0].output


def test_a_saved_stack_keeps_its_index_wherever_it_is_written(tiny_model_dir, index, tmp_path) -> None:
    from slmstack.stack.config import save_stack_config

    config = load_stack_config(_stack_yaml(tmp_path, tiny_model_dir, index))
    saved = save_stack_config(config, tmp_path / "elsewhere" / "copy.yaml")
    again = load_stack_config(saved)
    assert Path(again.stages[0].index).resolve() == index.resolve()
    assert "kind" not in saved.read_text().split("- name: answer")[1]  # a generate stage's YAML is as before


def test_distill_runs_the_index_not_the_teacher_and_train_skips_the_stage(tiny_model_dir, index, tmp_path) -> None:
    from slmstack.training.data import Example
    from slmstack.training.distill import DistillConfig, distill

    class Teacher:
        identity = "fake"
        asked: list[str] = []

        def generate(self, prompts, settings):
            from slmstack.training.teachers import TeacherReply

            self.asked += [p for _, p in prompts]
            return [TeacherReply("It barks.", True) for _ in prompts]

    stack = load_stack_config(_stack_yaml(tmp_path, tiny_model_dir, index))
    teacher = Teacher()
    distill(stack, teacher, [Example("e0", "what barks?")], tmp_path / "d", DistillConfig(), show_progress=False)
    # the teacher answered only the answer stage, which read the index's passages
    assert len(teacher.asked) == 1 and "a dog is a mammal that barks" in teacher.asked[0]
    assert not (tmp_path / "d" / "facts.jsonl").exists() and (tmp_path / "d" / "answer.jsonl").is_file()
    from slmstack.training.trainer import TrainConfig, train_stack

    with pytest.raises(ConfigError, match="'facts' is a retrieve stage"):
        train_stack(stack, tmp_path / "d", tmp_path / "t", TrainConfig(max_steps=1), stages=["facts"])
    trained = train_stack(stack, tmp_path / "d", tmp_path / "t", TrainConfig(max_steps=1, batch_size=1))
    stages = load_stack_config(trained).stages
    assert stages[0].kind == "retrieve" and stages[0].adapter is None and stages[1].adapter is not None


def test_attribution_treats_the_retrieve_stage_like_any_upstream_stage(tiny_model_dir, index, tmp_path) -> None:
    from slmstack.evaluation.attribution import attribute

    rows = [{"query": q, "choices": c, "gold": g, "fact": FACTS[i][1]} for i, (q, c, g) in enumerate(QUESTIONS)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "t", "kind": "multiple_choice", "data_file": str(tmp_path / "t.jsonl"), "text": "{{query}}",
            "gold_text": "fact", "metrics": ["acc"]}  # fmt: skip
    task = write_yaml(tmp_path / "t.yaml", spec)
    stack = Stack.from_config(_stack_yaml(tmp_path, tiny_model_dir, index))
    report = attribute(stack, [str(task)], bootstrap=50)
    # skip, placebo and oracle apply; "base" (the stage without its adapter) does not: it runs no model
    assert [(r["stage"], r["intervention"]) for r in report["tasks"]["t"]["rows"]] == [
        ("facts", "skip"), ("facts", "placebo"), ("facts", "oracle"),
    ]  # fmt: skip
    assert set(report["tasks"]["t"]["contains_gold"]) == {"facts"}


@pytest.mark.parametrize(
    ("stage", "fragment"),
    [
        ({"kind": "retrieve", "template": "{input}"}, "a retrieve stage needs index:"),
        ({"kind": "retrieve", "index": "x", "k": 0, "template": "{input}"}, "k must be >= 1"),
        ({"kind": "retrieve", "index": "x", "adapter": "a", "template": "{input}"}, "takes no adapter"),
        ({"index": "x", "template": "{input}"}, "index applies to retrieve stages"),
    ],
)
def test_a_retrieve_stage_that_cannot_work_is_refused(stage: dict, fragment: str, tmp_path: Path) -> None:
    stages = [{"name": "facts", **stage}, {"name": "answer", "template": "{facts} {input}"}]
    with pytest.raises(ConfigError, match=fragment):
        load_stack_config(write_yaml(tmp_path / "s.yaml", {"name": "s", "stages": stages}))
    last = [{"name": "facts", "kind": "retrieve", "index": "x", "template": "{input}"}]
    with pytest.raises(ConfigError, match="cannot be a retrieve stage"):
        load_stack_config(write_yaml(tmp_path / "l.yaml", {"name": "s", "stages": last}))
