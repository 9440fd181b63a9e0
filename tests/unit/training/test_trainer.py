from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slmstack.training.checkpoint as checkpoint
from slmstack.errors import ConfigError, InputError
from slmstack.stack.config import load_stack_config
from slmstack.stack.runtime import Stack
from slmstack.training.trainer import TrainConfig, train_stack
from tests.conftest import stack_dict, write_yaml

WORDS = ["cat", "dog", "sun", "moon", "tree", "rock", "bird", "fish", "star", "rain", "wind", "snow"]


@pytest.fixture()
def setup(tiny_model_dir: Path, tmp_path: Path):
    stack = load_stack_config(write_yaml(tmp_path / "stack.yaml", stack_dict(tiny_model_dir)))
    data = tmp_path / "data"
    data.mkdir()
    for stage in stack.stages:
        rows = [{"id": w, "prompt": f"say {w}", "completion": f"{w} {w} {w}."} for w in WORDS]
        (data / f"{stage.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stack, data


def _metrics(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_runnable_stack(setup, tmp_path: Path) -> None:
    # Prepare
    stack, data = setup
    cfg = TrainConfig(max_steps=30, lr=1e-2, batch_size=4, dropout=0.0, eval_fraction=0.25, checkpoint_every=10)
    # Execute
    trained = train_stack(stack, data, tmp_path / "out", cfg, stages=["first", "third"])
    # Assert: loss falls on the tiny dataset
    losses = [r["loss"] for r in _metrics(tmp_path / "out", "first") if "loss" in r]
    assert len(losses) == 30 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    final = _metrics(tmp_path / "out", "first")[-1]
    assert final["final"] and final["eval_loss"] is not None
    assert (tmp_path / "out" / "first" / "loss.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "second").exists()
    # The new stack points at the adapters and runs; "second" stays the bare base.
    result = Stack.from_config(trained)("say cat")
    assert [t.adapter for t in result.trace] == ["first", None, "third"]


def test_resumed_run_ends_with_the_same_weights(setup, tmp_path: Path) -> None:
    stack, data = setup
    cfg = TrainConfig(max_steps=6, lr=5e-3, batch_size=4, dropout=0.1, checkpoint_every=3, eval_fraction=0.0)
    # Uninterrupted reference run
    train_stack(stack, data, tmp_path / "a", cfg, stages=["first"])

    # Interrupted after step 3 (its checkpoint is written), then resumed
    def kill_at_3(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_stack(stack, data, tmp_path / "b", cfg, stages=["first"], on_step=kill_at_3)
    assert not (tmp_path / "b" / "first" / "adapter").exists()
    train_stack(stack, data, tmp_path / "b", cfg, stages=["first"], resume=True)
    # Assert: bit-identical adapters, and one metrics row per step
    a = load_file(str(tmp_path / "a" / "first" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "first" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _metrics(tmp_path / "b", "first") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_failure_mid_checkpoint_keeps_the_previous_one(setup, tmp_path: Path, monkeypatch) -> None:
    stack, data = setup
    cfg = TrainConfig(max_steps=6, batch_size=4, checkpoint_every=2, eval_fraction=0.0)
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def disk_full_on_second_checkpoint(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint 2 writes adapter (call 3) and optimizer (call 4)
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_on_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        train_stack(stack, data, tmp_path / "out", cfg, stages=["first"])
    root = tmp_path / "out" / "first" / "checkpoints"
    assert (root / "latest").read_text() == "step-000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    assert checkpoint.load_latest(root).step == 2
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    train_stack(stack, data, tmp_path / "out", cfg, stages=["first"], resume=True)
    assert (tmp_path / "out" / "first" / "adapter" / "adapter_model.safetensors").is_file()


def test_output_dir_of_another_run_is_refused(setup, tmp_path: Path) -> None:
    stack, data = setup
    cfg = TrainConfig(max_steps=1, batch_size=4)
    train_stack(stack, data, tmp_path / "out", cfg, stages=["first"])
    with pytest.raises(ConfigError, match="different training run"):
        train_stack(stack, data, tmp_path / "out", TrainConfig(max_steps=2, batch_size=4), stages=["first"])
    with pytest.raises(ConfigError, match="Pass --resume"):
        train_stack(stack, data, tmp_path / "out", cfg, stages=["first"])
    train_stack(
        stack, data, tmp_path / "out", TrainConfig(max_steps=2, batch_size=4), stages=["first"], overwrite=True
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite replaces a run of ours, never a folder of the user's
        with pytest.raises(InputError, match="not empty and was not written by slmstack train"):
            train_stack(stack, data, tmp_path / "other", cfg, overwrite=overwrite)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_bad_training_data_is_named(setup, tmp_path: Path) -> None:
    stack, data = setup
    (data / "first.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    with pytest.raises(Exception, match=r"first.jsonl:2: missing text field 'completion'"):
        train_stack(stack, data, tmp_path / "out", TrainConfig(max_steps=1), stages=["first"])
    with pytest.raises(ValueError, match="must be >= 1"):
        TrainConfig(batch_size=0)


def test_checkpoint_round_trips_optimizer_state(tmp_path: Path) -> None:
    # Prepare: one AdamW step on a tiny parameter
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    p.grad = torch.tensor([0.5, 0.25])
    opt.step()
    sched.step()
    # Execute
    checkpoint.save_checkpoint(tmp_path, 1, {"w": p.detach()}, opt, sched, {"tokens": 7})
    ck = checkpoint.load_latest(tmp_path)
    # Assert: Adam moments after one step are (1-beta1)*g and (1-beta2)*g^2
    state = ck.optimizer["state"][0]
    torch.testing.assert_close(state["exp_avg"], torch.tensor([0.05, 0.025]))
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor([0.00025, 0.0000625]))
    assert ck.step == 1 and ck.extra == {"tokens": 7} and torch.equal(ck.adapter["w"], p.detach())
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*pickle*"))


def test_target_only_loss_equals_the_full_logits_loss(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slmstack.training.train_data import collate, tokenize_example
    from slmstack.training.trainer import _masked_loss
    from tests.conftest import build_tokenizer

    # Prepare
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = build_tokenizer()
    rows = [tokenize_example(tok, "r", p, c, 64, chat=True) for p, c in [("hello", "abc"), ("a much longer one", "x")]]
    batch = collate(rows, tok.pad_token_id)
    # Execute
    ours, n = _masked_loss(model, batch)
    reference = model(**batch).loss  # transformers' shifted mean over all labelled positions
    # Assert
    assert n == sum(r.n_targets for r in rows) == 6  # "abc" + EOS, "x" + EOS
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_nan_loss_stops_training_with_exit_2_and_keeps_the_last_checkpoint(setup, tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:  # fmt: skip
    from slmstack.cli import main
    from slmstack.training import trainer

    # Prepare: the loss turns NaN at the 5th forward (step 5); a checkpoint is written every 2 steps
    stack, data = setup
    real, calls = trainer._masked_loss, {"n": 0}

    def nan_at_step_5(model, batch, precision="fp32"):
        loss, n = real(model, batch, precision)
        calls["n"] += 1
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(trainer, "_masked_loss", nan_at_step_5)
    cfg = write_yaml(tmp_path / "train.yaml", {"max_steps": 8, "batch_size": 4, "checkpoint_every": 2,
                                               "eval_fraction": 0.0})  # fmt: skip
    out = tmp_path / "out"
    # Execute
    code = main(["train", "--stack", str(stack.source), "--data", str(data), "--out", str(out), "--stages", "first",
                 "--config", str(cfg)])  # fmt: skip
    # Assert: exit 2, one line naming the stage, the step and a cause; checkpoint 4 kept; no adapter, no done
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and "Traceback" not in stderr, stderr
    assert "stage 'first'" in err[0] and "loss became nan at step 5" in err[0] and "Likely cause" in err[0]
    assert "checkpoint (step 4) is kept" in err[0]
    assert (out / "first" / "checkpoints" / "latest").read_text() == "step-000004"
    assert not (out / "first" / "adapter").exists() and not (out / "first" / "done.json").exists()


def test_rng_state_round_trips_and_a_cuda_checkpoint_is_refused_without_cuda(tmp_path: Path) -> None:
    # Prepare: a checkpoint of a run on one CUDA device (its generator state is just bytes here)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(3)
    checkpoint.save_checkpoint(tmp_path, 1, {"w": p.detach()}, opt, sched, {})
    expected = torch.rand(3)  # what the next draw was when the checkpoint was taken
    # Execute / Assert: restoring puts the CPU generator back exactly
    ck = checkpoint.load_latest(tmp_path)
    torch.rand(5)
    checkpoint.restore_rng(ck.rng)
    assert torch.equal(torch.rand(3), expected)
    if not torch.cuda.is_available():
        from slmstack.errors import InputError

        with pytest.raises(InputError, match="written on 1 CUDA device"):
            checkpoint.restore_rng({**ck.rng, "__rng_cuda0__": torch.zeros(16, dtype=torch.uint8)})
