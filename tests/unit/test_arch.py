from __future__ import annotations

import pytest

from slmstack.arch import ARCHITECTURES, get_arch, get_decoder_layers
from slmstack.errors import ConfigError
from tests.conftest import build_tiny_llama


def test_llama_layers_and_lora_targets() -> None:
    model = build_tiny_llama(layers=3)
    layers = get_decoder_layers(model)
    assert len(layers) == 3 and layers is model.model.layers
    assert get_arch(model).lora_targets == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_gpt_neox_layers() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=64))  # fmt: skip
    assert get_decoder_layers(model) is model.gpt_neox.layers
    for layer in get_decoder_layers(model):
        names = dict(layer.named_modules())
        assert all(n in names for n in get_arch(model).attention + get_arch(model).mlp)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_entry_names_projections(name: str) -> None:
    spec = ARCHITECTURES.get(name)
    assert spec.layers and spec.attention and spec.mlp and spec.lora_targets


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(
        ConfigError, match=r"unsupported architecture 'bert'. Supported: gemma3, gemma3_text, gpt_neox"
    ):
        get_arch("bert")
