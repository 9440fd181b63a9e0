"""distill -> train -> run on the real default model with default flags, on six GSM8K problems. Marked slow.

The six problems ship with the tests (``tests/data``), so the test reads the same records with or without
``../shared``; its assertions are properties that hold on any CPU, not counts that one machine's greedy text gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.cli import main

pytestmark = pytest.mark.slow
GSM8K_SIX = Path(__file__).resolve().parents[1] / "data" / "gsm8k_test_first6.jsonl"


def _six_gsm8k_problems(path: Path) -> Path:
    """The first six GSM8K test problems (shipped in tests/data) as Alpaca records."""
    rows = [json.loads(line) for line in GSM8K_SIX.read_text().splitlines()]
    records = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_distill_with_default_flags_then_train_then_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLMSTACK_CACHE", str(tmp_path / "cache"))
    data = _six_gsm8k_problems(tmp_path / "gsm8k6.jsonl")
    # Distil with the default model as its own teacher and every flag at its default
    assert main(["distill", "--teacher", "default", "--data", str(data), "--out", str(tmp_path / "d")]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "d" / "distill_report.json").read_text())
    # every record is accounted for, and something is usable (how many survive the filters is the CPU's greedy text)
    assert report["total"] == 6 and report["kept"] >= 1, report
    assert report["kept"] + sum(report["dropped"].values()) == report["total"], report
    # the low-yield warning (--min-kept, default 0.5) appears exactly when fewer than half were kept
    assert ("warning: only" in captured.err) == (report["kept"] < 0.5 * report["total"]), captured.err
    rows = [json.loads(line) for line in (tmp_path / "d" / "reason.jsonl").read_text().splitlines()]
    assert rows and all(r["completion"].strip() for r in rows)
    assert {r["provenance"]["finish"] for r in rows} <= {"stop", "trimmed", "cut"}
    answers = [json.loads(line) for line in (tmp_path / "d" / "answer.jsonl").read_text().splitlines()]
    assert all(r["provenance"]["source"] == "reference" for r in answers)
    # Train two steps per stage on what was kept
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t"), "--max-steps", "2",
                 "--batch-size", "2", "--max-length", "256"]) == 0  # fmt: skip
    capsys.readouterr()
    trained = tmp_path / "t" / "trained_stack.yaml"
    for stage in ("restate", "recall", "reason", "answer"):
        assert (tmp_path / "t" / stage / "adapter" / "adapter_model.safetensors").is_file()
    # The trained stack answers, every stage through its own adapter
    overrides = [f"--set=stages.{i}.generation.max_new_tokens=8" for i in range(4)]
    assert main(["run", "--stack", str(trained), "--json", *overrides, "Name a fruit that is yellow."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["adapter"] for t in out["trace"]] == ["restate", "recall", "reason", "answer"]
    assert out["answer"]
