"""Shared fixtures: a tiny random llama with a char-level tokenizer, built in the test, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

CHARS = list(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-\n{}()[]")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The public datasets beside a development checkout; a user's clone has none. A test that reads them is marked
# ``@pytest.mark.needs_data("flan_cot")`` (a folder under it) and skips, with the reason, where it is missing.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    # Tests never reach a model hub; make any accidental hub access fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_data"):
        folder = SHARED_DATA.joinpath(*mark.args)
        if not folder.is_dir():
            where = "/".join(("../shared/data", *mark.args))
            pytest.skip(f"needs {where} (the public datasets beside the checkout)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(16)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unit tests get a private cache; the slow tests on the real model set their own.
    if "SLMSTACK_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("SLMSTACK_CACHE", str(tmp_path_factory.mktemp("cache")))


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(hidden: int = 32, vocab: int = 96, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=1024, initializer_range=0.2,
        bos_token_id=1, eos_token_id=5, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_model(kind: str):
    """A tiny random model of another architecture, with what sets it apart switched on.

    ``mistral-window``, ``gemma3``, ``gemma3-softcap``, ``qwen3``, ``phi3``, ``gpt_neox`` (parallel residual),
    ``gpt_neox-sequential``, ``qwen2``, ``opt`` (outside slmstack's table).
    """
    import transformers as tf

    common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 3, "vocab_size": 96, "max_position_embeddings": 256, "initializer_range": 0.2,
              "bos_token_id": 1, "eos_token_id": 5, "pad_token_id": 0}  # fmt: skip
    torch.manual_seed(0)
    if kind == "mistral-window":  # every layer sees its last 6 positions
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=6))
    elif kind.startswith("gemma3"):  # local (window 6, RoPE base 10k) and global layers, attention scale 256⁻½
        extra = {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0} if kind == "gemma3-softcap" else {}
        config = tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=6,
                                     layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                     **extra)  # fmt: skip
        model = tf.Gemma3ForCausalLM(config)
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=96, word_embed_proj_dim=32, max_position_embeddings=256,
                                               bos_token_id=1, eos_token_id=5, pad_token_id=0))  # fmt: skip
    elif kind == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    elif kind.startswith("gpt_neox"):  # Pythia: a quarter of each head rotated, LayerNorm with bias
        neox = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        config = tf.GPTNeoXConfig(**neox, use_parallel_residual=kind == "gpt_neox", attention_bias=True)
        model = tf.GPTNeoXForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so that reading them wrong shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def save_tiny_model(path: Path, hidden: int = 32) -> Path:
    build_tiny_llama(hidden=hidden).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def save_random_adapter(model_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj"), r: int = 4) -> Path:
    """A LoRA adapter with non-zero random A and B, so it really changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                 init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "first": save_random_adapter(tiny_model_dir, root / "first", seed=1),
        "third": save_random_adapter(tiny_model_dir, root / "third", seed=3, targets=("q_proj", "down_proj")),
    }


def stack_dict(model: Path | str, adapters: dict[str, Path] | None = None, max_new: int = 12) -> dict:
    """A 3-stage stack: two stages with random LoRA adapters and one base stage in between."""
    adapters = adapters or {}
    gen = {"max_new_tokens": max_new}
    return {
        "name": "tiny",
        "model": str(model),
        "batch_size": 4,
        "stages": [
            {"name": "first", "role": "restate", "template": "Q: {input}", "generation": gen,
             "adapter": str(adapters["first"]) if "first" in adapters else None},
            {"name": "second", "role": "recall", "template": "Q: {input} A: {first}", "generation": gen},
            {"name": "third", "role": "answer", "template": "{first} / {second}: {input}", "generation": gen,
             "adapter": str(adapters["third"]) if "third" in adapters else None},
        ],
    }  # fmt: skip


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


QUESTIONS = ["what is two plus two?", "name a red fruit.", "why is the sky blue? tell me", "hi"]
