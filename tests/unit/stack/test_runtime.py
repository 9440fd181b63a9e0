from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmstack.config import build_dataclass
from slmstack.errors import AdapterMismatchError, InputError
from slmstack.stack.config import StackConfig
from slmstack.stack.runtime import Stack
from tests.conftest import QUESTIONS, save_random_adapter, save_tiny_model, stack_dict, write_yaml


@pytest.fixture()
def stack(tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> Stack:
    return Stack.from_config(write_yaml(tmp_path / "stack.yaml", stack_dict(tiny_model_dir, tiny_adapters)))


def test_batched_equals_one_at_a_time_under_greedy(stack: Stack) -> None:
    # Execute
    batched = stack.run_batch(QUESTIONS, batch_size=len(QUESTIONS))
    single = [stack(q) for q in QUESTIONS]
    # Assert: every stage's text and token counts agree, row by row
    for b, s in zip(batched, single, strict=True):
        assert [(t.stage, t.output, t.tokens_in, t.tokens_out) for t in b.trace] == [
            (t.stage, t.output, t.tokens_in, t.tokens_out) for t in s.trace
        ]
    # The adapters really change the text (otherwise the equality above proves little).
    assert len({r.trace[0].output for r in batched}) > 1


def test_batch_size_sets_the_engines_rows_per_step(stack: Stack) -> None:
    # Prepare: the stack's config batch size is smaller than the batch asked for
    texts = [*QUESTIONS, "a b c d e f g", "one more question here"]
    assert len(texts) > stack.config.batch_size
    before = stack.run_batch(texts)
    # Execute
    after = stack.run_batch(texts, batch_size=len(texts))
    # Assert: the engine now holds every row at once (it held the config's batch before), and the text is the same
    if stack.on_engine:
        assert stack.backend.engine.scheduler.max_rows == len(texts)
    assert [r.answer for r in after] == [r.answer for r in before]


def test_adapters_change_outputs_versus_base(stack: Stack, tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = Stack.from_config(write_yaml(tmp_path / "plain.yaml", stack_dict(tiny_model_dir)))
    with_adapters = stack.run_batch(QUESTIONS)
    without = plain.run_batch(QUESTIONS)
    assert [r.trace[0].output for r in with_adapters] != [r.trace[0].output for r in without]


def test_trace_is_complete_and_wired(stack: Stack) -> None:
    result = stack("name a red fruit.")
    assert [t.stage for t in result.trace] == ["first", "second", "third"]
    first, second, third = result.trace
    assert first.prompt == "Q: name a red fruit."
    assert second.prompt == f"Q: name a red fruit. A: {first.output}"
    assert third.prompt == f"{first.output} / {second.output}: name a red fruit."
    assert result.answer == third.output
    assert [t.adapter for t in result.trace] == ["first", None, "third"]
    for t in result.trace:
        text = stack.model_input(stack.config.stage(t.stage), {"input": "name a red fruit.", **result.outputs})
        # char-level tokenizer: one token per char, special tokens count as one
        assert t.tokens_in == len(stack.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert 1 <= t.tokens_out <= 12
        assert t.seconds > 0
    as_json = result.to_dict()
    assert set(as_json["trace"][0]) >= {"stage", "prompt", "output", "tokens_in", "tokens_out", "seconds"}


def test_all_stages_share_one_base_model(stack: Stack, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    # Prepare: the parameter count of one fresh copy of the base
    one_copy = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    # Execute
    lora = sum(p.numel() for n, p in stack.model.named_parameters() if "lora_" in n)
    base_only = sum(p.numel() for n, p in stack.model.named_parameters() if "lora_" not in n)
    # Assert: exactly one copy of the base weights, wrapped in place, plus two small adapters
    assert stack.model.get_base_model() is stack.loaded.model
    assert base_only == one_copy
    assert set(stack.model.peft_config) == {"first", "third"}
    assert 0 < lora < 0.2 * one_copy


def test_sampling_is_seeded(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = stack_dict(tiny_model_dir)
    for s in data["stages"]:
        s["generation"] = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "seed": 7}
    st = Stack.from_config(write_yaml(tmp_path / "s.yaml", data))
    a, b = st.run_batch(QUESTIONS), st.run_batch(QUESTIONS)
    assert [r.answer for r in a] == [r.answer for r in b]
    data["stages"][0]["generation"]["seed"] = 8
    other = Stack(build_dataclass(StackConfig, data), loaded=st.loaded).run_batch(QUESTIONS)
    assert [r.trace[0].output for r in other] != [r.trace[0].output for r in a]


def test_overlong_input_keeps_its_first_token_and_its_end_with_a_warning(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = stack_dict(tiny_model_dir) | {"max_input_tokens": 40}
    st = Stack.from_config(write_yaml(tmp_path / "s.yaml", data))
    long_q = "x" * 30 + " the end"
    with caplog.at_level("WARNING"):
        result = st(long_q)
    assert result.trace[0].tokens_in == 40 and result.trace[0].truncated
    assert "keeping its first and last 39" in caplog.text


def test_overlong_input_is_refused_when_configured(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = stack_dict(tiny_model_dir) | {"max_input_tokens": 40, "on_overflow": "error"}
    st = Stack.from_config(write_yaml(tmp_path / "s.yaml", data))
    with pytest.raises(InputError, match="over the 40-token limit"):
        st("y" * 60)


@pytest.mark.parametrize("bad", [[""], ["ok", "   "], []])
def test_empty_input_is_refused(stack: Stack, bad: list[str]) -> None:
    with pytest.raises(InputError):
        stack.run_batch(bad)


def test_adapter_with_wrong_shapes_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: an adapter trained on a wider (hidden=64) model
    wide = save_tiny_model(tmp_path / "wide", hidden=64)
    bad = save_random_adapter(wide, tmp_path / "bad_adapter", seed=0)
    data = stack_dict(tiny_model_dir, {"first": bad})
    # Execute / Assert
    with pytest.raises(AdapterMismatchError, match=r"stage 'first'.*bad_adapter.*shape"):
        Stack.from_config(write_yaml(tmp_path / "s.yaml", data))


def test_adapter_for_missing_modules_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96)).save_pretrained(gpt2)
    bad = save_random_adapter(gpt2, tmp_path / "gpt2_adapter", seed=0, targets=("c_attn",))
    with pytest.raises(AdapterMismatchError, match="does not have"):
        Stack.from_config(write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, {"first": bad})))


def test_missing_or_pickle_adapter_is_refused(tiny_model_dir: Path, tiny_adapters: dict, tmp_path: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="does not exist"):
        Stack.from_config(write_yaml(tmp_path / "a.yaml", stack_dict(tiny_model_dir, {"first": tmp_path / "nope"})))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny_adapters["first"] / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(AdapterMismatchError, match="never pickle"):
        Stack.from_config(write_yaml(tmp_path / "b.yaml", stack_dict(tiny_model_dir, {"first": pickled})))


def test_relative_adapter_paths_resolve_against_the_yaml(tiny_model_dir: Path, tmp_path: Path) -> None:
    save_random_adapter(tiny_model_dir, tmp_path / "adapters" / "first", seed=1)
    data = stack_dict(tiny_model_dir)
    data["stages"][0]["adapter"] = "adapters/first"
    elsewhere = tmp_path / "cfg"
    elsewhere.mkdir()
    (elsewhere / "adapters").symlink_to(tmp_path / "adapters")
    st = Stack.from_config(write_yaml(elsewhere / "s.yaml", data))
    assert st("hi").trace[0].adapter == "first"


def test_base_stages_bypass_the_loaded_adapters(tiny_model_dir: Path, tiny_adapters: dict, tmp_path: Path) -> None:
    # Prepare: only the last stage has an adapter, so peft's "active adapter" is that one
    only_last = Stack.from_config(
        write_yaml(tmp_path / "a.yaml", stack_dict(tiny_model_dir, {"third": tiny_adapters["third"]}))
    )
    plain = Stack.from_config(write_yaml(tmp_path / "b.yaml", stack_dict(tiny_model_dir)))
    # Execute
    a, b = only_last.run_batch(QUESTIONS), plain.run_batch(QUESTIONS)
    # Assert: the two base stages match the adapter-free stack exactly; the adapter stage differs
    assert [r.trace[0].output for r in a] == [r.trace[0].output for r in b]
    assert [r.trace[1].output for r in a] == [r.trace[1].output for r in b]
    assert [r.trace[2].output for r in a] != [r.trace[2].output for r in b]


def test_adapter_naming_another_base_loads_with_a_warning(tiny_model_dir: Path, tiny_adapters: dict, tmp_path, caplog):
    import json
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_adapters["first"], renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "other/model"}))
    with caplog.at_level("WARNING"):
        Stack.from_config(write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, {"first": renamed})))
    assert "was trained on 'other/model'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Stack.from_config(write_yaml(tmp_path / "t.yaml", stack_dict(tiny_model_dir, tiny_adapters)))
    assert "was trained on" not in caplog.text


