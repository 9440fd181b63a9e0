"""A live server on loopback with a tiny 2-stage stack, called by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from slmstack.serving.settings import ServeSettings  # noqa: E402
from tests.unit.serving.conftest import free_port, start_server  # noqa: E402

KEY = "sk-test-123"


def test_the_openai_client_lists_models_chats_streams_and_completes(live) -> None:
    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"tiny-stack", "plain"}
    chat = client.chat.completions.create(model="tiny-stack", messages=[{"role": "user", "content": "say red"}],
                                          max_tokens=3)  # fmt: skip
    trace = chat.model_extra["slmstack_trace"]
    assert [t["stage"] for t in trace] == ["first", "second", "third"] and chat.choices[0].message.content == trace[
        -1
    ]["output"]
    chunks = list(client.chat.completions.create(model="tiny-stack", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True))  # fmt: skip
    stages = [c.model_extra["slmstack_stage"]["stage"] for c in chunks if c.model_extra.get("slmstack_stage")]
    assert stages == ["first", "second", "third"] and chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == chunks[-1].model_extra["slmstack_trace"][-1]["output"]
    # the final stage's text streams while it decodes: its pieces come before that stage's report
    pieces = [i for i, c in enumerate(chunks) if c.choices[0].delta.content]
    last_stage = next(i for i, c in enumerate(chunks) if (c.model_extra.get("slmstack_stage") or {}).get("stage")
                      == "third")  # fmt: skip
    second = next(i for i, c in enumerate(chunks) if (c.model_extra.get("slmstack_stage") or {}).get("stage")
                  == "second")  # fmt: skip
    assert len(pieces) >= 2 and all(second < i < last_stage for i in pieces)
    done = client.completions.create(model="plain", prompt="say blue", max_tokens=2)
    assert [t["stage"] for t in done.model_extra["slmstack_trace"]] == ["answer"]
    assert done.choices[0].text == done.model_extra["slmstack_trace"][0]["output"]


def test_sixteen_concurrent_requests_succeed_in_shared_batches(live) -> None:
    base, app = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")

    def ask(i: int) -> str:
        reply = client.chat.completions.create(model="tiny-stack", messages=[{"role": "user", "content": f"q {i}"}],
                                               max_tokens=3)  # fmt: skip
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16
    metrics = httpx.get(f"{base}/metrics").text
    assert "slmstack_batch_size_count" in metrics and "slmstack_queue_wait_seconds_bucket" in metrics
    # requests shared forward passes: some batch (a micro-batch, or an engine step) held more than one row
    alone = float(re.search(r'slmstack_batch_size_bucket\{le="1.0"\} (\S+)', metrics).group(1))
    total = float(re.search(r"slmstack_batch_size_count (\S+)", metrics).group(1))
    assert total > alone


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        ("{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), {}, 400, "'model'"),
        (json.dumps({"model": "tiny-stack"}), {}, 400, "'messages'"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), {}, 404, "does not exist"),
        (
            json.dumps({"model": "tiny-stack", "messages": [{"role": "user", "content": "word " * 300}]}),
            {},
            400,
            "the limit is 200",
        ),
        (
            json.dumps({"model": "tiny-stack", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            {},
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": "tiny-stack", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}),
            {},
            400,
            "max_tokens",
        ),
        ("model=tiny-stack", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        (
            json.dumps({"model": "tiny-stack", "messages": [{"role": "user", "content": "x" * 30_000}]}),
            {},
            413,
            "larger than",
        ),
        ("[" * 5000 + "]" * 5000, {}, 400, "nested too deeply"),  # Python 3.11's decoder gives up here
        ('{"model": "tiny-stack", "messages": ' + "[" * 100 + "]" * 100 + "}", {}, 400, "nested too deeply"),
        ('{"model": "tiny-stack", "messages": [{"role": "user", "content": "a\\ud800b"}]}', {}, 400, "lone surrogate"),
        *[
            (
                json.dumps({"model": "tiny-stack", "messages": [{"role": "user", "content": "x"}], **extra}),
                {},
                400,
                fragment,
            )
            for extra, fragment in [
                ({"temperature": -1}, "'temperature' must be in [0.0, 2.0]"),
                ({"temperature": 5}, "'temperature' must be in [0.0, 2.0]"),
                ({"temperature": "hot"}, "'temperature' must be a number"),
                ({"top_p": 2}, "'top_p' must be in"),
                ({"n": 3}, "'n' is not supported by slmstack (only 1 is accepted)"),
                ({"stream": "yes"}, "'stream' must be true or false"),
                ({"stop": ["s"] * 17}, "'stop' must be"),
                ({"seed": 1.5}, "'seed' must be an integer"),
                ({"presence_penalty": 3}, "'presence_penalty' is not supported"),
                ({"response_format": "json"}, "response_format must be"),
                ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools' is not supported"),
                ({"tool_choice": "auto"}, "'tool_choice' is not supported"),
                ({"echo": True}, "'echo' is supported on /v1/completions only"),
                ({"echo": 1}, "'echo' is supported on /v1/completions only"),  # True == 1: not a way past it
                ({"logprobs": "yes"}, "'logprobs' must be true or false"),
                ({"logit_bias": {"5": 10}}, "'logit_bias' is not supported"),
                ({"best_of": 2}, "'best_of' is not supported"),
                ({"suffix": "end"}, "'suffix' is not supported"),
                ({"n": True}, "'n' is not supported"),
                ({"stream_options": {"include_usage": True}}, "only allowed with 'stream': true"),
            ]
        ],  # fmt: skip
        (json.dumps({"model": "tiny-stack", "messages": [{"role": "wizard", "content": "x"}]}), {}, 400, "'wizard'"),
        (json.dumps({"model": "tiny-stack", "messages": [{"role": "user", "content": 7}]}), {}, 400, "content must"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(live, content, headers, status, fragment):
    base, _ = live
    headers = {"content-type": "application/json", **headers}
    reply = httpx.post(f"{base}/v1/chat/completions", content=content, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in reply.text and "/tmp" not in reply.text
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("GET", "/v1/chat/completions", 405, "not allowed"),
        ("POST", "/v1/embeddings", 404, "No such endpoint"),
        ("DELETE", "/v1/models", 405, "not allowed"),
        ("GET", "/nowhere", 404, "No such endpoint"),
    ],  # fmt: skip
)
def test_unknown_routes_and_methods_answer_in_openais_shape(live, method, path, status, fragment) -> None:
    base, _ = live
    reply = httpx.request(method, f"{base}{path}", json={})
    assert reply.status_code == status and fragment in reply.json()["error"]["message"], reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_a_requests_sampling_fields_are_applied_to_the_final_stage(live, stacks) -> None:
    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")

    def ask(**extra):
        reply = client.chat.completions.create(model="tiny-stack", messages=[{"role": "user", "content": "red?"}],
                                               max_tokens=8, **extra)  # fmt: skip
        return [t["output"] for t in reply.model_extra["slmstack_trace"]]

    greedy = ask()
    sampled = ask(temperature=1.5, seed=7)
    assert sampled == ask(temperature=1.5, seed=7)  # a seed makes sampling repeatable
    assert sampled[:2] == greedy[:2]  # only the final stage samples (request_sampling: final)
    assert {ask(temperature=1.5, seed=s)[2] for s in range(4)} != {greedy[2]}  # sampling does change the text
    # stop strings and max_tokens reach the final stage too
    stack = stacks["tiny-stack"]
    from slmstack.stack.chains import Chain, run_chains
    from slmstack.stack.config import INPUT_FIELD
    from slmstack.stack.trace import StackResult

    result = StackResult("red?", "")
    last = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 7}
    run_chains([Chain(stack, list(stack.config.stages), {INPUT_FIELD: "red?"}, result,
                      overrides=lambda index: last if index == 2 else {})])  # fmt: skip
    assert result.answer == sampled[2]


def test_an_api_key_guards_the_api_but_not_health(stacks) -> None:
    settings = ServeSettings(port=free_port(), api_key=KEY)
    server, thread, _ = start_server(stacks, settings)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer nope"})
        assert (
            wrong.status_code == 401 and KEY not in wrong.text and wrong.json()["error"]["code"] == "invalid_api_key"
        )
        assert httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)
        assert client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "a"}],
                                              max_tokens=2).choices[0].message.content is not None  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=10)
