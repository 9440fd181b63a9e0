"""The server's log-probabilities (lm-eval's own ``local-completions`` client) and structured output (JSON schema)."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402

from slmstack.evaluation.scorer import Scorer  # noqa: E402
from slmstack.models import load_model  # noqa: E402
from tests.conftest import SPECIALS  # noqa: E402
from tests.unit.serving.conftest import free_port, start_server  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path):
    from slmstack.serving.server import load_stacks
    from slmstack.serving.settings import ServeSettings

    with pytest.MonkeyPatch.context() as mp:  # these features are the engine's: on in CI's SLMSTACK_ENGINE=hf pass
        mp.delenv("SLMSTACK_ENGINE", raising=False)
        stacks = load_stacks([], [f"plain={tiny_model_dir}"])
    settings = ServeSettings(port=free_port(), max_batch_size=8, max_tokens=96)
    server, thread, _ = start_server(stacks, settings)
    yield f"http://127.0.0.1:{settings.port}", stacks["plain"]
    server.should_exit = True
    thread.join(timeout=10)


def test_echo_logprobs_equal_the_scorers_loglikelihoods(served, tiny_model_dir: Path) -> None:
    base, _ = served
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=4)
    pairs = [("Question: red or blue?\nAnswer:", " red"), ("hi there", " friend"), ("x", "y")]
    for context, continuation in pairs:
        ctx, cont = scorer.encode_pair(context, continuation)
        reply = httpx.post(
            f"{base}/v1/completions",
            json={
                "model": "plain",
                "prompt": [ctx + cont],
                "echo": True,
                "max_tokens": 1,
                "logprobs": 1,
                "temperature": 0,
            },
        )
        assert reply.status_code == 200, reply.text
        lp = reply.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(ctx + cont) + 1 and lp["token_logprobs"][0] is None
        ((expected, greedy),) = scorer.loglikelihood([(context, continuation)])
        torch.testing.assert_close(torch.tensor(sum(lp["token_logprobs"][len(ctx) : -1])), torch.tensor(expected),
                                   atol=1e-4, rtol=1e-5)  # fmt: skip
        values, tops = lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1]
        assert greedy == all(v == max(t.values()) for v, t in zip(values, tops, strict=True))
        # the one generated token is the greedy next token, with its log-probability
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_lm_evals_local_completions_client_scores_the_server_as_our_scorer(served, tiny_model_dir: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    base, _ = served
    client = LocalCompletionsAPI(base_url=f"{base}/v1/completions", model="plain", tokenizer=str(tiny_model_dir),
                                 tokenizer_backend="huggingface", max_retries=1)  # fmt: skip
    pairs = [(f"Question: is {w} a colour?\nAnswer:", f" {a}") for w in ("red", "dog", "blue") for a in ("yes", "no")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = client.loglikelihood(requests, disable_tqdm=True)
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    ours = Scorer(lm.model, lm.tokenizer, batch_size=4).loglikelihood(pairs)
    torch.testing.assert_close(torch.tensor([t[0] for t in theirs]), torch.tensor([o[0] for o in ours]),
                               atol=1e-4, rtol=1e-5)  # fmt: skip
    assert [t[1] for t in theirs] == [o[1] for o in ours]


def test_chat_logprobs_describe_the_answers_tokens(served) -> None:
    base, stack = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    reply = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "say red"}],
                                           max_tokens=6, logprobs=True, top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content
    answer = reply.choices[0].message.content
    spoken = "".join(c.token for c in content if c.token not in SPECIALS)  # the answer skips special tokens
    assert spoken.strip() == answer and content  # and is stripped
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= c.top_logprobs[0].logprob + 1e-6
        assert bytes(c.bytes).decode() == c.token
    # greedy decoding picked each token: it is the most likely one at its position
    assert all(c.token == c.top_logprobs[0].token for c in content)
    assert all(math.isfinite(c.logprob) for c in content)


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "blue"]}, "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                   "inner": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                             "required": ["n"], "additionalProperties": False}},
    "required": ["colour", "ok", "tags", "inner"],
    "additionalProperties": False,
}  # fmt: skip


def test_json_schema_replies_validate_while_a_free_row_shares_the_batch(served) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}

    def ask(i: int) -> str:
        extra = {"response_format": fmt} if i else {}
        reply = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": f"item {i}"}],
                                               max_tokens=90, **extra)  # fmt: skip
        return reply.choices[0].message.content

    alone = ask(0)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for text in replies[1:]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert replies[0] == alone  # the unconstrained row is unchanged by its constrained neighbours
    mode = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "x"}], max_tokens=90,
                                          response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(mode.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("path", "extra", "fragment"),
    [
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
            "cannot be enforced",
        ),
        ("chat", {"response_format": {"type": "yaml"}}, "response_format must be"),
        ("chat", {"logprobs": True, "stream": True}, "not supported with 'stream'"),
        ("chat", {"top_logprobs": 2}, "needs 'logprobs': true"),
        ("chat", {"top_logprobs": 50, "logprobs": True}, "'top_logprobs' must be an integer from 0 to 20"),
        ("chat", {"echo": True}, "'echo' is supported on /v1/completions only"),
        ("completions", {"echo": True, "max_tokens": 5}, "give max_tokens 0 or 1"),
        ("completions", {"echo": True, "temperature": 1.0}, "leave out temperature"),
        ("completions", {"logprobs": True}, "'logprobs' must be an integer"),
        ("completions", {"prompt": [[1, 2, 100000]]}, "outside the vocabulary"),
        ("completions", {"prompt": [[]]}, "'prompt'"),
        ("completions", {"max_tokens": 0}, "'max_tokens' must be an integer from 1"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools' is not supported"),
    ],  # fmt: skip
)
def test_bad_logprobs_echo_and_format_fields_get_a_400(served, path, extra, fragment) -> None:
    base, _ = served
    body = {"model": "plain", **({"messages": [{"role": "user", "content": "x"}]} if path == "chat" else
                                 {"prompt": "x"}), **extra}  # fmt: skip
    reply = httpx.post(f"{base}/v1/{'chat/completions' if path == 'chat' else 'completions'}", json=body)
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text


def test_lm_evals_local_chat_completions_client_generates_through_the_server(served) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    base, _ = served
    client = LocalChatCompletion(base_url=f"{base}/v1/chat/completions", model="plain", max_retries=1)
    messages = [{"role": "user", "content": f"say {w}"} for w in ("red", "blue")]
    requests = [Instance("generate_until", {}, (JsonChatStr(json.dumps([m])), {"until": ["\n\n"], "max_gen_toks": 8}),
                         i) for i, m in enumerate(messages)]  # fmt: skip
    theirs = client.generate_until(requests, disable_tqdm=True)
    ours = [openai.OpenAI(base_url=f"{base}/v1", api_key="x").chat.completions.create(
        model="plain", messages=[m], max_tokens=8, stop=["\n\n"], temperature=0).choices[0].message.content
        for m in messages]  # fmt: skip
    assert theirs == ours and all(theirs)


def test_on_transformers_logprobs_echo_and_response_format_are_a_clear_400(tiny_model_dir: Path, monkeypatch) -> None:
    from slmstack.serving.server import load_stacks
    from slmstack.serving.settings import ServeSettings

    monkeypatch.setenv("SLMSTACK_ENGINE", "hf")
    stacks = load_stacks([], [f"plain={tiny_model_dir}"])
    settings = ServeSettings(port=free_port())
    server, thread, _ = start_server(stacks, settings)
    base = f"http://127.0.0.1:{settings.port}"
    chat = {"model": "plain", "messages": [{"role": "user", "content": "x"}]}
    try:
        for path, extra, fragment in [
            ("chat/completions", {"logprobs": True}, "runs on transformers"),
            ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format needs slmstack's"),
            ("completions", {"prompt": "x", "echo": True, "max_tokens": 1}, "runs on transformers"),
        ]:
            body = {**({"model": "plain"} if path == "completions" else chat), **extra}
            reply = httpx.post(f"{base}/v1/{path}", json=body)
            assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text
        assert httpx.post(f"{base}/v1/chat/completions", json=chat).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
