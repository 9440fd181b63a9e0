"""Logits under a mix of LoRA adapters equal peft's own forward; adapters load and unload at run time."""

from __future__ import annotations

import pytest
import torch

from slmstack.engine import Engine
from slmstack.engine.scheduler import Request, Row, StepPlan
from tests.conftest import build_tiny_llama, build_tokenizer


def _peft_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(build_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False), adapter_name="qv")  # fmt: skip
    model.add_adapter("all", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]))  # fmt: skip
    model.add_adapter("mlp", LoraConfig(r=8, lora_alpha=8, target_modules=["down_proj", "up_proj"],
                                        init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_a_mixed_batch_gives_peft_logits_row_by_row() -> None:
    check_mixed_batch_equals_peft("cpu", kernel=False)


def check_mixed_batch_equals_peft(device: str, kernel: bool) -> None:
    """Four prompts of different lengths, each under another adapter (one on the bare base), in one step, give
    peft's logits row by row; ``kernel``: whether the step takes the Triton kernel (``kernels.py``)."""
    model, tok = _peft_model().to(device), build_tokenizer()
    prompts = ["first prompt", "a second, longer prompt here", "third", "the fourth one?"]
    step_equals_peft(model, tok, prompts, ["qv", "__base__", "all", "mlp"], kernel=kernel, tolerance=1e-5)


def step_equals_peft(model, tok, prompts: list[str], adapters: list[str], kernel: bool = False,
                     tolerance: float = 1e-5) -> None:  # fmt: skip
    """Every prompt whole, each under its adapter, in one engine step: each row's logits are peft's forward under
    that adapter (and the adapters really change them)."""
    device = next(model.parameters()).device
    engine = Engine(model, tok, max_batch=len(prompts))
    engine.cache.ensure(64)
    rows = []
    for slot, text in enumerate(prompts):
        request = Request(tok(text)["input_ids"], adapter=engine.lora.id(adapters[slot]))
        request.slot = slot
        rows.append(Row(request, 0, request.prompt, True))
    # Execute: one step with every row's whole prompt
    step = engine.runner.step_input(StepPlan([], rows))
    step.sample = None  # every token's logits, rows one after another
    assert step.lora.kernel == kernel
    ours = engine.runner.decoder.forward(step)
    # Assert: each row's logits equal peft's forward with that row's adapter
    start = 0
    for text, adapter in zip(prompts, adapters, strict=True):
        ids = torch.tensor([tok(text)["input_ids"]], device=device)
        with torch.no_grad():
            reference = model(input_ids=ids, adapter_names=[adapter]).logits[0]
        torch.testing.assert_close(ours[start : start + ids.shape[1]], reference, atol=tolerance, rtol=tolerance)
        start += ids.shape[1]
        if adapter != "__base__":
            with torch.no_grad():  # the adapter really changes the logits
                assert not torch.allclose(model(input_ids=ids, adapter_names=["__base__"]).logits[0], reference)


def test_a_step_splits_into_mixed_decode_rows_and_single_adapter_spans() -> None:
    from slmstack.engine.lora import StepAdapters

    cpu = torch.device("cpu")
    # decode rows under adapters 1, 2, 1 (mixed), then a chunk under 2, a bare-base chunk, a chunk under 3
    step = StepAdapters.for_tokens([1, 2, 1, 2, 2, 2, 0, 0, 3, 3], 3, cpu)
    assert step.rows.tolist() == [1, 2, 1] and step.runs == ((3, 6, 2), (8, 10, 3))
    assert step.present == {1, 2}
    # decode rows that share adapter 1 join the chunk after them under 1
    step = StepAdapters.for_tokens([1, 1, 1, 1, 1, 2], 3, cpu)
    assert step.rows is None and step.runs == ((0, 5, 1), (5, 6, 2))
    assert StepAdapters.for_tokens([2, 2, 2], 3, cpu).single == 2


@pytest.mark.parametrize(("adapters", "slots", "attention"), [
    (["qv", "all", "__base__", "mlp"], [0, 1, 2, 3], "in place"),  # decode row i in slot i
    (["all", "mlp", "mlp", "__base__"], [3, 0, 2, 1], "by slot"),  # leaves "qv"'s columns out of the mixed form
    (["qv", "all", "__base__", "mlp"], [1, 6, 9, 11], "copied"),  # 12 slots for 4 rows: their cache is copied
])  # fmt: skip
def test_a_step_of_mixed_decode_rows_and_a_prompt_chunk_gives_peft_logits(adapters: list[str], slots: list[int],
                                                                          attention: str) -> None:  # fmt: skip
    # Prepare: four prompts in the cache under their adapters, in the given slots; a fifth prompt arrives as a
    # chunk. Decode attention reads the rows' slots in place, laid out by slot (idle slots between), or copied
    model, tok = _peft_model(), build_tokenizer()
    prompts = ["first prompt", "a second, longer prompt here", "third", "the fourth one?"]
    engine = Engine(model, tok, max_batch=12)
    engine.cache.ensure(64)
    requests = []
    for slot, text, adapter in zip(slots, prompts, adapters, strict=True):
        request = Request(tok(text)["input_ids"], adapter=engine.lora.id(adapter))
        request.slot = slot
        requests.append(request)
        engine.runner.decoder.forward(engine.runner.step_input(StepPlan([], [Row(request, 0, request.prompt, True)])))
    late = Request(tok("a late prompt")["input_ids"], adapter=engine.lora.id("all"))
    late.slot = 4
    # Execute: one step, each cached row decoding token 7, and the late prompt's whole chunk
    decode = [Row(r, len(r.prompt), [7], True) for r in requests]
    step = engine.runner.step_input(StepPlan(decode, [Row(late, 0, late.prompt, True)]))
    assert step.lora.rows is not None and step.lora.runs  # both forms in one step
    path = "in place" if step.decode_slots is None else "by slot" if step.decode_view is not None else "copied"
    assert path == attention
    ours = engine.runner.decoder.forward(step)
    # Assert: each row's logits equal peft's forward of its whole sequence
    for row, (text, adapter) in enumerate(zip([*prompts, "a late prompt"], [*adapters, "all"], strict=True)):
        ids = tok(text)["input_ids"] + ([7] if row < 4 else [])
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids]), adapter_names=[adapter]).logits[0, -1]
        torch.testing.assert_close(ours[row], reference, atol=1e-5, rtol=1e-5)


def test_adapters_load_and_unload_at_run_time() -> None:
    from slmstack.errors import ConfigError
    from slmstack.stack.config import GenerationSettings

    model, tok = _peft_model(), build_tokenizer()
    engine = Engine(model, tok)
    ids = tok("hi there")["input_ids"]
    settings = GenerationSettings(max_new_tokens=6)
    before = engine.submit(ids, "mlp", settings)
    engine.run()
    engine.remove_adapter("mlp")
    with pytest.raises(ConfigError, match="'mlp' is not loaded"):
        engine.submit(ids, "mlp", settings)
    engine.add_adapter(model, "mlp")
    again = engine.submit(ids, "mlp", settings)
    engine.run()
    assert again.generated().text == before.generated().text
