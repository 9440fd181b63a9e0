"""The local backend sees adapters attached, retrained or replaced since its engine last read them."""

from __future__ import annotations

import torch

from slmstack.stack import backends
from tests.conftest import build_tiny_llama


def test_lora_version_changes_with_adapters_and_walks_the_model_once() -> None:
    # Prepare: a peft model with one adapter; count the walks over its parameters
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="one")
    walks = []
    named_parameters = model.named_parameters
    model.named_parameters = lambda *a, **k: walks.append(1) or named_parameters(*a, **k)
    first = backends._lora_version(model)

    # Assert: nothing changed, nothing walked again
    assert backends._lora_version(model) == first and len(walks) == 1

    # Assert: an optimizer-like in-place update changes the version without a walk
    with torch.no_grad():
        next(p for n, p in named_parameters() if "lora_B" in n).add_(1.0)
    second = backends._lora_version(model)
    assert second != first and len(walks) == 1

    # Assert: a second adapter, and the first deleted and attached again under its name, each change it
    model.add_adapter("two", LoraConfig(r=2, target_modules=["v_proj"]))
    third = backends._lora_version(model)
    assert third != second and len(walks) == 2
    model.delete_adapter("one")
    model.add_adapter("one", LoraConfig(r=2, target_modules=["q_proj"]))
    assert backends._lora_version(model) != third and len(walks) == 3

    # Assert: a model without adapters has the empty version
    assert backends._lora_version(build_tiny_llama()) == ()


def test_the_engine_rereads_adapters_when_idle_and_sees_new_ones_while_busy() -> None:
    # Prepare: a backend on a peft model; its engine has read adapter "one"
    from peft import LoraConfig, get_peft_model

    from slmstack.stack.config import GenerationSettings
    from tests.conftest import build_tokenizer

    model = get_peft_model(build_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="one")
    backend = backends.LocalBackend(model, build_tokenizer(), engine="native")
    engine = backend.engine
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    read = lambda: engine.lora.factors[engine.lora.id("one")][0]["qkv"].b_t.abs().sum().item()  # noqa: E731
    assert read() == 0.0  # peft starts B at zero
    # Execute: a request in flight, then the adapter trained in place and a second adapter attached
    engine.submit([1, 2, 3], "one", GenerationSettings(max_new_tokens=2))
    with torch.no_grad():
        lora_b.add_(1.0)
    model.add_adapter("two", LoraConfig(r=2, target_modules=["v_proj"]))
    # Assert: while busy the new adapter is read at once (with the others), and only then
    assert backend.engine.lora.id("two") and read() > 0.0
    with torch.no_grad():
        lora_b.add_(1.0)
    before = read()
    assert backend.engine is engine and read() == before  # busy, same adapters: not read again
    engine.run()
    backend.engine  # noqa: B018 - idle: read again
    assert read() > before


def test_engine_compiled_builds_the_engine_with_compiled_decode_steps(monkeypatch) -> None:
    from slmstack.engine import runner as engine_module
    from tests.conftest import build_tokenizer

    monkeypatch.setattr(engine_module, "_can_compile", lambda: True)  # nothing is compiled before a step
    compiled = backends.LocalBackend(build_tiny_llama(), build_tokenizer(), engine="compiled").engine
    native = backends.LocalBackend(build_tiny_llama(), build_tokenizer(), engine="native").engine
    assert compiled.runner.graphs is not None and compiled.runner.graphs.compiled
    assert native.runner.graphs is None  # a CPU: eager decode steps
