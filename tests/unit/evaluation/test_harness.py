from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slmstack.cli import main
from slmstack.errors import ConfigError, InputError
from slmstack.evaluation.harness import evaluate, mean_stderr
from slmstack.evaluation.scorer import Scorer
from slmstack.evaluation.targets import StackTarget, extract
from slmstack.evaluation.tasks import Doc, get_task, select_subset
from slmstack.models import load_model
from slmstack.stack.runtime import Stack
from tests.conftest import save_random_adapter, save_tiny_model, stack_dict, write_yaml


class FakeScorer:
    """Returns fixed log-likelihoods by continuation text."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table, self.tokens_processed, self.seen = table, 0, []

    def loglikelihood(self, pairs):
        self.seen += pairs
        return [(self.table[cont], cont == " yes") for _, cont in pairs]


class FakeTarget:
    identity = {"kind": "model", "total": 1, "trainable": 0, "active_per_token": 1}

    def __init__(self, scorer=None, answers=None) -> None:
        self._scorer, self.answers = scorer or FakeScorer({}), answers

    def scorer(self, batch_size):
        return self._scorer

    def prepare(self, contexts, delimiter, fields=None):
        return contexts, delimiter

    def generate(self, contexts, until, max_new_tokens, batch_size):
        return self.answers


def _task(tmp_path: Path, body: str, rows: list[dict], name: str = "t") -> Path:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\ndata_file: {data}\n" + body)
    return spec


def test_acc_and_acc_norm_by_hand(tmp_path: Path) -> None:
    # Prepare: choice " a" has the higher raw log-likelihood, " bbbbbbbb" the higher per-character one
    rows = [
        {"query": "q1", "choices": ["a", "bbbbbbbb"], "gold": 1},
        {"query": "q2", "choices": ["a", "bbbbbbbb"], "gold": 0},
    ]
    spec = _task(tmp_path, "kind: multiple_choice\n", rows)
    scorer = FakeScorer({" a": -2.0, " bbbbbbbb": -3.0})
    # Execute
    res = evaluate(FakeTarget(scorer), [str(spec)])["tasks"]["t"]
    # Assert: acc picks "a" (-2 > -3): right once; acc_norm picks "bbbbbbbb" (-3/8 > -2/1): right once
    assert res["acc"] == 0.5 and res["acc_norm"] == 0.5 and res["n"] == 2
    assert res["acc_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # std([1,0], ddof=1)/sqrt(2)
    assert scorer.seen[0] == ("q1", " a")


def test_mean_stderr_matches_hand_value() -> None:
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.25) / 2)


def test_partial_scoring_uses_each_context(tmp_path: Path) -> None:
    rows = [{"context_options": ["A went", "B went"], "continuation": "home.", "gold": 1}]
    spec = _task(tmp_path, "kind: multiple_choice\npartial: true\nchoices: context_options\nmetrics: [acc]\n", rows)

    class ByContext(FakeScorer):
        def loglikelihood(self, pairs):
            self.seen += pairs
            return [(-1.0 if ctx == "B went" else -5.0, False) for ctx, _ in pairs]

    scorer = ByContext({})
    assert evaluate(FakeTarget(scorer), [str(spec)])["tasks"]["t"]["acc"] == 1.0
    assert scorer.seen == [("A went", " home."), ("B went", " home.")]


def test_generative_exact_match_with_regex(tmp_path: Path) -> None:
    rows = [{"question": "1+1?", "answer": "so #### 2"}, {"question": "2+2?", "answer": "#### 1,004"}]
    number = '"#### (\\\\-?[0-9\\\\.\\\\,]+)"'
    body = (f'kind: generative\ntext: "Q: {{{{question}}}}"\ngold: answer\ngold_regex: {number}\n'
            f"answer_regex: {number}\nignore_regexes: [',']\n"
            "metrics: [exact_match, exact_match_flexible]\n")  # fmt: skip
    spec = _task(tmp_path, body, rows)
    res = evaluate(FakeTarget(answers=["it is 2", "#### 1004"]), [str(spec)])["tasks"]["t"]
    assert res["exact_match"] == 0.5 and res["exact_match_flexible"] == 1.0
    assert extract(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "The answer: $1,200.", group_select=-1) == "$1,200."


def test_missing_field_names_file_and_line(tmp_path: Path) -> None:
    spec = _task(tmp_path, "kind: multiple_choice\n", [{"query": "q", "choices": ["a"], "gold": 0}, {"query": "q"}])
    with pytest.raises(InputError, match=r"t.jsonl:2: task 't' needs field 'choices'"):
        evaluate(FakeTarget(FakeScorer({" a": -1.0})), [str(spec)])
    spec2 = _task(
        tmp_path, 'kind: multiple_choice\ntext: "{{question}}"\n', [{"query": "q", "choices": ["a"], "gold": 0}], "u"
    )
    with pytest.raises(
        InputError, match=r"u.jsonl:1: task 'u' needs a field the record lacks \('question' is undefined\)"
    ):
        evaluate(FakeTarget(FakeScorer({" a": -1.0})), [str(spec2)])


def test_unknown_task_and_empty_subset() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'arc_eazy'. Did you mean 'arc_easy'\? Known: arc_challenge"):
        get_task("arc_eazy")
    docs = [Doc(str(i), {}) for i in range(150)]
    with pytest.raises(InputError, match="empty"):
        select_subset(docs, "tiny", 0)


def test_tiny_subset_is_fixed() -> None:
    docs = [Doc(str(i), {"i": i}) for i in range(1000)]
    a, b = select_subset(docs, "tiny", None), select_subset(list(docs), "tiny", None)
    assert len(a) == 100 and [d.where for d in a] == [d.where for d in b]
    assert [d.where for d in a][:5] == ["5", "7", "14", "16", "17"]  # pinned: the same on every machine
    assert len(select_subset(docs[:50], "tiny", None)) == 50


def test_incompatible_adapter_is_named(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    wide = save_tiny_model(tmp_path / "wide", hidden=64)
    bad = save_random_adapter(wide, tmp_path / "bad", seed=0)
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(bad),
        "--tasks",
        "arc_easy",
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 2
    assert "bad" in capsys.readouterr().err


def test_stack_scores_with_the_final_stage_and_runs_upstream_once(
    tiny_model_dir: Path, tiny_adapters: dict, tmp_path: Path, monkeypatch
) -> None:
    # Prepare
    stack = Stack.from_config(write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, tiny_adapters, max_new=4)))
    rows = [{"query": f"question {i}", "choices": ["yes", "no", "maybe"], "gold": 0} for i in range(3)]
    spec = _task(tmp_path, "kind: multiple_choice\n", rows)
    calls = []
    original = stack.run_batch
    monkeypatch.setattr(stack, "run_batch", lambda texts, **kw: calls.append(list(texts)) or original(texts, **kw))
    target = StackTarget(stack)
    # Execute
    res = evaluate(target, [str(spec)], batch_size=4)
    # Assert: one upstream run for the 3 questions (not 9 = one per choice), scored under the final adapter
    assert calls == [sorted(r["query"] for r in rows)]
    assert res["tasks"]["t"]["n"] == 3 and res["target"]["kind"] == "stack"
    values = {"input": "question 0", **target._upstream["question 0"]}
    ctx = stack.model_input(stack.config.stages[-1], values)
    expected = Scorer(stack.model, stack.tokenizer, adapter="third").loglikelihood([(ctx, "yes")])[0][0]
    prepared, delimiter = target.prepare(["question 0"], " ")
    assert prepared == [ctx] and delimiter == ""  # the chat template ends the prompt; no space before a choice
    got = target.scorer(4).loglikelihood([(prepared[0], delimiter + "yes")])[0][0]
    assert got == pytest.approx(expected, abs=1e-4)  # the engine scores (its logits equal transformers to 1e-4)
    base_ll = Scorer(stack.model, stack.tokenizer, adapter="__base__").loglikelihood([(ctx, "yes")])[0][0]
    assert abs(base_ll - expected) > 1e-4  # the final stage's adapter really is in play


def test_perplexity_matches_lm_eval_rolling(tiny_model_dir: Path) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    text = "the quick brown fox jumps over the lazy dog. " * 6  # 270 chars: several 64-token windows
    ours, n_tokens = Scorer(lm.model, lm.tokenizer, max_length=64).loglikelihood_rolling(text)
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4, max_length=64)
    theirs = hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    assert n_tokens == len(text) and lm_eval
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-6)


def test_cli_eval_and_compare(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(4)]
    spec = _task(tmp_path, "kind: multiple_choice\n", rows)
    for name in ("one", "two"):
        assert (
            main(
                ["eval", "--model", str(tiny_model_dir), "--tasks", str(spec), "--out", str(tmp_path / f"{name}.json")]
            )
            == 0
        )
    result = json.loads((tmp_path / "one.json").read_text())
    assert set(result["cost"]) >= {
        "parameters",
        "tokens_processed",
        "wall_seconds",
        "tokens_per_second",
        "peak_rss_mb",
    }
    report = (tmp_path / "one.md").read_text().split("\n")
    assert result["tasks"]["t"]["spec_hash"] and report[0] == "<!-- slmstack eval results -->"
    assert report[1].startswith("| task |")
    capsys.readouterr()
    assert (
        main(["compare", str(tmp_path / "one.json"), str(tmp_path / "two.json"), "--png", str(tmp_path / "c.png")])
        == 0
    )
    out = capsys.readouterr().out
    assert "| t | acc_norm |" in out and (tmp_path / "c.png").stat().st_size > 1000
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--tasks",
                str(spec),
                "--limit",
                "0",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
