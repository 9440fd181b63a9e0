"""lm-eval's own OpenAI-compatible client (``local-completions``) against ``slmstack serve`` on the default model:
50 arc_easy items, accuracy equal to ``slmstack eval --model default`` on the same items. Marked slow; reads
``../shared/data/arc_easy``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.needs_data("arc_easy")]
pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
LIMIT = 50


def test_lm_eval_scores_the_served_default_model_as_slmstack_eval_does(tmp_path: Path, monkeypatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from slmstack.evaluation.harness import evaluate
    from slmstack.evaluation.targets import ModelTarget
    from slmstack.models import load_model, model_folder
    from slmstack.serving.server import load_stacks
    from slmstack.serving.settings import ServeSettings
    from tests.unit.evaluation.test_lm_eval_tasks import lm_eval_task
    from tests.unit.serving.conftest import free_port, start_server

    if "SLMSTACK_TEST_REAL_CACHE" not in __import__("os").environ:
        monkeypatch.setenv("SLMSTACK_CACHE", str(tmp_path / "cache"))
    # slmstack eval's number on the first 50 items
    ours = evaluate(ModelTarget(load_model("default", device="cpu", dtype="float32")), ["arc_easy"],
                    data_dir=SHARED_DATA, limit=LIMIT)  # fmt: skip
    # lm-eval's own arc_easy task on the same records, through its own client, against the server
    stacks = load_stacks([], ["base=default"])
    settings = ServeSettings(port=free_port(), max_prompt_tokens=2048)
    server, thread, _ = start_server(stacks, settings)
    try:
        client = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{settings.port}/v1/completions", model="base",
                                     tokenizer=str(model_folder("default")), tokenizer_backend="huggingface",
                                     max_retries=1)  # fmt: skip
        task = lm_eval_task("arc_easy", SHARED_DATA, LIMIT, tmp_path)
        theirs = simple_evaluate(model=client, tasks=[task], limit=LIMIT)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    result = theirs["results"]["arc_easy"]
    print(
        f"arc_easy, {LIMIT} items: lm-eval via the server acc {result['acc,none']}, slmstack eval "
        f"{ours['tasks']['arc_easy']['acc']}"
    )
    assert ours["tasks"]["arc_easy"]["n"] == LIMIT
    assert result["acc,none"] == ours["tasks"]["arc_easy"]["acc"]
    assert result["acc_norm,none"] == ours["tasks"]["arc_easy"]["acc_norm"]