def test_stacks_on_one_base_share_the_model_and_each_forward_pass(tiny_model_dir, tiny_adapters, tmp_path) -> None:
    from slmstack.stack.chains import Chain, run_chains
    from slmstack.stack.config import load_stack_config
    from slmstack.stack.trace import StackResult

    # Prepare: two stacks on the same base with different adapters, loaded together and each alone
    other = {**stack_dict(tiny_model_dir, {"first": tiny_adapters["third"]}), "name": "other"}
    paths = [write_yaml(tmp_path / "a.yaml", stack_dict(tiny_model_dir, tiny_adapters)),
             write_yaml(tmp_path / "b.yaml", other)]  # fmt: skip
    a, b = Stack.sharing_bases([load_stack_config(p) for p in paths])
    alone = [Stack.from_config(p) for p in paths]
    steps = []
    a.backend.runner.on_step = steps.append  # rows of each step (an engine step, or a transformers micro-batch)
    # Execute: rows of both stacks, each a chain
    rows = [(s, q) for q in QUESTIONS[:2] for s in (a, b)]
    results = [StackResult(q, "") for _, q in rows]
    run_chains([Chain(s, list(s.config.stages), {"input": q}, r) for (s, q), r in zip(rows, results, strict=True)])
    # Assert: one base, every adapter on one wrapper; shared steps; the same text as each stack alone
    assert a.model is b.model and a.backend is b.backend
    assert set(a.model.peft_config) == {"tiny/first", "tiny/third", "other/first"}
    assert max(steps) == 4  # the four rows of both stacks shared a step
    for (stack, q), result in zip(rows, results, strict=True):
        own = alone[0 if stack is a else 1](q)
        assert [t.output for t in result.trace] == [t.output for t in own.trace]
    assert results[0].trace[0].output != results[1].trace[0].output  # the two stacks' adapters differ


