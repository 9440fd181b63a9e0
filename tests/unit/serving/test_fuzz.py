"""Hypothesis drives the live app over the request schema: no request, however malformed, gets a 5xx.

Two strategies: *deep* requests are valid but for wild text (lone surrogates, control characters, special
tokens) and reach the stack; *wide* requests put junk of every JSON type in every field.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from slmstack.serving.requests import NEUTRAL  # noqa: E402

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))  # fmt: skip
# any text, lone surrogates included, and a few strings known to upset tokenizers and JSON parsers
SPECIAL = ["\ud800", "a\udfffb", "\x00", "\u2028\u0085", "{" * 50, "<|im_end|>", " "]
TEXT = st.one_of(st.text(alphabet=st.characters(exclude_categories=()), max_size=40), st.sampled_from(SPECIAL))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT})
VALID = {
    "model": st.sampled_from(["tiny-stack", "plain"]),
    "messages": st.lists(MESSAGE, max_size=2).map(lambda m: [*m, {"role": "user", "content": "q"}]),
    "max_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=4)),
    "stream": st.booleans(),
}
DEEP = st.fixed_dictionaries(
    {"model": VALID["model"], "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={k: v for k, v in VALID.items() if k not in ("model", "messages")},
)
WIDE = st.fixed_dictionaries(
    {},
    optional={
        **{k: st.one_of(v, JUNK) for k, v in VALID.items()},
        "prompt": st.one_of(TEXT, JUNK),
        "n": st.one_of(st.integers(0, 3), JUNK),
        "stream_options": JUNK,
        "presence_penalty": JUNK,
        "logprobs": JUNK,
        **{name: st.one_of(JUNK, st.sampled_from(NEUTRAL[name] or (None,))) for name in NEUTRAL},
    },  # fmt: skip
)
# only the fields slmstack does not implement, each neutral or not: a non-neutral one is always refused
UNSUPPORTED = st.fixed_dictionaries(
    {
        "model": st.just("tiny-stack"),
        "messages": st.just([{"role": "user", "content": "q"}]),
        "max_tokens": st.just(2),
    },
    optional={name: st.one_of(JUNK, st.sampled_from(NEUTRAL[name] or (None,))) for name in NEUTRAL},
)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])  # fmt: skip
ENDPOINTS = st.sampled_from(["/v1/chat/completions", "/v1/completions"])


def _post(base: str, endpoint: str, body: dict) -> None:
    content = json.dumps(body)  # NaN and Infinity included, as Python's json writes them
    reply = httpx.post(f"{base}{endpoint}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code < 500, (body, reply.text)
    assert 'data: {"error"' not in reply.text or "shutting down" in reply.text, (body, reply.text)
    if reply.status_code >= 400:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


@FUZZ
@given(body=DEEP, endpoint=ENDPOINTS)
def test_valid_requests_with_wild_text_never_get_a_5xx(live, body, endpoint) -> None:
    _post(live[0], endpoint, {**body, "prompt": body["messages"][0]["content"]})


@FUZZ
@given(body=WIDE, endpoint=ENDPOINTS)
def test_requests_with_junk_fields_never_get_a_5xx(live, body, endpoint) -> None:
    _post(live[0], endpoint, body)


def _neutral(name: str, value: object) -> bool:
    return value is None or any(type(value) is type(v) and value == v for v in NEUTRAL[name])


@FUZZ
@given(body=UNSUPPORTED, endpoint=ENDPOINTS)
def test_fields_not_implemented_are_refused_unless_neutral(live, body, endpoint) -> None:
    # Execute
    reply = httpx.post(f"{live[0]}{endpoint}", content=json.dumps({**body, "prompt": "q"}),
                       headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    # Assert: a field that would change the reply is never accepted and ignored
    changed = sorted(name for name in NEUTRAL if name in body and not _neutral(name, body[name]))
    if changed:
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] in changed, (body, reply.text)
    else:
        assert reply.status_code == 200, (body, reply.text)
