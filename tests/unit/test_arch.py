from __future__ import annotations

import pytest

from slmstack.arch import ARCHITECTURES, get_arch, get_decoder_layers
from slmstack.errors import ConfigError
from tests.conftest import build_tiny_llama, tiny_model


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


def test_an_architecture_outside_the_table_gets_the_layout_found_by_name() -> None:
    # OPT (decoder layers under model.decoder, MLP fc1/fc2) is not in the table; tests/unit/test_support_matrix.py
    # trains, prunes, federates, evaluates and serves it
    model = tiny_model("opt")
    assert "opt" not in ARCHITECTURES
    spec = get_arch(model)
    assert spec.layers == "model.decoder.layers" and spec.mlp == ("fc1", "fc2")
    assert set(spec.attention) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}
    assert set(spec.lora_targets) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert spec.embeddings == "model.decoder.embed_tokens" and not spec.engine


def test_a_model_with_no_linear_projections_is_refused_with_what_was_looked_for() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, bos_token_id=1, eos_token_id=1))
    with pytest.raises(ConfigError, match=r"unsupported architecture 'gpt2': looked for a list of decoder layers "
                                          r"whose attention .* found 2 x GPT2Block in 'transformer.h' with nn.Linear "
                                          r"projections none"):  # fmt: skip
        get_arch(gpt2)
