"""The support matrix of docs/models.md, one test per cell: which verbs run which architecture.

Every architecture is a tiny random model built here (``tests.conftest.tiny_model``). ``MATRIX`` is the table the
page shows; the last test holds the page to it, so a cell there is never claimed without the test here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slmstack.cli import main
from tests.conftest import build_tiny_llama, build_tokenizer, stack_dict, tiny_model, write_yaml

# architecture (the tiny model's kind) -> generation path, and whether structured pruning runs it. Every row also
# trains, prunes (magnitude, wanda, sparsegpt), federates, evaluates and serves.
MATRIX = {
    "llama": ("engine", True),
    "qwen2": ("engine", True),
    "mistral-window": ("engine", False),
    "qwen3": ("engine", False),
    "gemma3": ("engine", True),
    "phi3": ("engine", False),
    "gpt_neox": ("engine", False),
    "opt": ("transformers", False),  # outside the table: its layout found by name
}
UNSTRUCTURED = ["magnitude", "wanda", "sparsegpt"]
WORDS = ["cat", "dog", "sun", "moon", "tree", "rock"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    dirs = {}
    for kind in MATRIX:
        path = root / kind
        (build_tiny_llama() if kind == "llama" else tiny_model(kind)).save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        dirs[kind] = path
    return dirs


def _rows(path: Path) -> Path:
    rows = [{"id": str(i), "prompt": f"say {w}", "completion": f"{w} {w}.", "category": "ab"[i % 2]}
            for i, w in enumerate(WORDS * 2)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", MATRIX)
def test_generation_runs_on_the_path_the_matrix_names(kind: str, model_dirs) -> None:
    from slmstack.stack.config import load_stack_config
    from slmstack.stack.runtime import Stack

    texts = {}
    for engine in ("auto", "hf"):  # the engine where the matrix says so; transformers for every architecture
        body = {**stack_dict(model_dirs[kind], max_new=4), "engine": engine}
        stack = Stack(load_stack_config(write_yaml(model_dirs[kind].parent / f"{kind}-{engine}.yaml", body)))
        result = stack("say cat")
        assert len(result.trace) == 3 and all(t.tokens_out > 0 for t in result.trace)
        assert (stack.backend.engine is not None) == (engine == "auto" and MATRIX[kind][0] == "engine")
        texts[engine] = [t.output for t in result.trace]
    assert texts["auto"] == texts["hf"]  # greedy: the same text on both paths


@pytest.mark.parametrize("kind", MATRIX)
def test_train_runs_two_steps(kind: str, model_dirs, tmp_path: Path) -> None:
    from slmstack.stack.config import load_stack_config
    from slmstack.training.trainer import TrainConfig, train_stack

    stack = load_stack_config(write_yaml(tmp_path / "stack.yaml", stack_dict(model_dirs[kind])))
    data = tmp_path / "data"
    data.mkdir()
    _rows(data / "first.jsonl")
    train_stack(stack, data, tmp_path / "out", TrainConfig(max_steps=2, batch_size=2), stages=["first"])
    metrics = [json.loads(line) for line in (tmp_path / "out" / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]


@pytest.mark.parametrize("kind", MATRIX)
def test_prune_runs_every_method(kind: str, model_dirs) -> None:
    import torch

    from slmstack.errors import ConfigError
    from slmstack.models import load_model
    from slmstack.pruning.engine import prune
    from slmstack.pruning.structured import prune_structured

    calibration = torch.randint(6, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for method in UNSTRUCTURED:
        model = load_model(str(model_dirs[kind]), device="cpu").model
        result = prune(model, method, 0.5, calibration=calibration)
        assert abs(result.report["actual_sparsity"] - 0.5) < 0.02, method
    model = load_model(str(model_dirs[kind]), device="cpu").model
    if MATRIX[kind][1]:
        small, _ = prune_structured(model, 0.5, calibration)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    else:
        with pytest.raises(ConfigError, match="structured pruning supports"):
            prune_structured(model, 0.5, calibration)


class InProcessGrid:
    """Flower's ``Grid`` as the ServerApp uses it, each message handed to the ClientApp in this process.

    The Flower runtime itself (simulation, and SuperLink + SuperNodes) is tested on one architecture in
    tests/unit/federated/; what depends on the architecture is the ClientApp (its pruned block, LoRA on it, the
    masked update) and the ServerApp (aggregation into the dense model's adapter), and both run here as they are.
    """

    def __init__(self, app, clients: int) -> None:
        from flwr.app import Context, RecordDict

        self.app = app
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(),
                                        run_config={}) for i in range(clients)}  # fmt: skip

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


@pytest.mark.parametrize("kind", MATRIX)
def test_federate_runs_a_round(kind: str, model_dirs, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from slmstack.federated.client_app import build_client_app
    from slmstack.federated.config import load_federate_config
    from slmstack.federated.run import prepare
    from slmstack.federated.server_app import run_rounds

    body = {"model": str(model_dirs[kind]), "rounds": 1, "strategy": "lego",
            "clients": [{"sparsity": 0.0}, {"sparsity": 0.5}],
            "data": {"path": str(_rows(tmp_path / "data.jsonl")), "partition": "iid"},
            "train": {"steps": 1, "batch_size": 2, "rank": 4, "alpha": 8, "max_length": 32}}  # fmt: skip
    out = tmp_path / "out"
    from flwr.common.constant import SUPERLINK_NODE_ID

    # the run, node and task the ServerApp's messages come from (Flower's runtime sets them)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    prepare(load_federate_config(write_yaml(tmp_path / "fed.yaml", body)), out)
    history = run_rounds(InProcessGrid(build_client_app(str(out)), 2), out)
    assert [h["round"] for h in history] == [0, 1] and history[1]["clients_ok"] == 2
    assert (out / "global_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind", MATRIX)
def test_eval_scores_a_task(kind: str, model_dirs, tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2})
                                              + "\n" for i in range(4)))  # fmt: skip
    task = tmp_path / "t.yaml"
    task.write_text(f"name: t\ndata_file: {tmp_path / 't.jsonl'}\nkind: multiple_choice\n")
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(model_dirs[kind]), "--tasks", str(task), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["t"]["n"] == 4


@pytest.mark.parametrize("kind", MATRIX)
def test_serve_answers_a_chat_request(kind: str, model_dirs) -> None:
    from starlette.testclient import TestClient

    from slmstack.serving.app import build_app
    from slmstack.serving.server import load_stacks
    from slmstack.serving.settings import ServeSettings

    app = build_app(load_stacks([], [f"m={model_dirs[kind]}"]), ServeSettings(max_tokens=8))
    with TestClient(app) as client:
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "say cat"}]}
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] > 0


def test_the_page_shows_this_matrix() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 9:
            rows[re.sub(r"[`*]", "", cells[0])] = cells[1:]
    assert set(rows) == set(MATRIX), sorted(rows)
    for kind, (path, structured) in MATRIX.items():
        engine, transformers, train, prune, structured_cell, federate, evaluate, serve = rows[kind]
        assert engine == ("yes" if path == "engine" else "—"), kind
        assert [transformers, train, prune, federate, evaluate, serve] == ["yes"] * 6, kind
        assert structured_cell == ("yes" if structured else "—"), kind
