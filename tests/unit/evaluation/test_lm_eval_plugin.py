"""lm-eval drives slmstack through the registered `slmstack` model, for a model and for a stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import stack_dict, write_yaml
from tests.unit.evaluation.test_lm_eval_crosscheck import _write_task

pytest.importorskip("lm_eval")


def test_plugin_model_equals_hf_and_stack_runs(tiny_model_dir: Path, tiny_adapters: dict, tmp_path: Path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import slmstack.evaluation.lm_eval_plugin  # noqa: F401  (registers "slmstack")
    from slmstack.models import load_model

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _write_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    # A plain model through the plugin gives lm-eval's own hf numbers.
    ours = simple_evaluate(
        model="slmstack", model_args=f"model={tiny_model_dir}", tasks=["tiny_mc"], task_manager=manager
    )
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    hf = simple_evaluate(
        model=HFLM(pretrained=lm.model, tokenizer=lm.tokenizer), tasks=["tiny_mc"], task_manager=manager
    )
    assert ours["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]
    assert ours["results"]["tiny_mc"]["acc_norm,none"] == hf["results"]["tiny_mc"]["acc_norm,none"]
    # A stack: lm-eval's requests are answered by the final stage after the upstream stages.
    stack = write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, tiny_adapters, max_new=3))
    res = simple_evaluate(model="slmstack", model_args=f"stack={stack},batch_size=8", tasks=["tiny_mc"],
                          task_manager=manager, log_samples=True)  # fmt: skip
    assert 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert len(res["samples"]["tiny_mc"]) == 12
