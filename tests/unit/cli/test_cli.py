from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.cli import main
from tests.conftest import stack_dict, write_yaml


@pytest.fixture()
def stack_yaml(tiny_model_dir: Path, tiny_adapters: dict, tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "stack.yaml", stack_dict(tiny_model_dir, tiny_adapters, max_new=6))


def _fails_cleanly(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_run_json_prints_answer_and_trace(stack_yaml: Path, capsys) -> None:
    assert main(["run", "--stack", str(stack_yaml), "--json", "name a red fruit."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["stage"] for t in out["trace"]] == ["first", "second", "third"]
    assert out["answer"] == out["trace"][-1]["output"]
    assert set(out["trace"][0]) >= {"stage", "prompt", "output", "tokens_in", "tokens_out", "seconds"}


def test_run_prints_stage_cards(stack_yaml: Path, capsys) -> None:
    assert main(["run", "--stack", str(stack_yaml), "--plain", "hi"]) == 0
    out = capsys.readouterr().out
    assert "[1/3] first" in out and "[3/3] third" in out and "ANSWER:" in out


def test_bad_config_field_exits_2(stack_yaml: Path, tmp_path: Path, capsys) -> None:
    data = stack_dict("m")
    data["stages"][0]["tempalte"] = data["stages"][0].pop("template")
    bad = write_yaml(tmp_path / "bad.yaml", data)
    _fails_cleanly(
        capsys, ["run", "--stack", str(bad), "q"], "bad.yaml", "stages[0].tempalte", "Did you mean 'template'"
    )


def test_missing_model_and_empty_input_exit_2(tmp_path: Path, stack_yaml: Path, capsys) -> None:
    missing = write_yaml(tmp_path / "m.yaml", stack_dict(tmp_path / "no_such_model"))
    _fails_cleanly(capsys, ["run", "--stack", str(missing), "q"], "no_such_model", "does not exist")
    _fails_cleanly(capsys, ["run", "--stack", str(stack_yaml), "   "], "empty")
    _fails_cleanly(capsys, ["run", "--stack", str(tmp_path / "nope.yaml"), "q"], "nope.yaml", "not found")


def test_malformed_input_line_is_named(stack_yaml: Path, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "q.jsonl"
    inputs.write_text('{"input": "ok"}\n{"input": "broken"\n')
    _fails_cleanly(capsys, ["run", "--stack", str(stack_yaml), "--input", str(inputs), "--output",
                            str(tmp_path / "o.jsonl")], "q.jsonl:2", "not valid JSON")  # fmt: skip
    inputs.write_text('{"input": "ok"}\n{"text": "no field"}\n')
    _fails_cleanly(capsys, ["run", "--stack", str(stack_yaml), "--input", str(inputs), "--output",
                            str(tmp_path / "o.jsonl")], "q.jsonl:2", "--field")  # fmt: skip


def test_file_run_resumes_where_it_stopped(stack_yaml: Path, tmp_path: Path, capsys) -> None:
    # Prepare: 5 inputs; the output already holds lines 1 and 3, and a torn line from a killed run
    inputs = tmp_path / "q.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"q{i}", "question": f"question {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "a.jsonl"
    done = [{"line": 1, "answer": "EARLIER", "trace": []}, {"line": 3, "answer": "EARLIER", "trace": []}]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"line": 4, "ans')
    # Execute
    argv = ["run", "--stack", str(stack_yaml), "--input", str(inputs), "--output", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    # Assert: lines 2, 4, 5 were answered once each; the earlier answers were kept
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5]
    assert [r["answer"] for r in rows[:2]] == ["EARLIER", "EARLIER"]
    assert {r["id"] for r in rows[2:]} == {"q1", "q3", "q4"}
    assert all(len(r["trace"]) == 3 for r in rows[2:])
    assert "3 results" in capsys.readouterr().out
    # A second rerun has nothing left to do.
    assert main(argv) == 0 and len(out.read_text().splitlines()) == 5


def test_models_lists_default_and_cache(capsys) -> None:
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and "cached" in info


def test_unknown_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--nope", "q"])
    assert exc.value.code == 2
