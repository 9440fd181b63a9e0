"""Adapters and stacks added to and removed from a running server, under concurrent requests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from slmstack.serving.settings import ServeSettings  # noqa: E402
from tests.conftest import save_random_adapter, save_tiny_model, stack_dict, write_yaml  # noqa: E402
from tests.unit.serving.conftest import free_port, start_server  # noqa: E402

KEY = "sk-admin"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def served(tiny_model_dir: Path, monkeypatch):
    from slmstack.serving.server import load_stacks

    monkeypatch.delenv("SLMSTACK_ENGINE", raising=False)  # adapters at runtime are the engine's: on in the hf pass
    stacks = load_stacks([], [f"plain={tiny_model_dir}"])
    settings = ServeSettings(port=free_port(), max_batch_size=8, max_tokens=64, api_key=KEY)
    server, thread, app = start_server(stacks, settings)
    yield f"http://127.0.0.1:{settings.port}", app
    server.should_exit = True
    thread.join(timeout=10)


def _ask(base: str, model: str, text: str = "say red", max_tokens: int = 8) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens},
    )


def test_load_use_and_unload_an_adapter_under_concurrent_requests(served, tiny_adapters, tiny_model_dir) -> None:
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)
    before = [_ask(base, "plain", f"q {i}").json()["choices"][0]["message"]["content"] for i in range(4)]
    stop = threading.Event()
    during: list[str] = []

    def traffic() -> None:  # the base model keeps being asked while adapters come and go
        i = 0
        while not stop.is_set():
            during.append((i % 4, _ask(base, "plain", f"q {i % 4}").json()["choices"][0]["message"]["content"]))
            i += 1

    with ThreadPoolExecutor(2) as pool:
        pool.submit(traffic)
        loaded = httpx.post(f"{base}/v1/load_lora_adapter", headers=AUTH,
                            json={"lora_name": "red", "lora_path": str(tiny_adapters["first"])})  # fmt: skip
        assert loaded.status_code == 200, loaded.text
        assert "red" in {m.id for m in client.models.list()}
        with ThreadPoolExecutor(4) as ask_pool:
            answers = list(ask_pool.map(lambda i: _ask(base, "red", f"q {i}"), range(4)))
        assert all(a.status_code == 200 for a in answers)
        adapted = [a.json()["choices"][0]["message"]["content"] for a in answers]
        unloaded = httpx.post(f"{base}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "red"})
        assert unloaded.status_code == 200, unloaded.text
        stop.set()
    assert adapted != before  # the adapter changes the answers
    assert all(text == before[i] for i, text in during)  # the base's answers never changed
    assert "red" not in {m.id for m in client.models.list()}
    assert _ask(base, "red").status_code == 404
    # the same adapter in process gives the same answers as the served one
    from slmstack.stack.config import StackConfig, StageConfig
    from slmstack.stack.runtime import Stack

    stage = StageConfig(name="answer", role="", template="{input}", adapter=str(tiny_adapters["first"]))
    stage.generation.max_new_tokens = 8
    local = Stack(StackConfig(name="x", model=str(tiny_model_dir), stages=[stage]))
    assert [r.answer for r in local.run_batch([f"q {i}" for i in range(4)])] == adapted


def test_a_request_for_an_adapter_being_unloaded_is_a_404_while_one_in_flight_finishes(served, tiny_adapters):
    base, app = served
    assert (
        httpx.post(
            f"{base}/v1/load_lora_adapter",
            headers=AUTH,
            json={"lora_name": "red", "lora_path": str(tiny_adapters["first"])},
        ).status_code
        == 200
    )
    engine = app.state.slm.stacks["red"].backend.engine
    with ThreadPoolExecutor(2) as pool:
        engine._stepping.acquire()  # hold every step: the request below waits in the engine
        try:
            in_flight = pool.submit(_ask, base, "red", "q", 6)
            time.sleep(0.5)
            unload = pool.submit(httpx.post, f"{base}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "red"},
                                 timeout=60)  # fmt: skip
            time.sleep(0.5)
            late = _ask(base, "red")
            assert late.status_code == 404 and "being unloaded" in late.json()["error"]["message"]
        finally:
            engine._stepping.release()
        assert in_flight.result().status_code == 200
        assert unload.result().status_code == 200
    assert "red" not in engine.lora.ids


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"lora_name": "x", "lora_path": "/nowhere/adapter"}, "no adapter directory"),
        ({"lora_name": "x"}, "'lora_path'"),
        ({"lora_name": "", "lora_path": "/tmp"}, "'lora_name'"),
        ({"lora_name": "plain", "lora_path": "/tmp"}, "already served"),
        ({"lora_name": "x", "lora_path": "WRONG_BASE"}, "adapter"),
        ({"lora_name": "x", "lora_path": "CORRUPT"}, "adapter"),
        ({"lora_name": "x", "lora_path": "A", "base_model": "gpt-9"}, "'base_model'"),
    ],
)
def test_a_bad_adapter_is_a_400_and_the_server_is_unchanged(served, tiny_adapters, tmp_path, body, fragment) -> None:
    base, app = served
    if body.get("lora_path") == "WRONG_BASE":  # an adapter trained on a model of another width
        other = save_tiny_model(tmp_path / "wide", hidden=48)
        body["lora_path"] = str(save_random_adapter(other, tmp_path / "wide-adapter", seed=2))
    elif body.get("lora_path") == "CORRUPT":
        bad = tmp_path / "corrupt"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((tiny_adapters["first"] / "adapter_config.json").read_text())
        (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        body["lora_path"] = str(bad)
    elif body.get("lora_path") == "A":
        body["lora_path"] = str(tiny_adapters["first"])
    before = _ask(base, "plain").json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(4) as pool:  # requests to the base in flight while the bad load is refused
        traffic = [pool.submit(_ask, base, "plain") for _ in range(4)]
        reply = httpx.post(f"{base}/v1/load_lora_adapter", headers=AUTH, json=body)
        assert all(t.result().json()["choices"][0]["message"]["content"] == before for t in traffic)
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert list(app.state.slm.stacks) == ["plain"]
    assert not getattr(app.state.slm.stacks["plain"].model, "peft_config", {})
    assert _ask(base, "plain").json()["choices"][0]["message"]["content"] == before


def test_on_transformers_adding_an_adapter_is_a_clear_400(tiny_model_dir, tiny_adapters, monkeypatch) -> None:
    from slmstack.serving.server import load_stacks

    monkeypatch.setenv("SLMSTACK_ENGINE", "hf")
    settings = ServeSettings(port=free_port())
    server, thread, app = start_server(load_stacks([], [f"plain={tiny_model_dir}"]), settings)
    try:
        reply = httpx.post(f"http://127.0.0.1:{settings.port}/v1/load_lora_adapter",
                           json={"lora_name": "red", "lora_path": str(tiny_adapters["first"])})  # fmt: skip
        assert reply.status_code == 400 and "needs slmstack's engine" in reply.json()["error"]["message"]
        assert list(app.state.slm.stacks) == ["plain"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_runtime_endpoints_need_the_api_key_and_unknown_models_are_404(served, tiny_adapters) -> None:
    base, _ = served
    body = {"lora_name": "red", "lora_path": str(tiny_adapters["first"])}
    assert httpx.post(f"{base}/v1/load_lora_adapter", json=body).status_code == 401
    assert httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "red"}).status_code == 401
    assert httpx.post(f"{base}/v1/stacks", json={"path": "x.yaml"}).status_code == 401
    assert httpx.post(f"{base}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "red"}).status_code == 404
    assert httpx.post(f"{base}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "plain"}).status_code == 400


def test_a_stack_yaml_is_served_and_removed_at_runtime(served, tiny_model_dir, tiny_adapters, tmp_path) -> None:
    base, app = served
    path = write_yaml(tmp_path / "s.yaml", {**stack_dict(tiny_model_dir, tiny_adapters, max_new=4), "name": "three"})
    added = httpx.post(f"{base}/v1/stacks", headers=AUTH, json={"path": str(path)})
    assert added.status_code == 200 and added.json()["slmstack_stages"] == ["first", "second", "third"], added.text
    reply = _ask(base, "three")
    assert [t["stage"] for t in reply.json()["slmstack_trace"]] == ["first", "second", "third"]
    assert app.state.slm.batchers["three"] is app.state.slm.batchers["plain"]  # one base, one engine
    assert httpx.post(f"{base}/v1/stacks", headers=AUTH, json={"path": str(tmp_path / "no.yaml")}).status_code == 400
    assert httpx.delete(f"{base}/v1/stacks/three", headers=AUTH).status_code == 200
    assert _ask(base, "three").status_code == 404 and _ask(base, "plain").status_code == 200
