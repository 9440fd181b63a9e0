"""Our log-likelihoods, acc and acc_norm equal lm-eval's `hf` model on the same local task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from slmstack.evaluation.harness import evaluate
from slmstack.evaluation.scorer import Scorer
from slmstack.evaluation.targets import ModelTarget
from slmstack.models import load_model

lm_eval = pytest.importorskip("lm_eval")


def _write_task(tmp_path: Path) -> tuple[Path, list[dict]]:
    rng = random.Random(0)
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "stone", "a long answer here", "no"]
    docs = [{"query": f"Question: what is {rng.choice(words)} and {rng.choice(words)}?",
             "choices": rng.sample(words, 4), "gold": rng.randrange(4)} for _ in range(12)]  # fmt: skip
    data = tmp_path / "data" / "tiny_mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    ours = tmp_path / "ours.yaml"
    ours.write_text(f'name: tiny_mc\nkind: multiple_choice\ndata_file: {data}\ntext: "{{{{query}}}}\\nAnswer:"\n')
    return ours, docs


def test_matches_lm_eval_hf_model(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # Prepare
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    our_task, docs = _write_task(tmp_path)
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    # Execute: lm-eval's hf model on its custom task, and ours on the same file
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    theirs = simple_evaluate(model=hflm, tasks=["tiny_mc"], task_manager=manager, log_samples=True)
    ours = evaluate(ModelTarget(lm), [str(our_task)], batch_size=3)
    # Assert: per-choice log-likelihoods to 1e-5, accuracies exactly
    samples = sorted(theirs["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=5)
    for sample, doc in zip(samples, docs, strict=True):
        pairs = [(doc["query"] + "\nAnswer:", " " + c) for c in doc["choices"]]
        mine = [ll for ll, _ in scorer.loglikelihood(pairs)]
        expected = [float(r[0][0]) for r in sample["resps"]]
        # fp32 sums of ~100 nats differ by a few ulps (~8e-6 each) with the batch layout: relative 1e-6
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(expected), atol=1e-5, rtol=1e-6)
    assert ours["tasks"]["tiny_mc"]["acc"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert ours["tasks"]["tiny_mc"]["acc_norm"] == theirs["results"]["tiny_mc"]["acc_norm,none"]
    torch.testing.assert_close(ours["tasks"]["tiny_mc"]["acc_stderr"], theirs["results"]["tiny_mc"]["acc_stderr,none"])


def test_shared_context_cache_equals_plain_batches(tiny_model_dir: Path) -> None:
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=2)
    pairs = [("Question: hi?\nAnswer:", " " + c) for c in ["yes", "no", "maybe so", "a"]] + [("other", " x")]
    shared = scorer.loglikelihood(pairs)
    plain = [scorer.loglikelihood([p])[0] for p in pairs]  # one request at a time: no shared-context path
    torch.testing.assert_close(
        torch.tensor([s[0] for s in shared]), torch.tensor([p[0] for p in plain]), atol=1e-5, rtol=0
    )
    assert [s[1] for s in shared] == [p[1] for p in plain]
