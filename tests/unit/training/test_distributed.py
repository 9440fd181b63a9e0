"""``slmstack train`` under torchrun: 2 processes (gloo, CPU) give one process's adapter; only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import stack_dict, write_yaml

WORDS = ["cat", "dog", "sun", "moon", "tree", "rock", "bird", "fish", "star", "rain", "wind", "snow"]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")


def _train(argv: list[str], procs: int) -> subprocess.CompletedProcess:
    slmstack = shutil.which("slmstack", path=str(Path(sys.executable).parent))
    cmd = [slmstack, *argv] if procs == 1 else [
        TORCHRUN, "--standalone", "--nproc_per_node", str(procs), slmstack, *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _setup(tmp_path: Path, model: Path, steps: int) -> list[str]:
    """A one-stage training run's argv (no --out): 12 rows of different lengths, so each process's share of a batch
    has its own token count."""
    stack = write_yaml(tmp_path / "stack.yaml", stack_dict(model))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"say {w}", "completion": f"{w} " * (1 + i % 4) + "."} for i, w in enumerate(WORDS)]
    (data / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["train", "--stack", str(stack), "--data", str(data), "--stages", "first", "--max-steps", str(steps),
            "--batch-size", "4", "--lr", "1e-2", "--dropout", "0", "--eval-fraction", "0", "--precision", "fp32",
            "--checkpoint-every", "2"]  # fmt: skip


def test_two_processes_train_the_adapter_one_process_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = _setup(tmp_path, tiny_model_dir, 4)
    # Execute: one process, then two under torchrun, at the same global batch
    one = _train([*common, "--out", str(tmp_path / "one")], 1)
    two = _train([*common, "--out", str(tmp_path / "two")], 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    # Assert: the adapters agree to float tolerance, and training moved them
    a = load_file(str(tmp_path / "one" / "first" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "first" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    assert any(float(t.abs().max()) > 1e-3 for k, t in a.items() if "lora_B" in k)
    # the step losses are the whole batch's on both; rank 0 alone wrote: one row per step, one set of files
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "first" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two" / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        if "loss" in r1:
            assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-4) and r2["tokens"] == r1["tokens"]
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file()) == files


def test_a_killed_two_process_run_resumes_to_the_same_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    import signal
    import time

    common = _setup(tmp_path, tiny_model_dir, 24)
    whole = _train([*common, "--out", str(tmp_path / "whole")], 2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # the same run, killed (every process) once its first checkpoint is written, then resumed
    slmstack = shutil.which("slmstack", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2", slmstack, *common, "--out",
                             str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)  # fmt: skip
    latest = tmp_path / "cut" / "first" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert killed_at < 24 and not (tmp_path / "cut" / "first" / "adapter").exists(), "the run ended before the kill"
    again = _train([*common, "--out", str(tmp_path / "cut"), "--resume"], 2)
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "first" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "first" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_a_batch_smaller_than_the_processes_is_one_line() -> None:
    from slmstack.errors import ConfigError
    from slmstack.training.distributed import Processes

    assert Processes(1, 2, 1).shard([10, 11, 12, 13, 14]) == [11, 13]  # rows rank::world
    with pytest.raises(ConfigError, match="cannot be split over 2 processes; raise batch_size to at least 2"):
        Processes(0, 2, 0).shard([10])
