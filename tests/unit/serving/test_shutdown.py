"""SIGTERM and SIGINT stop a serving process within 5 s, even with a batch in flight, whose client gets a 503."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from tests.conftest import write_yaml  # noqa: E402
from tests.unit.serving.conftest import free_port  # noqa: E402


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_and_answers_the_request_in_flight(sig, tiny_model_dir: Path, tmp_path: Path):
    # Prepare: a model whose final norm is zero, so every logit is 0 and greedy decoding repeats token 0 (not
    # EOS): four stages of 1000 new tokens each cannot finish on their own before the signal
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.model.norm.weight.data.zero_()
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    stage = {"template": "{input}", "generation": {"max_new_tokens": 1000}}
    stages = [{"name": name, **stage} for name in ("one", "two", "three", "four")]
    stack = write_yaml(tmp_path / "long.yaml", {"name": "long", "model": str(tmp_path / "model"), "stages": stages})
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = ["serve", "--stack", str(stack), "--port", str(port)]
    code = f"import sys; from slmstack.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.1)
        replies: list = []

        def ask() -> None:
            body = {"model": "long", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000}
            try:
                replies.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60))
            except httpx.HTTPError as exc:
                replies.append(exc)

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(1.0)
        assert not replies, "the request finished before the signal: make its stage longer"
        # Execute
        start = time.perf_counter()
        proc.send_signal(sig)
        proc.wait(timeout=10)
        stopped = time.perf_counter() - start
        thread.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: gone within 5 s, and the client in flight got an error answer, not a hang
    assert stopped < 5, f"took {stopped:.1f}s: {proc.stdout.read().decode()[-2000:]}"
    reply = replies[0]
    assert isinstance(reply, httpx.Response) and reply.status_code == 503, reply
    assert "shutting down" in reply.json()["error"]["message"]
