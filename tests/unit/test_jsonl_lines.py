"""JSONL is split on "\\n" only: U+0085, U+2028 and U+2029 may stand unescaped inside a JSON string."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.io import iter_jsonl, jsonl_lines, read_done_jsonl

ODD = "a\u0085b\u2028c\u2029d"  # NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR: str.splitlines breaks on each


def _write(path: Path, records: list[dict]) -> Path:
    # ensure_ascii=False writes the three characters raw, as many tools (and json.dumps with it) do
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) > len(records)  # what went wrong before
    return path


def test_every_jsonl_reader_keeps_records_whole(tmp_path: Path) -> None:
    from slmstack.evaluation.tasks import TaskSpec, load_docs
    from slmstack.stack.batch_io import read_inputs
    from slmstack.training.data import read_examples
    from slmstack.training.train_data import load_stage_records

    rows = [{"input": ODD, "instruction": ODD, "output": "x", "prompt": ODD, "completion": ODD, "query": ODD,
             "choices": ["p", "q"], "gold": 0, "line": 1}, {"input": "plain", "instruction": "i", "output": "y",
             "prompt": "p", "completion": "c", "query": "q", "choices": ["p", "q"], "gold": 1, "line": 2}]  # fmt: skip
    path = _write(tmp_path / "data.jsonl", rows)
    assert [r for _, r in iter_jsonl(path)] == rows
    assert [json.loads(line) for line in jsonl_lines(path.read_text(encoding="utf-8"))] == rows
    assert [t for _, t, _ in read_inputs(path)] == [ODD, "plain"]
    assert [e.instruction for e in read_examples(path, "alpaca").examples] == [ODD, "i"]
    assert [r.prompt for r in load_stage_records(path)] == [ODD, "p"]
    spec = TaskSpec(name="t", kind="multiple_choice", data_file=str(path))
    assert [d.data["query"] for d in load_docs(spec)] == [ODD, "q"]
    assert read_done_jsonl(path, "line") == {1, 2}


def test_txt_inputs_are_split_on_newlines_only(tmp_path: Path) -> None:
    from slmstack.stack.batch_io import read_inputs

    path = tmp_path / "q.txt"
    path.write_text(f"{ODD}\nsecond\n", encoding="utf-8")
    assert [t for _, t, _ in read_inputs(path)] == [ODD, "second"]


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_input_file_is_refused_whatever_its_kind(tmp_path: Path, text: str) -> None:
    from slmstack.errors import InputError
    from slmstack.stack.batch_io import read_inputs

    for name in ("q.txt", "q.jsonl"):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match="no inputs found"):
            read_inputs(tmp_path / name)
