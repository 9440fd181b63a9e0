"""The scale-out backend: a stack whose stages generate on a (fake) OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from slmstack.serving.settings import ServeSettings  # noqa: E402
from tests.conftest import write_yaml  # noqa: E402
from tests.unit.serving.conftest import free_port, start_server  # noqa: E402


def _fake_engine(calls: list[dict]):
    """A stand-in for vLLM: answers '<model> says <last user message>' and records each request."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        calls.append(body)
        text = f"{body['model']} says {body['messages'][-1]['content'][:30]}"
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}  # fmt: skip

        def events():
            for word in text.split(" "):
                choice = {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}
                delta = {"id": "x", "object": "chat.completion.chunk", "model": body["model"], "choices": [choice]}
                yield f"data: {json.dumps(delta)}\n\n"
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture()
def engine():
    import uvicorn

    calls: list[dict] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_fake_engine(calls), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", calls
    server.should_exit = True
    thread.join(timeout=10)


def _remote_stack(tmp_path, url: str) -> dict:
    return {
        "name": "remote-stack",
        "backend": {"url": url, "base_model": "base-135m", "models": {"first": "lora-first", "third": "lora-third"}},
        "stages": [
            {"name": "first", "role": "restate", "template": "Q: {input}"},
            {"name": "second", "role": "recall", "template": "A: {first}"},
            {"name": "third", "role": "answer", "template": "{second}"},
        ],
    }


def test_a_remote_backend_runs_the_stack_on_the_engine_under_each_stages_model_name(tmp_path, engine) -> None:
    from slmstack.serving.server import load_stacks

    url, calls = engine
    stacks = load_stacks([str(write_yaml(tmp_path / "remote.yaml", _remote_stack(tmp_path, url)))], [])
    assert stacks["remote-stack"].model is None  # nothing loaded in process
    settings = ServeSettings(port=free_port())
    server, thread, _ = start_server(stacks, settings)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="unused")
        reply = client.chat.completions.create(model="remote-stack", messages=[{"role": "user", "content": "hi"}])
        # Assert: each stage called its model name, in order, with the earlier stage's text wired in
        assert [c["model"] for c in calls] == ["lora-first", "base-135m", "lora-third"]
        assert calls[0]["messages"] == [{"role": "system", "content": "restate"}, {"role": "user", "content": "Q: hi"}]
        trace = reply.model_extra["slmstack_trace"]
        assert trace[0]["output"] == "lora-first says Q: hi"
        assert calls[1]["messages"][-1]["content"] == "A: lora-first says Q: hi"
        assert [t["adapter"] for t in trace] == ["first", None, "third"]
        assert trace[0]["tokens_in"] == 7 and trace[0]["tokens_out"] == 3
        assert reply.choices[0].message.content == trace[-1]["output"]
        # streaming: the engine's pieces are passed on
        calls.clear()
        chunks = list(client.chat.completions.create(model="remote-stack", stream=True, max_tokens=5,
                                                     messages=[{"role": "user", "content": "yo"}]))  # fmt: skip
        assert calls[-1]["stream"] is True and calls[-1]["max_tokens"] == 5
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2
        assert "".join(pieces).strip() == chunks[-1].model_extra["slmstack_trace"][-1]["output"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_backend_that_is_down_gets_a_502_without_its_address(tmp_path) -> None:
    import httpx

    from slmstack.serving.server import load_stacks

    dead = f"http://127.0.0.1:{free_port()}/v1"
    stacks = load_stacks([str(write_yaml(tmp_path / "remote.yaml", _remote_stack(tmp_path, dead)))], [])
    settings = ServeSettings(port=free_port())
    server, thread, _ = start_server(stacks, settings)
    try:
        body = {"model": "remote-stack", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"http://127.0.0.1:{settings.port}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 502
        assert "backend" in response.json()["error"]["message"] and "127.0.0.1" not in response.text
        assert httpx.get(f"http://127.0.0.1:{settings.port}/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
