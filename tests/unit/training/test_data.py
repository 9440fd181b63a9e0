from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.errors import InputError
from slmstack.training.data import read_examples


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_alpaca_jsonl_and_text(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                         {"instruction": "Greet", "output": "hi"}])  # fmt: skip
    ex = read_examples(path).examples
    assert [e.text for e in ex] == ["Add\n\n2 and 3", "Greet"] and [e.output for e in ex] == ["5", "hi"]


def test_gpteacher_json_array(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"instruction": "Do", "input": "", "response": "done"}]))
    (ex,) = read_examples(path).examples
    assert (ex.instruction, ex.output, ex.id) == ("Do", "done", "0")


def test_prompt_completion_and_column_mapping(tmp_path: Path) -> None:
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "P", "completion": "C"}])
    assert read_examples(pc).examples[0].output == "C"
    other = _jsonl(tmp_path / "o.jsonl", [{"question": "Q?", "answer": "A", "id": "x1"}])
    (ex,) = read_examples(other, columns={"instruction": "question", "output": "answer"}).examples
    assert (ex.instruction, ex.output, ex.id) == ("Q?", "A", "x1")


def test_directory_and_limit(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", [{"instruction": f"i{n}"} for n in range(3)])
    _jsonl(tmp_path / "b.jsonl", [{"instruction": f"j{n}"} for n in range(3)])
    assert [e.instruction for e in read_examples(tmp_path, limit=4).examples] == ["i0", "i1", "i2", "j0"]


def test_malformed_line_is_named_or_skipped(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok"}, '{"instruction": ', {"instruction": "ok2"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        read_examples(path)
    result = read_examples(path, skip_bad=True)
    assert len(result.examples) == 2 and len(result.skipped) == 1 and "bad.jsonl:2" in result.skipped[0]


def test_missing_field_is_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"instruction": "ok", "output": "x"}, {"output": "no instruction"}])
    with pytest.raises(InputError, match=r"m.jsonl:2: missing field 'instruction'"):
        read_examples(path)
    unknown = _jsonl(tmp_path / "u.jsonl", [{"q": "?"}])
    with pytest.raises(InputError, match="cannot tell the data format"):
        read_examples(unknown)


def test_hf_dataset_offline_is_clear(monkeypatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="could not load dataset"):
        read_examples("hf:someone/nothing-here")
