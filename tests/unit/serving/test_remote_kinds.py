"""The vllm and llamacpp backend kinds against a stand-in server that records what each request carries."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from slmstack.errors import ConfigError  # noqa: E402
from slmstack.stack.config import BackendConfig, StackConfig, StageConfig  # noqa: E402
from slmstack.stack.runtime import Stack  # noqa: E402
from tests.unit.serving.conftest import free_port  # noqa: E402


class Fake:
    """vLLM or llama-server: lists models and adapters, streams 'word word ...' slowly, fails the first n calls."""

    def __init__(self, models=("base",), loras=(), fail_first: int = 0, delay: float = 0.0) -> None:
        self.calls: list[dict] = []
        self.closed = threading.Event()  # a stream's client went away before the end
        self.models, self.loras, self.fail_left, self.delay = list(models), list(loras), fail_first, delay
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}

        @app.get("/props")
        async def props():
            return {"default_generation_settings": {"n_ctx": 2048}}

        @app.get("/lora-adapters")
        async def loras():
            return [{"id": i, "path": p, "scale": 1.0} for i, p in enumerate(self.loras)]

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.calls.append(body)
            if self.fail_left:
                self.fail_left -= 1
                return JSONResponse({"error": {"message": "busy"}}, status_code=503)

            async def events():
                try:
                    for i in range(6):
                        await asyncio.sleep(self.delay)
                        choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
                        yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                    usage = {"prompt_tokens": 3, "completion_tokens": 6}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                except (asyncio.CancelledError, GeneratorExit):
                    self.closed.set()
                    raise

            return StreamingResponse(events(), media_type="text/event-stream")

        self.app = app

    def __enter__(self):
        import uvicorn

        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


STOPS = ["s1", "s2", "s3", "s4", "s5", "s6"]


def _stack(kind: str, url: str, models: dict[str, str], **generation) -> Stack:
    gen = {"max_new_tokens": 9, "stop": STOPS, "repetition_penalty": 1.3, "top_k": 7, **generation}
    stages = [StageConfig(name="first", role="r", template="{input}", generation=_settings(gen)),
              StageConfig(name="second", role="r", template="{first}", generation=_settings(gen)),
              StageConfig(name="third", role="r", template="{second}", generation=_settings(gen))]  # fmt: skip
    backend = BackendConfig(type=kind, url=url, base_model="base", models=models, retries=1)
    return Stack(StackConfig(name="s", stages=stages, backend=backend))


def _settings(gen):
    from slmstack.engine.text import GenerationSettings

    return GenerationSettings(**gen)


def test_vllm_names_every_missing_model_at_start_up() -> None:
    with Fake(models=["base", "lora-first"]) as fake:
        with pytest.raises(ConfigError, match="does not serve 'lora-third'") as err:
            _stack("vllm", fake.url, {"first": "lora-first", "third": "lora-third"})
        assert "lora-first" in str(err.value)  # what it does serve


def test_vllm_sends_top_k_every_stop_string_and_retries_a_503() -> None:
    with Fake(models=["base", "lora-first", "lora-third"], fail_first=1) as fake:
        stack = _stack("vllm", fake.url, {"first": "lora-first", "third": "lora-third"})
        result = stack("hi")
    assert result.answer == "w0 w1 w2 w3 w4 w5"
    assert len(fake.calls) == 4  # the first call answered 503 and was retried
    body = fake.calls[-1]
    assert body["stop"] == STOPS and body["top_k"] == 7 and body["repetition_penalty"] == 1.3
    assert [c["model"] for c in fake.calls[1:]] == ["lora-first", "base", "lora-third"]


def test_the_openai_kind_sends_four_stop_strings_and_no_engine_fields() -> None:
    with Fake() as fake:
        _stack("openai", fake.url, {"first": "lora-first"})("hi")
    body = fake.calls[-1]
    assert body["stop"] == STOPS[:4] and "top_k" not in body and "repetition_penalty" not in body


def test_llamacpp_sends_each_stages_lora_scales_and_pins_its_samplers() -> None:
    with Fake(loras=["/srv/first.gguf", "/srv/third.gguf"]) as fake:
        _stack("llamacpp", fake.url, {"first": "first.gguf", "third": "/srv/third.gguf"})("hi")
    loras = [c["lora"] for c in fake.calls]
    assert loras == [[{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}],  # first: its adapter only
                     [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}],  # second, a bare stage: none
                     [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]]  # fmt: skip
    body = fake.calls[0]
    assert body["repeat_penalty"] == 1.3 and "repetition_penalty" not in body and body["repeat_last_n"] == 2048
    assert body["top_k"] == 7 and body["min_p"] == 0.0 and body["typical_p"] == 1.0 and body["stop"] == STOPS


def test_llamacpp_names_a_missing_adapter_file() -> None:
    with Fake(loras=["/srv/first.gguf"]) as fake:
        with pytest.raises(ConfigError, match="no LoRA adapter 'third.gguf'"):
            _stack("llamacpp", fake.url, {"first": "first.gguf", "third": "third.gguf"})


def test_a_cancelled_row_closes_its_remote_request() -> None:
    from slmstack.stack.backends import Row

    with Fake(models=["base"], delay=0.3) as fake:
        stack = _stack("vllm", fake.url, {})
        settings = stack.config.stages[0].generation
        handle = stack.backend.submit(Row("r", "hi", "__base__"), settings, True, None, "truncate")
        worker = threading.Thread(target=stack.backend.run, args=(lambda: handle.done.is_set(),), daemon=True)
        worker.start()
        time.sleep(0.5)  # the request is streaming
        handle.cancel()
        worker.join(timeout=10)
        assert fake.closed.wait(5)  # the server saw its client leave (vLLM aborts the request then)
    assert handle.finish_reason == "cancelled"
