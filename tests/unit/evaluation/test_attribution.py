"""Stage attribution: its statistics by hand, the derangement, each intervention's prompt, and cached outputs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from slmstack.evaluation.attribution import (
    attribute,
    derangement,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    render_without,
)
from slmstack.stack.runtime import Stack
from tests.conftest import write_yaml

QUESTIONS = [("what is red?", ["a color", "a dog"], 0, "red is a color"),
             ("what barks?", ["a cat", "a dog"], 1, "dogs bark"),
             ("what is blue?", ["a color", "a fish"], 0, "blue is a color"),
             ("what swims?", ["a fish", "a bird"], 0, "fish swim"),
             ("what flies?", ["a rock", "a bird"], 1, "birds fly")]  # fmt: skip


def test_mcnemar_exact_p_by_hand() -> None:
    # 7 discordant pairs: 1 where only the stack is right, 6 where only the variant is
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    p, only_a, only_b = mcnemar_exact_p(a, b)
    assert (only_a, only_b) == (1, 6)
    assert p == pytest.approx(2 * (1 + 7) / 2**7)  # 2 * P(X <= 1), X ~ Binomial(7, 1/2) = 0.125
    assert mcnemar_exact_p([1, 1], [1, 1])[0] == 1.0
    assert mcnemar_exact_p([1] * 5 + [0] * 5, [0] * 5 + [1] * 5)[0] == 1.0  # 5 vs 5: no evidence either way


def test_paired_bootstrap_interval_matches_the_exact_resampling_distribution() -> None:
    # Prepare: 5 items with paired differences -1, 0, +1, +1, 0; all 5^5 resamples are equally likely
    a, b = [1.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0]
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    exact = sorted(sum(diffs[i] for i in idx) / 5 for idx in itertools.product(range(5), repeat=5))
    # by hand: P(mean <= -0.6) = 1.95 % < 2.5 % <= P(mean <= -0.4) = 7.07 %, and P(mean <= 0.6) = 93.9 % <
    # 97.5 % <= P(mean <= 0.8) = 98.98 %, so the exact 95 % percentile interval is [-0.4, 0.8]
    assert (exact[int(0.025 * len(exact))], exact[int(math.ceil(0.975 * len(exact))) - 1]) == (-0.4, 0.8)
    # Execute / Assert: the seeded bootstrap lands on the same interval
    lo, hi = paired_bootstrap_ci(a, b, samples=20000, seed=1)
    assert lo == pytest.approx(-0.4) and hi == pytest.approx(0.8)
    # and a constant difference has a zero-width interval at that difference
    assert paired_bootstrap_ci([0.0] * 4, [1.0] * 4, samples=50) == (1.0, 1.0)


@pytest.mark.parametrize("n", [2, 3, 10, 57])
def test_the_derangement_leaves_no_item_with_its_own_text(n: int) -> None:
    perm = derangement(n, seed=3)
    assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert perm == derangement(n, seed=3) and (n < 4 or perm != derangement(n, seed=4))


def test_skip_renders_the_template_without_the_stages_lines() -> None:
    template = "Reasoning: {reason}\n\nQuestion: {input}\nNotes: {reason} and {other}\nAnswer:"
    assert render_without(template, "reason") == "Question: {input}\nNotes:  and {other}\nAnswer:"
    assert render_without("{reason}", "reason") == ""


@pytest.fixture()
def two_stage(tiny_model_dir: Path, tiny_adapters: dict, tmp_path: Path):
    rows = [{"query": q, "choices": c, "gold": g, "rationale": r} for q, c, g, r in QUESTIONS]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "t", "kind": "multiple_choice", "data_file": str(data), "text": "Q: {{query}}",
            "gold_text": "rationale", "metrics": ["acc"]}  # fmt: skip
    task = write_yaml(tmp_path / "t.yaml", spec)
    stack = {"name": "two", "model": str(tiny_model_dir), "batch_size": 8, "stages": [
        {"name": "reason", "template": "{input} why?", "adapter": str(tiny_adapters["first"]),
         "generation": {"max_new_tokens": 6}},
        {"name": "answer", "template": "Reasoning: {reason}\n{input}\nAnswer:", "generation": {"max_new_tokens": 4}},
    ]}  # fmt: skip
    return Stack.from_config(write_yaml(tmp_path / "s.yaml", stack)), str(task)


def test_each_intervention_changes_the_final_prompt_as_specified_and_upstream_runs_once(two_stage, monkeypatch):
    from slmstack.evaluation import attribution

    stack, task = two_stage
    prompts: dict[str, list[str]] = {}
    adapters: list[str] = []  # the adapter of every generated row
    real_score, real_submit = attribution._score, stack.backend.submit

    def recording_score(variant, spec, docs, contexts, values, metric, batch_size):
        target = attribution._FixedUpstream(variant, dict(zip(contexts, values, strict=True)))
        prompts[f"#{len(prompts)}"] = target.prepare(contexts, " ")[0]
        return real_score(variant, spec, docs, contexts, values, metric, batch_size)

    def counting_submit(row, *args, **kwargs):
        adapters.append(row.adapter)
        return real_submit(row, *args, **kwargs)

    monkeypatch.setattr(attribution, "_score", recording_score)
    monkeypatch.setattr(stack.backend, "submit", counting_submit)
    # Execute
    report = attribute(stack, [task], interventions=["skip", "placebo", "base", "oracle"], bootstrap=100)
    # Assert: the reason stage ran once for the stack, and once more only for "base" (no adapter)
    assert len(adapters) == 2 * len(QUESTIONS) and adapters.count("__base__") == len(QUESTIONS)
    reference, skip, placebo, base, oracle = prompts.values()
    stack_reasons = [p.split("Reasoning: ")[1].split("\n")[0] for p in reference]
    assert all("Reasoning:" not in p and "Q: " in p for p in skip)  # the line is gone, the question stays
    placebo_reasons = [p.split("Reasoning: ")[1].split("\n")[0] for p in placebo]
    assert sorted(placebo_reasons) == sorted(stack_reasons)  # the same texts, each moved to another item
    assert all(r in p for p, r in zip(oracle, [q[3] for q in QUESTIONS], strict=True))
    assert [p.split("Reasoning: ")[1].split("\n")[0] for p in base] != stack_reasons  # regenerated without adapter
    rows = report["tasks"]["t"]["rows"]
    assert [r["intervention"] for r in rows] == ["skip", "placebo", "base", "oracle"]
    assert all(-1 <= r["delta"] <= 1 and r["ci95"][0] <= r["delta"] <= r["ci95"][1] for r in rows)
    assert set(report["tasks"]["t"]["contains_gold"]) == {"reason"}


def test_cli_writes_the_three_outputs(two_stage, tmp_path: Path, capsys) -> None:
    from slmstack.cli import main

    stack, task = two_stage
    out = tmp_path / "attr"
    assert main(["attribute", "--stack", str(stack.config.source), "--tasks", task, "--bootstrap", "50",
                 "--out", str(out)]) == 0  # fmt: skip
    expected = {".slmstack.json", "attribution.json", "attribution.md", "attribution.png"}
    assert {p.name for p in out.iterdir()} == expected
    report = json.loads((out / "attribution.json").read_text())
    assert [r["intervention"] for r in report["tasks"]["t"]["rows"]] == ["skip", "placebo", "base", "oracle"]
    assert "| reason | placebo |" in (out / "attribution.md").read_text()
    assert not math.isnan(report["tasks"]["t"]["stack_score"])
    assert yaml.safe_load((out / "attribution.json").read_text())["stack"] == "two"
