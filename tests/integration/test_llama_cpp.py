"""A real llama.cpp: the default GGUF plus an adapter exported with ``gguf-lora``, driven by the llamacpp backend.

Needs ``llama-server`` (on PATH, or ``SLMSTACK_LLAMA_SERVER`` naming it: build it from llama.cpp's source, e.g. the
copy vendored in llama-cpp-python's sdist, ``cmake --build build --target llama-server``); skipped without it.
Two servers: A with the adapter loaded by ``--lora`` at llama.cpp's default global scale 1 (the setting under
which a backend that sends no ``lora`` field runs every stage under every adapter), B with no adapter.
Marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

SERVER = os.environ.get("SLMSTACK_LLAMA_SERVER") or shutil.which("llama-server")
PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
           "What do bees make?", "How many legs does a spider have?"]  # fmt: skip
TOKENS = 24


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(gguf: str, loras: list[Path]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # --no-cache-prompt: every request computes its whole prompt, so two requests with one prompt get one text (with
    # the cache on, a prompt whose prefix is cached is computed in other chunks, which moves near-ties)
    argv = [
        SERVER,
        "-m",
        gguf,
        "--port",
        str(port),
        "-c",
        "2048",
        "-t",
        "2",
        "--no-webui",
        "-np",
        "1",
        "--no-cache-prompt",
    ]
    for lora in loras:
        argv += ["--lora", str(lora)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("llama-server did not start")


def _chat(url: str, prompt: str, **extra) -> str:
    body = {"messages": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": prompt}],
            "max_tokens": TOKENS, "temperature": 0.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "top_p": 1.0,
            "repeat_penalty": 1.0, "repeat_last_n": 2048, "seed": 0, **extra}  # fmt: skip
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"].strip()


@pytest.mark.skipif(SERVER is None, reason="llama-server is not installed (set SLMSTACK_LLAMA_SERVER)")
def test_llama_cpp_runs_each_stage_under_its_own_adapter_only(tmp_path: Path, monkeypatch) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from slmstack.export import export_stack
    from slmstack.models import default_gguf_path, load_model, model_folder
    from slmstack.stack.config import load_stack_config
    from slmstack.stack.runtime import Stack
    from tests.conftest import write_yaml

    monkeypatch.setenv("SLMSTACK_CACHE", os.environ.get("SLMSTACK_TEST_CACHE", str(tmp_path / "cache")))
    # Prepare: an adapter on the default model (small random factors: it changes the text, the text stays fluent)
    lm = load_model("default", device="cpu", dtype="float32")
    torch.manual_seed(0)
    peft = get_peft_model(
        lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft.save_pretrained(tmp_path / "adapter")
    stages = [{"name": "tuned", "role": "You answer briefly.", "template": "{input}",
               "adapter": str(tmp_path / "adapter"), "generation": {"max_new_tokens": TOKENS}},
              {"name": "bare", "role": "You answer briefly.", "template": "{input}",
               "generation": {"max_new_tokens": TOKENS}}]  # fmt: skip
    stack_file = write_yaml(tmp_path / "stack.yaml", {"name": "two", "model": "default", "stages": stages})
    config = load_stack_config(stack_file)
    export_stack(config, "gguf-lora", tmp_path / "export")
    gguf = str(default_gguf_path())
    assert model_folder("default") is not None
    a, url_a = _start(gguf, [tmp_path / "export" / "tuned.gguf"])
    b, url_b = _start(gguf, [])
    try:
        # Execute: each stage alone through the llamacpp backend (server A), and the references
        remote = load_stack_config(tmp_path / "export" / "stack.yaml")
        remote.backend.url = f"{url_a}/v1"
        for stage in remote.stages:
            stage.generation.max_new_tokens = TOKENS
        runs = [Stack(remote)(p).outputs for p in PROMPTS]  # both stages read the input, in one stack
        tuned, bare = [r["tuned"] for r in runs], [r["bare"] for r in runs]
        global_scale = [_chat(url_a, p) for p in PROMPTS]  # no lora field: the adapter at its global scale 1
        no_adapter = [_chat(url_b, p) for p in PROMPTS]
        local = [Stack(config)(p).outputs for p in PROMPTS]
        engine, engine_bare = [r["tuned"] for r in local], [r["bare"] for r in local]
    finally:
        a.kill()
        b.kill()
    # Assert: the bare stage is untouched by the loaded adapter; the adapted stage runs under it
    assert bare == no_adapter
    assert tuned == global_scale
    assert tuned != bare  # the adapter does change the text
    # against slmstack's own engine (Q4_1 base weights on both sides; llama.cpp also rounds activations to 8 bits):
    # the first 3 words agree on every prompt, with the adapter and without (4 to 22 of 24-token answers here)
    agree = [_words(x, y) for x, y in zip(tuned + bare, engine + engine_bare, strict=True)]
    print("llama.cpp vs slmstack engine, words in common per prompt (adapter, then bare):", agree)
    assert min(agree) >= 3, list(zip(tuned + bare, engine + engine_bare, strict=True))


def _words(x: str, y: str) -> int:
    n = 0
    for a, b in zip(x.split(), y.split(), strict=False):
        if a != b:
            break
        n += 1
    return n
