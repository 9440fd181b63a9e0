"""The fused LoRA forward against peft's own forward, on a tiny model with random non-zero adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmstack.engine.hf import _plain_lora_layers, fused_lora
from slmstack.stack.adapters import attach_adapters
from tests.conftest import save_random_adapter


@pytest.fixture()
def peft_model(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    adapters = {
        "a": save_random_adapter(tiny_model_dir, tmp_path / "a", seed=1),
        "b": save_random_adapter(tiny_model_dir, tmp_path / "b", seed=2, targets=("q_proj", "down_proj"), r=2),
    }
    return attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), adapters)


def _logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def test_one_adapter_gives_peft_logits(peft_model) -> None:
    ids = torch.randint(6, 90, (3, 11))
    peft_model.set_adapter("a")
    expected = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    with fused_lora(peft_model):
        fused = _logits(peft_model, ids)
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter matters, so the match below means something
    assert torch.allclose(fused, expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_gives_peft_logits(peft_model) -> None:
    ids = torch.randint(6, 90, (4, 9))
    names = ["a", "__base__", "b", "a"]
    expected = _logits(peft_model, ids, adapter_names=names)
    with fused_lora(peft_model):
        fused = _logits(peft_model, ids, adapter_names=names)
    assert torch.allclose(fused, expected, atol=1e-5, rtol=1e-5)
    # and each row is what that row alone through its adapter gives
    peft_model.set_adapter("b")
    alone = _logits(peft_model, ids[2:3])
    assert torch.allclose(fused[2:3], alone, atol=1e-5, rtol=1e-5)


def test_the_block_swaps_the_forward_and_restores_it(peft_model) -> None:
    layers = _plain_lora_layers(peft_model)
    assert layers  # q_proj, v_proj, down_proj of two layers
    with fused_lora(peft_model):
        assert all("forward" in layer.__dict__ for layer in layers)
        # every adapter is packed on entry, before any activation exists (lazy packing fragmented the heap)
        assert all(set(layer.__dict__["_slmstack_fused"]) == set(layer.lora_A) for layer in layers)
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_changed_adapter_weights_are_picked_up(peft_model) -> None:
    ids = torch.randint(6, 90, (2, 7))
    peft_model.set_adapter("a")
    with fused_lora(peft_model):
        before = _logits(peft_model, ids)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B.a" in name:
                p.mul_(-1.0)
    expected = _logits(peft_model, ids)
    with fused_lora(peft_model):
        after = _logits(peft_model, ids)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, expected, atol=1e-5, rtol=1e-5)
