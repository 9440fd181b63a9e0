"""A real Flower simulation with a tiny random llama: 3 clients x 2 rounds, outputs, faults, resume, messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

from slmstack.cli import main  # noqa: E402
from slmstack.federated.config import load_federate_config  # noqa: E402
from slmstack.federated.data import partition_records  # noqa: E402
from slmstack.federated.run import federate, prepare  # noqa: E402

WORDS = ["red", "blue", "cat", "dog", "sun", "rain"]


def _config(tmp_path: Path, model: Path, **extra) -> Path:
    rows = [{"prompt": f"say {w} {i}", "completion": f"{w} {w}.", "category": "abc"[i % 3], "task": f"t{i % 4}"}
            for i, w in enumerate(WORDS * 6)]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {"model": str(model), "rounds": 2, "strategy": "lego",
            "clients": [{"sparsity": 0.0}, {"sparsity": 0.5}, {"sparsity": 0.25}],
            "data": {"path": str(data), "partition": "dirichlet", "column": "category", "alpha": 0.5},
            "train": {"steps": 2, "batch_size": 4, "rank": 4, "alpha": 8, "max_length": 64}, **extra}  # fmt: skip
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    out = root / "out"
    assert main(["federate", "--config", str(_config(root, tiny_model_dir)), "--out", str(out)]) == 0
    return out


def test_simulation_writes_every_output(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["strategy"] == "lego" and metrics["full_model_bytes"] > 0
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for r in metrics["rounds"][1:]:
        assert set(r) >= {"round", "eval_loss", "client_eval_loss", "bytes_up", "bytes_down", "clients_ok",
                          "clients_failed", "seconds"}  # fmt: skip
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0 and set(r["client_eval_loss"]) == {"0", "1", "2"}
        assert 0 < r["bytes_up"] < metrics["full_model_bytes"]
    for path in (
        "global_adapter/adapter_model.safetensors",
        "global_adapter/adapter_config.json",
        "clients/0/adapter/adapter_model.safetensors",
        "clients/2/adapter/adapter_model.safetensors",
        "recombined_stack.yaml",
        "metrics.png",
        "partitions.png",
        "blocks/client_1/masks.safetensors",
    ):
        assert (finished_run / path).is_file(), path  # fmt: skip


def test_global_adapter_runs_in_eval_and_as_a_stack(finished_run: Path, tiny_model_dir: Path, tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"query": "say red", "choices": ["red", "blue"], "gold": 0}\n')
    task = tmp_path / "t.yaml"
    task.write_text(f"name: t\nkind: multiple_choice\ndata_file: {data}\n")
    argv = ["eval", "--model", str(tiny_model_dir), "--adapter", str(finished_run / "global_adapter"), "--tasks",
            str(task), "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["target"]["adapter"]
    capsys.readouterr()
    assert main(["run", "--stack", str(finished_run / "recombined_stack.yaml"), "--json",
                 "--set", "stages.0.generation.max_new_tokens=3", "say red"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["trace"][0]["adapter"] == "answer" and out["answer"]


def test_a_failing_client_is_counted_and_the_round_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_federate_config(_config(tmp_path, tiny_model_dir, rounds=1))
    out = tmp_path / "out"
    prepare(cfg, out)
    (out / "partitions" / "client_2.jsonl").write_text('{"prompt": "broken"\n')  # client 2 raises on its data
    metrics = federate(cfg, out, resume=True)
    last = metrics["rounds"][-1]
    assert last["clients_ok"] == 2 and last["clients_failed"] == 1
    assert set(last["client_eval_loss"]) == {"0", "1"}


def test_resume_continues_after_the_last_finished_round(finished_run: Path, tiny_model_dir: Path) -> None:
    plan = json.loads((finished_run / "plan.json").read_text())
    history = json.loads((finished_run / "checkpoint" / "history.json").read_text())
    assert plan["rounds"] == 2 and [h["round"] for h in history] == [0, 1, 2]
    cfg = load_federate_config(_config(finished_run.parent, tiny_model_dir), ["rounds=2"])
    again = federate(cfg, finished_run, resume=True)  # nothing left to do: the rounds are not rerun
    assert [r["seconds"] for r in again["rounds"][1:]] == [h["seconds"] for h in history[1:]]


def test_a_client_sends_only_its_lora_update_count_and_metrics(finished_run: Path) -> None:
    from slmstack.federated.client_app import build_client_app
    from slmstack.federated.outputs import load_checkpoint

    # Prepare: the global adapter as the server sends it, to client 1
    state, _ = load_checkpoint(finished_run)
    app = build_client_app(str(finished_run))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 3})}), 7, "train")
    # Execute
    reply = app(msg, context)
    # Assert: one ArrayRecord of LoRA factors with the global adapter's names and shapes, one MetricRecord
    content = reply.content
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    assert not content.config_records
    update = content["arrays"].to_torch_state_dict()
    assert set(update) == set(state) and all(".lora_A." in k or ".lora_B." in k for k in update)
    assert all(update[k].shape == state[k].shape for k in state)
    assert set(content["metrics"]) == {"num-examples", "client-id", "train-loss"}
    partition = (finished_run / "partitions" / "client_1.jsonl").read_text().splitlines()
    assert content["metrics"]["num-examples"] == len(partition) and content["metrics"]["client-id"] == 1
    assert not torch.equal(update[next(k for k in update if ".lora_B." in k)], state[next(k for k in state
                                                                                   if ".lora_B." in k)])  # fmt: skip


@pytest.mark.parametrize("mode", ["iid", "dirichlet", "task"])
def test_partitions_are_seeded_disjoint_and_complete(mode: str) -> None:
    records = [{"prompt": str(i), "completion": "x", "category": "abcd"[i % 4]} for i in range(80)]
    parts = partition_records(records, 4, mode, "category", alpha=0.5, seed=3)
    again = partition_records(records, 4, mode, "category", alpha=0.5, seed=3)
    assert parts == again and all(parts)
    seen = [r["prompt"] for p in parts for r in p]
    assert len(seen) == len(set(seen))
    if mode == "task":
        assert all(len({r["category"] for r in p}) == 1 for p in parts)
    else:
        assert len(seen) == 80


def test_differential_privacy_clips_and_noises_through_flowers_wrapper(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    # Prepare: the same 1-round run with and without Flower's server-side fixed-clipping DP
    clients = [{"sparsity": 0.0}, {"sparsity": 0.0}]
    plain = load_federate_config(_config(tmp_path, tiny_model_dir, rounds=1, clients=clients, strategy="fedavg"))
    dp = {"enabled": True, "clipping_norm": 0.01, "noise_multiplier": 5.0}
    noisy = load_federate_config(
        _config(tmp_path, tiny_model_dir, rounds=1, clients=clients, strategy="fedavg", privacy=dp)
    )
    # Execute
    federate(plain, tmp_path / "plain")
    federate(noisy, tmp_path / "noisy")
    # Assert: the noisy global adapter differs everywhere from the plain one, and stays finite
    a = load_file(str(tmp_path / "plain" / "global_adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "noisy" / "global_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.isfinite(b[k]).all() and not torch.allclose(a[k], b[k]) for k in a)


def test_a_run_in_which_no_round_accepted_an_update_exits_2(tiny_model_dir: Path, tmp_path: Path, capsys,
                                                             monkeypatch) -> None:  # fmt: skip
    import flwr.simulation

    # Prepare: the simulation "finishes" with every update of every round rejected (as a timeout gives)
    def every_update_rejected(server_app, client_app, num_supernodes, backend_config):
        rounds = [{"round": 0, "eval_loss": 3.0}] + [
            {"round": r, "eval_loss": 3.0, "clients_ok": 0, "clients_failed": 3, "bytes_up": 0,
             "failures": ["client 0: no reply (timeout)"]} for r in (1, 2)]  # fmt: skip
        (tmp_path / "out" / "metrics.json").write_text(json.dumps({"strategy": "lego", "rounds": rounds}))

    monkeypatch.setattr(flwr.simulation, "run_simulation", every_update_rejected)
    # Execute
    code = main(["federate", "--config", str(_config(tmp_path, tiny_model_dir)), "--out", str(tmp_path / "out")])
    # Assert
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1, err
    assert "no round accepted a client update (2 round(s)" in err[0] and "no reply (timeout)" in err[0]
