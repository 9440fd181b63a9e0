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
