"""A 2-arm stacking study end to end on a tiny model: train, evaluate, extra seeds, attribution, report, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.cli import main
from slmstack.study.config import load_study_config
from tests.conftest import write_yaml

WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "rock", "fish", "bird", "star", "moon"]


def _data(root: Path) -> Path:
    (root / "flan_cot").mkdir(parents=True)
    qasc = [
        f"What is {w}?\\nOptions:\\n- (A) {w}\\n- (B) {v}\t(A)\t{w} is {w}."
        for w, v in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True)
    ]
    strategy = [
        f"Is {w} a {v}?\t{'yes' if i % 2 else 'no'}\tBecause {w} and {v}."
        for i, (w, v) in enumerate(zip(WORDS, reversed(WORDS), strict=True))
    ]
    (root / "flan_cot" / "qasc_train.tsv").write_text("\n".join(qasc) + "\n")
    (root / "flan_cot" / "strategyqa_train.tsv").write_text("\n".join(strategy) + "\n")
    return root


def _config(tmp_path: Path, model: Path) -> Path:
    body = {
        "model": str(model),
        "data_dir": str(_data(tmp_path / "data")),
        "train_sets": ["qasc", "strategyqa"],
        "train_questions": 8,
        "arms": ["A1", "S2"],
        "seeds": [0],
        "extra_seeds": [1],
        "best": 1,
        "reason_tokens": 6,
        "batch_size": 4,
        "eval": {"qasc": 4, "strategyqa": 4},
        "attribute": {"task": "qasc", "limit": 4},
        "train": {"token_budget": 400, "rank": 4, "batch_size": 2, "max_length": 64, "precision": "fp32"},
    }
    return write_yaml(tmp_path / "study.yaml", body)


def test_a_two_arm_study_runs_end_to_end_and_resumes_after_a_kill(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from slmstack.study import run as run_module

    config, out = _config(tmp_path, tiny_model_dir), tmp_path / "out"
    # Prepare: the run is killed when its second cell starts (the first is finished)
    real, trained = run_module.Study.run_cell, {"n": 0}
    real_train = run_module.Study._train

    def dying(self, cell):
        if cell.arm == "S2" and not self.cell_path(cell).is_file():
            raise KeyboardInterrupt
        return real(self, cell)

    def counting(self, *args):
        trained["n"] += 1
        return real_train(self, *args)

    monkeypatch.setattr(run_module.Study, "run_cell", dying)
    monkeypatch.setattr(run_module.Study, "_train", counting)
    assert main(["study", "--config", str(config), "--out", str(out)]) == 130  # the CLI's "interrupted"
    assert [p.name for p in (out / "cells").glob("*.json")] == ["A1__s0.json"] and trained["n"] == 1
    # a part-way report runs nothing and names what is still to run
    assert main(["study", "--config", str(config), "--out", str(out), "--report"]) == 0
    assert trained["n"] == 1 and [p.name for p in (out / "cells").glob("*.json")] == ["A1__s0.json"]
    report = (out / "results.md").read_text()
    assert "Part-way report" in report and "S2__s0" in report and "| A1 |" in report
    assert [p.name for p in (out / "stacks").iterdir()] == ["A1__s0.yaml"]
    # Execute: resume
    monkeypatch.setattr(run_module.Study, "run_cell", real)
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0
    # Assert: A1 was not redone; S2 trained its two adapters (reason first); the best arm got a second seed
    summary = json.loads((out / "results.json").read_text())
    best = summary["best"][0]
    assert trained["n"] == 1 + 2 + (1 if best == "A1" else 2)
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == sorted(
        ["A1__s0.json", "S2__s0.json", f"{best}__s1.json"]
    )
    assert summary["scores"][best]["seeds"] == [0, 1]
    s2 = json.loads((out / "cells" / "S2__s0.json").read_text())
    assert s2["train"]["reason"]["rank"] == s2["train"]["answer"]["rank"] == 2  # two r/2 adapters against one r
    a1 = json.loads((out / "cells" / "A1__s0.json").read_text())
    assert a1["train"]["main"]["rank"] == 4
    assert a1["train"]["main"]["trainable_parameters"] == sum(a["trainable_parameters"] for a in s2["train"].values())
    assert s2["tasks"]["qasc"]["generated_tokens"] > 0 and a1["tasks"]["qasc"]["generated_tokens"] == 0
    assert len(s2["tasks"]["qasc"]["items"]) == 4
    tests = [t for t in summary["paired_tests"] if t["against"] == "A1" and t["arm"] == "S2"]
    assert {t["task"] for t in tests} == {"qasc", "strategyqa", "all"}
    assert {p.name for p in (out / "attribution").iterdir()} == {
        "attribution.json",
        "attribution.md",
        "attribution.png",
    }
    assert (out / "results.png").is_file() and "| S2 |" in (out / "results.md").read_text()
    # every trained arm is a stack YAML whose adapters resolve from wherever it is read
    from slmstack.stack.config import load_stack_config

    s2_stack = load_stack_config(out / "stacks" / "S2__s0.yaml")
    assert [s2_stack.adapter_path(s).resolve() for s in s2_stack.stages] == [
        (out / "adapters" / "S2-reason-s0").resolve(),
        (out / "adapters" / "S2-answer-s0").resolve(),
    ]
    assert sorted(p.name for p in (out / "stacks").iterdir()) == sorted(
        ["A1__s0.yaml", "S2__s0.yaml", f"{best}__s1.yaml"]
    )
    assert "mean_accuracy" in capsys.readouterr().out


def test_a_config_error_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from slmstack.errors import ConfigError

    config = _config(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="Did you mean 'S2'"):
        load_study_config(config, ["arms=[A1,S22]"])
    with pytest.raises(ConfigError, match="train.rank must be an even number"):
        load_study_config(config, ["train.rank=3"])
