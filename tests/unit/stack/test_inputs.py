"""A stack's declared input fields (``inputs: [options]``): templates name them, evaluation supplies them."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmstack.errors import ConfigError
from slmstack.stack.config import load_stack_config
from slmstack.stack.runtime import Stack
from tests.conftest import write_yaml


def _stack(tmp_path: Path, model: Path, **extra) -> Path:
    few = {"max_new_tokens": 3}
    stages = [{"name": "reason", "template": "Options: {options}\n{input}", "generation": few},
              {"name": "answer", "template": "{reason}\n{input}", "generation": few}]  # fmt: skip
    body = {"name": "opts", "model": str(model), "inputs": ["options"], "stages": stages, **extra}
    return write_yaml(tmp_path / "s.yaml", body)


def test_each_input_carries_its_own_fields_and_a_missing_one_is_empty(tiny_model_dir, tmp_path) -> None:
    stack = Stack.from_config(_stack(tmp_path, tiny_model_dir))
    given, missing = stack.run_batch(["q one", "q two"], fields=[{"options": "- red\n- blue"}, {}])
    assert given.trace[0].prompt == "Options: - red\n- blue\nq one"
    assert missing.trace[0].prompt == "Options: \nq two"
    assert "Options:" not in given.trace[1].prompt  # the answer stage's template does not name them


def test_evaluation_gives_a_stack_each_items_options_and_scores_without_them(tiny_model_dir, tmp_path) -> None:
    from slmstack.evaluation.harness import multiple_choice_items
    from slmstack.evaluation.targets import StackTarget
    from slmstack.evaluation.tasks import Doc, TaskSpec

    stack = Stack.from_config(_stack(tmp_path, tiny_model_dir))
    spec = TaskSpec(name="t", kind="multiple_choice", text="Q: {{q}}", choices="c", gold="g", metrics=["acc"])
    docs = [Doc("a", {"q": "sky?", "c": ["blue", "green"], "g": 0}), Doc("b", {"q": "grass?", "c": ["red", "green"],
                                                                               "g": 1})]  # fmt: skip
    target = StackTarget(stack)
    seen = []
    real = stack.run_batch

    def spy(texts, **kwargs):
        results = real(texts, **kwargs)
        seen.extend(t.prompt for r in results for t in r.trace)
        return results

    stack.run_batch = spy
    items = multiple_choice_items(spec, docs, target, target.scorer(4))
    assert len(items["acc"]) == 2
    assert sorted(seen) == ["Options: - blue\n- green\nQ: sky?", "Options: - red\n- green\nQ: grass?"]
    prepared, _ = target.prepare(["Q: sky?"], " ")
    assert "Options:" not in prepared[0] and "Q: sky?" in prepared[0]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [({"inputs": ["input"]}, "inputs: 'input' must be"), ({"inputs": ["reason"]}, "inputs: 'reason' must be"),
     ({"inputs": []}, "refers to unknown field {options}")],
)  # fmt: skip
def test_a_declared_input_that_cannot_work_is_refused(tiny_model_dir, tmp_path, extra, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        load_stack_config(_stack(tmp_path, tiny_model_dir, **extra))
