"""A 2-arm stacking study end to end on a tiny model: train, evaluate, extra seeds, attribution, report, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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
        "protocol": 1,
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


def _config_v2(tmp_path: Path, model: Path) -> Path:
    body = {
        "model": str(model),
        "data_dir": str(_data(tmp_path / "data")),
        "train_sets": ["qasc", "strategyqa"],
        "corpus_sets": ["qasc", "strategyqa"],
        "train_questions": 8,
        "arms": ["A1", "R1", "RS2"],
        "seeds": [0, 1],
        "primary": ["RS2", "R1"],
        "secondary": [["R1", "A1"], ["RS2", "A1"]],
        "k": 2,
        "reason_tokens": 6,
        "recall_tokens": 5,
        "batch_size": 4,
        "eval": {"qasc": 4, "strategyqa": 4},
        "attribute": {"task": "qasc", "limit": 4, "arm": "RS2"},
        "train": {"epochs": 1, "rank": 4, "batch_size": 2, "max_length": 96, "precision": "fp32"},
    }
    return write_yaml(tmp_path / "study_v2.yaml", body)


def test_a_protocol_2_study_with_retrieval_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    from slmstack.study import run as run_module

    config, out = _config_v2(tmp_path, tiny_model_dir), tmp_path / "out"
    real, prompts = run_module.Study.run_cell, []
    real_examples = run_module.Study.examples

    order, scored = [], []
    import slmstack.evaluation.harness as harness

    real_items = harness.multiple_choice_items

    def dying(self, cell):
        order.append(cell.id)
        return real(self, cell)

    def scoring(spec, docs, target, scorer):  # killed in the last cell, after its first task
        if scored.count(("A1__s1", "qasc")) and target.stack.config.name == "study-A1__s1":
            raise KeyboardInterrupt
        scored.append((target.stack.config.name.removeprefix("study-"), spec.name))
        return real_items(spec, docs, target, scorer)

    def recording(self, cell, plan, tokenizer):
        examples = real_examples(self, cell, plan, tokenizer)
        prompts.extend((cell.arm, plan.data, p) for _, p, _ in examples)
        return examples

    import slmstack.models

    devices, real_load = set(), slmstack.models.load_model

    def spying(ref, device="auto", dtype="auto"):
        devices.add(device)
        return real_load(ref, device=device, dtype=dtype)

    monkeypatch.setattr(run_module.Study, "run_cell", dying)
    monkeypatch.setattr(run_module.Study, "examples", recording)
    monkeypatch.setattr(slmstack.models, "load_model", spying)
    monkeypatch.setattr(harness, "multiple_choice_items", scoring)
    # Execute: killed in the last cell, after its first task, then resumed
    assert main(["study", "--config", str(config), "--out", str(out)]) == 130
    assert len(list((out / "cells").glob("*.json"))) == 5
    assert [p.name for p in (out / "partial" / "A1__s1").iterdir()] == ["qasc.json"]
    # seed by seed, the primary contrast's arms first: a study stopped part-way has whole seeds
    assert order == ["RS2__s0", "R1__s0", "A1__s0", "RS2__s1", "R1__s1", "A1__s1"]
    del scored[:]
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0
    # the resumed cell scored only the task it had not finished (then the attribution scores RS2__s0)
    assert [c for c in scored if c[0] != "RS2__s0"] == [("A1__s1", "strategyqa")]
    # Assert: every arm ran every seed (no selection), and the contrasts were tested as named
    summary = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == sorted(
        f"{a}__s{s}.json" for a in ("A1", "R1", "RS2") for s in (0, 1)
    )  # fmt: skip
    primary, *secondary = summary["contrasts"]
    assert (primary["arm"], primary["against"], primary["primary"], primary["n"]) == ("RS2", "R1", True, 8)
    assert [(c["arm"], c["against"]) for c in secondary] == [("R1", "A1"), ("RS2", "A1")]
    assert all(c["p_holm"] >= c["p"] for c in secondary) and "p_holm" not in primary
    assert summary["paired_tests"] == []  # protocol 1's uncorrected first-seed tests are gone
    assert "Contrasts named before the run" in (out / "results.md").read_text()
    assert devices == {"auto"}  # the config's device (a GPU where there is one) reaches every model load
    # the stages that write text saw the options in training, and the scored answer stage did not (as in the stacks)
    writing = [p for _, data, p in prompts if data in (("recall",), ("reason",))]
    answering = [p for _, data, p in prompts if data[0].startswith("answer")]
    assert writing and all("Options:\n- " in p for p in writing)
    assert answering and not any("Options:" in p for p in answering)
    assert all("Passages:\n" in p for arm, data, p in prompts if data in (("answer|passages",), ("recall",)))
    # every answer adapter saw the same number of answer examples, whatever else it learned
    records = {p.parent.name: json.loads(p.read_text()) for p in (out / "adapters").glob("*/train.json")}
    answers = {n: r["examples"] for n, r in records.items() if n.split("-")[1] in ("main", "answer")}
    assert len(set(answers.values())) == 1 and len(answers) == 6, answers
    # the trained stacks read the study's index; RS2's attribution covers both upstream stages
    stages = yaml.safe_load((out / "stacks" / "RS2__s0.yaml").read_text())["stages"]
    assert [s["name"] for s in stages] == ["facts", "recall", "answer"] and stages[0]["kind"] == "retrieve"
    rows = json.loads((out / "attribution" / "attribution.json").read_text())["tasks"]["qasc"]["rows"]
    assert {(r["stage"], r["intervention"]) for r in rows} >= {("facts", "skip"), ("recall", "base")}
    assert ("facts", "base") not in {(r["stage"], r["intervention"]) for r in rows}


def test_a_pool_items_own_rationale_is_never_among_its_passages(tiny_model_dir, tmp_path) -> None:
    from slmstack.study.config import load_study_config
    from slmstack.study.run import prepare_study

    study = prepare_study(load_study_config(_config_v2(tmp_path, tiny_model_dir)), tmp_path / "out")
    pool = study.pool()
    assert pool and all(r["facts"] for r in pool)
    assert all(f"- {r['rationale']}" not in r["facts"].split("\n") for r in pool)
    # and without the exclusion, the own rationale is the best passage for most items (so the rule matters)
    from slmstack.retrieval import load_retriever

    found = load_retriever(study.ensure_index()).search([r["context"] for r in pool], 1)
    assert sum(p[0].id == r["id"] for p, r in zip(found, pool, strict=True) if p) >= len(pool) // 2


def test_a_running_study_gains_a_reference_arm_on_another_base_run_after_its_own_cells(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    from dataclasses import replace

    from slmstack.study import arms as arms_module
    from slmstack.study import run as run_module
    from tests.conftest import build_tokenizer, tiny_model

    # Prepare: a 2-arm protocol-2 study, finished; then G1 (its base here a tiny Gemma 3) added as a reference
    gemma = tmp_path / "gemma"
    tiny_model("gemma3").save_pretrained(gemma)
    build_tokenizer().save_pretrained(gemma)
    monkeypatch.setitem(arms_module.ARMS, "G1", replace(arms_module.ARMS["G1"], model=str(gemma)))
    body = yaml.safe_load(_config_v2(tmp_path, tiny_model_dir).read_text())
    body.update(arms=["A1", "R1"], primary=["R1", "A1"], secondary=[], attribute={"task": "qasc", "limit": 2})
    config, out = write_yaml(tmp_path / "two.yaml", body), tmp_path / "out"
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0
    order, real = [], run_module.Study.run_cell

    def recording(self, cell):
        order.append(cell.id)
        return real(self, cell)

    monkeypatch.setattr(run_module.Study, "run_cell", recording)
    # Execute: the same study with a reference arm (a part-way report first: G1's cells are what is left)
    body["reference"] = ["G1"]
    assert (
        main(["study", "--config", str(write_yaml(tmp_path / "ref.yaml", body)), "--out", str(out), "--report"]) == 0
    )
    assert "**Part-way report**: not run yet: G1__s0, G1__s1.\n" in (out / "results.md").read_text()
    assert main(["study", "--config", str(write_yaml(tmp_path / "ref.yaml", body)), "--out", str(out)]) == 0
    # Assert: only G1 ran, after the study's own cells in its order, on its own base, and is compared with R1
    # (the grid runs the cells not yet done, then reads every cell back in the study's order)
    assert order == ["G1__s0", "G1__s1", "R1__s0", "A1__s0", "R1__s1", "A1__s1", "G1__s0", "G1__s1"]
    assert sorted(p.name for p in (out / "adapters").iterdir() if p.name.startswith("G1")) == [
        "G1-main-s0",
        "G1-main-s1",
    ]
    stack = yaml.safe_load((out / "stacks" / "G1__s0.yaml").read_text())
    assert Path(stack["model"]).resolve() == gemma.resolve()
    rows = json.loads((out / "results.json").read_text())["contrasts"]
    assert [(r["arm"], r["against"], r["primary"], r["reference"]) for r in rows] == [
        ("R1", "A1", True, False), ("G1", "R1", False, True)
    ]  # fmt: skip
    assert "| reference (#34) | G1 | R1 |" in (out / "results.md").read_text()
    # and a study cannot list a reference arm among its own arms, nor change anything else when resumed
    body["arms"] = ["A1", "R1", "G1"]
    with pytest.raises(Exception, match="G1 runs on another base"):
        load_study_config(write_yaml(tmp_path / "bad.yaml", body))
    body.update(arms=["A1", "R1"], k=3)
    assert main(["study", "--config", str(write_yaml(tmp_path / "k.yaml", body)), "--out", str(out)]) == 2
