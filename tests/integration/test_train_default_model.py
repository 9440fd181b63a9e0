"""distill -> train -> run on the real default model, at toy scale. Marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.cli import main

pytestmark = pytest.mark.slow


def test_distill_train_run_on_the_default_model(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLMSTACK_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "instructions.jsonl"
    rows = [{"instruction": "Name a fruit that is red.", "output": "An apple."},
            {"instruction": "What colour is the sky on a clear day?", "output": "Blue."},
            {"instruction": "How many days are in a week?", "output": "Seven."},
            {"instruction": "What do cows drink?", "output": "Water."}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Distil with the default model as its own teacher (short outputs to stay quick)
    assert main(["distill", "--teacher", "default", "--data", str(data), "--out", str(tmp_path / "d"),
                 "--max-new-tokens", "12", "--keep-unfinished"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "d" / "distill_report.json").read_text())
    assert report["total"] == 4 and report["kept"] >= 2
    answer_rows = [json.loads(line) for line in (tmp_path / "d" / "answer.jsonl").read_text().splitlines()]
    assert all(r["provenance"]["source"] == "reference" for r in answer_rows)
    # Train two steps per stage
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t"), "--max-steps", "2",
                 "--batch-size", "2", "--max-length", "128"]) == 0  # fmt: skip
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
