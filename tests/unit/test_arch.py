from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmstack.arch import ARCHITECTURES, get_arch, get_decoder_layers
from slmstack.errors import ConfigError
from slmstack.models import load_model
from tests.conftest import build_tiny_llama, build_tokenizer, stack_dict, write_yaml


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


def _save_tiny_opt(path: Path) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                       word_embed_proj_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=5,
                       pad_token_id=0)  # fmt: skip
    OPTForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_an_architecture_outside_the_table_trains_prunes_and_evaluates_by_the_layout_found(tmp_path: Path) -> None:
    from slmstack.cli import main
    from slmstack.pruning.engine import prune
    from slmstack.stack.config import load_stack_config
    from slmstack.training.trainer import TrainConfig, train_stack

    # Prepare: OPT (decoder layers under model.decoder, MLP fc1/fc2) is not in the table
    model_dir = _save_tiny_opt(tmp_path / "opt")
    model = load_model(str(model_dir), device="cpu").model
    assert "opt" not in ARCHITECTURES
    spec = get_arch(model)
    assert spec.layers == "model.decoder.layers" and spec.mlp == ("fc1", "fc2")
    assert set(spec.attention) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}
    assert set(spec.lora_targets) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    # Execute: train one stage for 2 steps, evaluate the trained stack, prune the base
    stack = load_stack_config(write_yaml(tmp_path / "stack.yaml", stack_dict(model_dir)))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": str(i), "prompt": f"say {w}", "completion": f"{w}."} for i, w in enumerate(["cat", "dog", "sun"])]
    (data / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = train_stack(stack, data, tmp_path / "out", TrainConfig(max_steps=2, batch_size=2), stages=["first"])
    task = tmp_path / "t.yaml"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2})
                                              + "\n" for i in range(4)))  # fmt: skip
    task.write_text(f"name: t\ndata_file: {tmp_path / 't.jsonl'}\nkind: multiple_choice\n")
    code = main(["eval", "--stack", str(trained), "--tasks", str(task), "--out", str(tmp_path / "e.json")])
    pruned = prune(model, "magnitude", 0.5)
    # Assert
    metrics = [json.loads(line) for line in (tmp_path / "out" / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["tasks"]["t"]["n"] == 4
    assert abs(pruned.report["actual_sparsity"] - 0.5) < 0.01


def test_a_model_with_no_linear_projections_is_refused_with_what_was_looked_for() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, bos_token_id=1, eos_token_id=1))
    with pytest.raises(ConfigError, match=r"unsupported architecture 'gpt2': looked for a list of decoder layers "
                                          r"whose attention .* found 2 x GPT2Block in 'transformer.h' with nn.Linear "
                                          r"projections none"):  # fmt: skip
        get_arch(gpt2)