def test_one_adapter_batches_take_the_single_adapter_path_with_equal_text(stack: Stack, monkeypatch) -> None:
    from slmstack.engine import hf
    from slmstack.engine.hf import generate_batch

    routed = []  # per LoRA layer call: was the batch routed row by row (adapter_names) or not
    original = hf._forward

    def spy(self, x, *args, **kwargs):
        routed.append("adapter_names" in kwargs)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(hf, "_forward", spy)
    # Prepare: the same rows alone under one adapter, and mixed with a base row (routed by adapter name)
    texts = [stack.model_input(stack.config.stages[0], {"input": q}) for q in QUESTIONS]
    settings = stack.config.stages[0].generation
    single = generate_batch(stack.model, stack.tokenizer, texts, settings, adapter_names=["first"] * 4)
    assert routed and not any(routed)  # one adapter for the whole batch: the active adapter, no routing
    routed.clear()
    mixed = generate_batch(stack.model, stack.tokenizer, [*texts, texts[0]], settings,
                           adapter_names=["first"] * 4 + ["__base__"])  # fmt: skip
    assert routed and all(routed)  # a mixed batch is routed row by row
    base = generate_batch(stack.model, stack.tokenizer, texts, settings, adapter_names=["__base__"] * 4)
    # Assert: equal text on both paths; the adapter is really on (base rows differ); routing restored after
    assert [g.text for g in single] == [g.text for g in mixed[:4]]
    assert [g.text for g in base] != [g.text for g in single]
    assert mixed[4].text == base[0].text
