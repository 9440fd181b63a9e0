"""The transfer grid end to end on tiny random models (causal and seq2seq), leakage in training, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slmstack.cli import main
from slmstack.transfer.config import load_transfer_config
from slmstack.transfer.lm import TransferModel
from slmstack.transfer.run import prepare_grid, transfer


def _study(tmp_path: Path, model: Path, collection: Path, **extra) -> Path:
    body = {"model": str(model), "collection": {"name": "yaml", "path": str(collection)},
            "splits": [{"name": "colour", "heldout": ["is_red"]}],
            "modes": ["off_the_shelf", "general", "in_domain", "general_in_domain"], "instructions": [True, False],
            "few_shot": [2], "seeds": [0],
            "train": {"steps": 2, "few_shot_steps": 1, "batch_size": 2, "per_task_train": 6, "max_length": 48},
            "eval": {"examples": 4, "pool": 6, "max_new_tokens": 3}, **extra}  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_a_two_task_grid_runs_end_to_end(kind, tiny_model_dir, tiny_bart_dir, collection, tmp_path, monkeypatch):
    model = tiny_model_dir if kind == "causal" else tiny_bart_dir
    # Prepare: record every training prompt, to check no held-out test example is ever trained on
    seen: list[str] = []
    original = TransferModel.train

    def train(self, pairs, *args, **kwargs):
        seen.extend(p for p, _ in pairs)
        return original(self, pairs, *args, **kwargs)

    monkeypatch.setattr(TransferModel, "train", train)
    study = _study(tmp_path, model, collection, tasks=["is_red", "is_blue"],
                   modes=["off_the_shelf", "in_domain"])  # fmt: skip
    out = tmp_path / "out"
    # Execute
    assert main(["transfer", "--config", str(study), "--out", str(out)]) == 0
    # Assert: every output, every cell, and the comparisons the paper reports
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 2 * 2 * 2  # modes x instructions x k in {0, 2}
    assert all(0 <= c["scores"]["is_red"]["score"] <= 1 for c in results["cells"])
    labels = {r["comparison"] for r in results["summary"]["relative"]}
    assert {"in-domain MTL vs off-the-shelf", "instructions vs none (in_domain)"} <= labels
    with_instr = next(c for c in results["cells"] if c["cell"]["instructions"] and c["cell"]["k"] == 0)
    assert len(with_instr["scores"]["is_red"]["wordings"]) == 2  # both wordings of is_red scored
    for name in ("results.md", "zero_shot.png", "few_shot.png", "splits.json"):
        assert (out / name).is_file(), name
    assert "in_domain" in (out / "results.md").read_text()
    trained = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("*/train.json")]
    assert trained and all(t["tasks"] == ["is_blue"] for t in trained)  # multi-task training never sees is_red
    splits = json.loads((out / "splits.json").read_text())[0]
    grid = prepare_grid(load_transfer_config(study), out)
    test_inputs = {e.input for e in grid.splits["colour"].test["is_red"]}
    assert splits["heldout"] == ["is_red"] and not any(i in p for p in seen for i in test_inputs)


def test_a_killed_grid_resumes_without_redoing_finished_work(tiny_model_dir, collection, tmp_path, monkeypatch):
    from slmstack.transfer import grid as grid_module

    cfg = load_transfer_config(_study(tmp_path, tiny_model_dir, collection))
    out = tmp_path / "out"
    # Prepare: the run is killed while its sixth cell runs (after one multi-task checkpoint was trained)
    calls = {"cells": 0, "train": 0}
    run_cell, train = grid_module.Grid.run_cell, TransferModel.train

    def dying(self, cell):
        if not self.cell_path(cell).is_file():
            calls["cells"] += 1
            if calls["cells"] == 6:
                raise KeyboardInterrupt
        return run_cell(self, cell)

    def counting(self, *args, **kwargs):
        calls["train"] += 1
        return train(self, *args, **kwargs)

    monkeypatch.setattr(grid_module.Grid, "run_cell", dying)
    monkeypatch.setattr(TransferModel, "train", counting)
    with pytest.raises(KeyboardInterrupt):
        transfer(cfg, out)
    done = sorted(p.name for p in (out / "cells").glob("*.json"))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "train.json").is_file())
    assert len(done) == 5 and len(checkpoints) == 1
    # Execute: resume
    monkeypatch.setattr(grid_module.Grid, "run_cell", run_cell)
    calls["train"] = 0
    summary = transfer(cfg, out)
    # Assert: finished cells and checkpoints were reused, the rest ran, and the report covers every cell
    grid = prepare_grid(cfg, out)
    assert len(list((out / "cells").glob("*.json"))) == len(grid.cells) == 4 * 2 * 2
    assert all(json.loads((out / "cells" / n).read_text()) for n in done)
    assert set(checkpoints) <= {p.name for p in (out / "checkpoints").iterdir()}
    mtl_left = 6 - len(checkpoints)  # 3 trained modes x 2 instruction settings
    few_shot_left = sum(1 for c in grid.cells if c.k and c.id + ".json" not in done)  # one held-out task each
    assert calls["train"] == mtl_left + few_shot_left
    assert {r["mode"] for r in summary["rows"]} == {"off_the_shelf", "general", "in_domain", "general_in_domain"}


def test_label_scores_through_the_harness_scorer_equal_a_plain_forward(tiny_model_dir) -> None:
    model = TransferModel(str(tiny_model_dir), 64)
    pairs = [(p, label) for p in ("say red", "blue sky") for label in ("yes", "no")]
    plain = model._logprobs(pairs)  # one forward per (prompt, label), log-softmax gathered by hand
    best = model.choose(["say red", "blue sky"], ["yes", "no"])
    expected = ["yes" if plain[2 * i] >= plain[2 * i + 1] else "no" for i in range(2)]
    assert best == expected
    from slmstack.evaluation.scorer import Scorer, _Request

    requests = []
    for i, (p, label) in enumerate(pairs):
        ex = model.features(p, label)
        requests.append(_Request(i, ex.input_ids[: -ex.n_targets], ex.input_ids[-ex.n_targets :]))
    shared = [ll for ll, _ in Scorer(model.model, model.tokenizer, max_length=64).loglikelihood_tokens(requests)]
    assert shared == pytest.approx(plain, abs=1e-4)


def test_the_ray_executor_runs_the_same_cells(tiny_model_dir, collection, tmp_path) -> None:
    pytest.importorskip("ray")
    import ray

    study = _study(tmp_path, tiny_model_dir, collection, modes=["general", "general_in_domain"], instructions=[True],
                   few_shot=[])  # fmt: skip
    cfg = load_transfer_config(study)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = transfer(cfg, tmp_path / "ray", executor="ray")
    finally:
        ray.shutdown()
    local = transfer(cfg, tmp_path / "local")
    assert [r["mode"] for r in summary["rows"]] == [r["mode"] for r in local["rows"]]
    # same seeds, same data, same checkpoints: the scores agree wherever they ran
    assert [r["average"]["mean"] for r in summary["rows"]] == pytest.approx([r["average"]["mean"] for r in
                                                                             local["rows"]])  # fmt: skip
