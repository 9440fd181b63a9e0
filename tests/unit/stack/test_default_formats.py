"""Each verb's default engine format (docs/engine.md): generation takes the engine's fastest on the model's own
weights (``auto``), scoring stays float32 so that lm-eval identity holds, and ``dtype: float32`` forces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.cli import main
from slmstack.formats import engine_weights
from tests.conftest import stack_dict, write_yaml


@pytest.fixture(autouse=True)
def _engine_on(monkeypatch) -> None:
    """These tests are about the engine's formats: on even in CI's pass with SLMSTACK_ENGINE=hf."""
    monkeypatch.delenv("SLMSTACK_ENGINE", raising=False)


@pytest.fixture()
def built(monkeypatch) -> list[str]:
    """A spy on the engine: the weight format every engine built in the test was asked for."""
    from slmstack.engine.engine import Engine

    asked: list[str] = []
    real = Engine.__init__

    def spy(self, model, tokenizer, options=None, **overrides):
        real(self, model, tokenizer, options, **overrides)
        asked.append(self.options.weights)

    monkeypatch.setattr(Engine, "__init__", spy)
    return asked


def _task(tmp_path: Path) -> Path:
    rows = "".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2}) + "\n" for i in range(4))
    (tmp_path / "t.jsonl").write_text(rows)
    task = tmp_path / "t.yaml"
    task.write_text(f"name: t\ndata_file: {tmp_path / 't.jsonl'}\nkind: multiple_choice\n")
    return task


def test_the_table_of_defaults() -> None:
    assert engine_weights("auto", "generate") == "auto"
    assert engine_weights("auto", "score") == "dense"
    assert engine_weights("float32", "generate") == "dense"  # dtype: float32 forces the exact path
    assert engine_weights("int8-weights", "score") == "int8-weights"  # a format asked for is a format given
    with pytest.raises(ValueError, match="job"):
        engine_weights("auto", "train")


def test_run_generates_in_auto_and_says_which_formats_ran(tiny_model_dir: Path, tmp_path: Path, built, capsys) -> None:
    stack = write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, max_new=4))
    assert main(["run", "--stack", str(stack), "--json", "hi"]) == 0
    generation = json.loads(capsys.readouterr().out)["generation"]
    assert built == ["auto"]
    # a model without a GGUF file holds no 4-bit blocks: auto is float32 on every projection
    assert generation["weights"]["requested"] == "auto" and set(generation["weights"]["projections"]) == {"dense"}
    assert main(["run", "--stack", str(stack), "--json", "--set", "dtype=float32", "hi"]) == 0
    assert built[-1] == "dense"


def test_eval_scores_and_generates_in_float32_for_models_and_stacks(tiny_model_dir: Path, tmp_path: Path,
                                                                     built) -> None:  # fmt: skip
    task = _task(tmp_path)
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", str(task), "--out", str(tmp_path / "m.json")]) == 0
    stack = write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, max_new=4))
    assert main(["eval", "--stack", str(stack), "--tasks", str(task), "--out", str(tmp_path / "s.json")]) == 0
    assert built and set(built) == {"dense"}


def test_a_stack_that_generates_in_int4_still_scores_on_float32(tiny_model_dir: Path, tmp_path: Path) -> None:
    from slmstack.evaluation.targets import StackTarget
    from slmstack.stack.config import load_stack_config
    from slmstack.stack.runtime import Stack

    config = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, max_new=4)),
                               ["dtype=int4-weights"])  # fmt: skip
    stack = Stack(config)
    scorer = StackTarget(stack).scorer(batch_size=4)
    assert not stack.backend.engine.exact and stack.backend.engine.weights.formats() == {"int4-weights": 8}
    assert scorer.engine is not stack.backend.engine and scorer.engine.exact
