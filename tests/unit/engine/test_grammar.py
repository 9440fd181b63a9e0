"""Structured output on the engine: a JSON schema masks a row's logits through llguidance."""

from __future__ import annotations

import json

import pytest

from slmstack.engine import Engine
from slmstack.engine.text import GenerationSettings
from slmstack.errors import ConfigError, InputError
from tests.conftest import build_tiny_llama, build_tokenizer

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# nested objects, enums, arrays, booleans, bounded strings and integers
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "blue", "green"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 99}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
    "required": ["colour", "ok", "tags", "owner"],
    "additionalProperties": False,
}  # fmt: skip
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


def test_constrained_rows_validate_and_share_a_batch_with_free_rows() -> None:
    # Prepare: a random tiny model (it would never write JSON on its own), 20 constrained prompts and 5 free ones
    model, tok = build_tiny_llama(), build_tokenizer()
    engine = Engine(model, tok, max_batch=25)
    prompts = [tok(f"item {i}:")["input_ids"] for i in range(25)]
    constrained = GenerationSettings(max_new_tokens=160, response_format=FORMAT)
    free = GenerationSettings(max_new_tokens=12)
    # Execute: every row in one engine run, then the free rows alone
    handles = [engine.submit(p, settings=constrained if i % 5 else free) for i, p in enumerate(prompts)]
    engine.run()
    alone = [engine.submit(p, settings=free) for i, p in enumerate(prompts) if i % 5 == 0]
    engine.run()
    # Assert: every constrained reply (20) parses and validates; the free rows are what they are without company
    constrained_rows = [h for i, h in enumerate(handles) if i % 5]
    assert len(constrained_rows) == 20
    for h in constrained_rows:
        jsonschema.validate(json.loads(h.generated().text), SCHEMA)
    assert [h.generated().text for i, h in enumerate(handles) if i % 5 == 0] == [h.generated().text for h in alone]
    assert not any(_parses(h.generated().text) for h in alone)  # the model alone writes no JSON


def test_json_object_mode_gives_an_object_and_sampling_stays_inside() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    engine = Engine(model, tok, max_batch=4)
    settings = GenerationSettings(max_new_tokens=200, do_sample=True, temperature=0.7, seed=3,
                                  response_format={"type": "json_object"})  # fmt: skip
    handles = [engine.submit(tok("x")["input_ids"], settings=settings) for _ in range(4)]
    engine.run()
    finished = [h for h in handles if h.finish_reason == "stop"]
    assert finished  # a random model may run out of budget inside a long string; those that finish are objects
    for h in finished:
        assert isinstance(json.loads(h.generated().text), dict)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"type": "xml"}, "response_format must be"),
        ({"type": "json_schema"}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": "x"}}, "json_schema.schema"),
        ("json", "response_format must be"),
    ],
)
def test_a_bad_response_format_is_one_config_error(value, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        GenerationSettings(response_format=value)


def test_a_schema_llguidance_cannot_enforce_is_an_input_error() -> None:
    engine = Engine(build_tiny_llama(), build_tokenizer(), max_batch=1)
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}
    with pytest.raises(InputError, match="cannot be enforced"):
        engine.submit([1, 2], settings=GenerationSettings(response_format=bad))
    assert not engine.has_work()


def test_a_stage_sets_response_format_in_its_yaml(tiny_model_dir, tmp_path) -> None:
    from slmstack.stack.config import load_stack_config
    from slmstack.stack.runtime import Stack
    from tests.conftest import stack_dict, write_yaml

    body = stack_dict(tiny_model_dir, max_new=160)
    body["stages"][2]["generation"] = {**body["stages"][2]["generation"], "response_format": FORMAT}  # the last one
    stack = Stack(load_stack_config(write_yaml(tmp_path / "s.yaml", body)))
    if not stack.on_engine:
        pytest.skip("response_format runs on the engine (this pass turned it off)")
    for result in stack.run_batch(["red?", "a long question about blue things"]):
        jsonschema.validate(json.loads(result.answer), SCHEMA)
        assert not _parses(result.trace[0].output)  # the other stages stay free text
