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
    # Prepare: four prompts of different lengths, each under another adapter (one on the bare base)
    model, tok = _peft_model(), build_tokenizer()
    prompts = ["first prompt", "a second, longer prompt here", "third", "the fourth one?"]
    adapters = ["qv", "__base__", "all", "mlp"]
    engine = Engine(model, tok, max_batch=4)
    engine.cache.ensure(64)
    rows = []
    for slot, text in enumerate(prompts):
        request = Request(tok(text)["input_ids"], adapter=engine.lora.id(adapters[slot]))
        request.slot = slot
        rows.append(Row(request, 0, request.prompt, True))
    # Execute: one step with every row's whole prompt
    step = engine._inputs(StepPlan([], rows))
    step.sample = None  # every token's logits, rows one after another
    ours = engine.decoder.forward(step)
    # Assert: each row's logits equal peft's forward with that row's adapter
    start = 0
    for text, adapter in zip(prompts, adapters, strict=True):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            reference = model(input_ids=ids, adapter_names=[adapter]).logits[0]
        torch.testing.assert_close(ours[start : start + ids.shape[1]], reference, atol=1e-5, rtol=1e-5)
        start += ids.shape[1]
    with torch.no_grad():  # and the adapters really change the logits
        assert not torch.allclose(model(input_ids=ids, adapter_names=["__base__"]).logits[0], reference)


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
