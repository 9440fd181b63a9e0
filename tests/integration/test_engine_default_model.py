"""The engine on the real default model: its greedy text equals transformers' generate, 20 prompts. Marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
    "What do bees make?", "How many legs does a spider have?", "Write a haiku about the sea.",
    "What is 12 times 7?", "Who wrote Romeo and Juliet?", "Give a synonym for happy.",
    "What is the boiling point of water in Celsius?", "Explain photosynthesis in one sentence.",
    "List two planets near the sun.", "What language is spoken in Brazil?", "Name a mammal that can fly.",
    "What is the opposite of cold?", "Describe a cat in five words.", "What is the largest ocean?",
    "Translate 'thank you' into Spanish.", "What gas do plants breathe in?", "Name a fruit that is yellow.",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """One dequantized cache for the module's tests (the first test converts the GGUF, the next reuses it)."""
    return Path(tmp_path_factory.mktemp("engine-cache"))


def test_engine_greedy_text_equals_transformers_on_the_default_model(model_cache, monkeypatch) -> None:
    from slmstack.engine import Engine
    from slmstack.engine.hf import generate_batch
    from slmstack.engine.text import format_prompt
    from slmstack.models import load_model
    from slmstack.stack.config import GenerationSettings

    monkeypatch.setenv("SLMSTACK_CACHE", str(model_cache))
    lm = load_model("default", device="cpu", dtype="float32")
    texts = [format_prompt(lm.tokenizer, "You answer briefly.", p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=40)
    # Execute: transformers one prompt at a time (no padding), the engine all 20 in one continuous batch
    reference = [generate_batch(lm.model, lm.tokenizer, [t], settings, chat=True)[0] for t in texts]
    engine = Engine(lm.model, lm.tokenizer, max_batch=20)
    handles = [engine.submit(lm.tokenizer(t, add_special_tokens=False)["input_ids"], None, settings) for t in texts]
    engine.run()
    # Assert: every text, token count included
    assert [h.generated() for h in handles] == reference
    assert len({r.text for r in reference}) == len(PROMPTS)


def test_the_default_format_takes_the_ggufs_blocks_exactly_and_keeps_float32s_text(model_cache, monkeypatch) -> None:
    import torch

    from slmstack.engine import Engine
    from slmstack.engine.cpu_kernels import gguf_kernels
    from slmstack.engine.layers import int4_grid
    from slmstack.engine.text import format_prompt
    from slmstack.gguf_source import gguf_source
    from slmstack.models import load_model
    from slmstack.stack.config import GenerationSettings

    monkeypatch.setenv("SLMSTACK_CACHE", str(model_cache))
    lm = load_model("default", device="cpu", dtype="float32")
    # Assert: the GGUF's 210 Q4_1 projections, read as blocks, are the very weights transformers dequantized (and
    # every group lies on a 4-bit grid), and its Q8_0 embeddings (the tied output layer) too
    source = gguf_source(lm.model)
    state = lm.model.state_dict()
    four_bit = [n for n, kind in source.types.items() if kind == "Q4_1"]
    assert len(four_bit) == 210
    assert all(torch.equal(source.int4_groups(n).dequantize(), state[n]) for n in four_bit)
    assert all(bool(int4_grid(state[n])[3].all()) for n in four_bit[:30])
    q8, scale = source.int8_groups("model.embed_tokens.weight")
    embed = (q8.float().reshape(q8.shape[0], -1, 32) * scale[..., None]).reshape(q8.shape)
    assert torch.equal(embed, state["model.embed_tokens.weight"])
    # Execute: the 20 prompts batched on the float32 engine, on the default format and on int4-weights
    texts = [format_prompt(lm.tokenizer, "You answer briefly.", p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=40)
    outputs = {}
    for fmt in ("dense", "auto", "int4-weights"):
        engine = Engine(lm.model, lm.tokenizer, weights=fmt, max_batch=20)
        handles = [
            engine.submit(lm.tokenizer(t, add_special_tokens=False)["input_ids"], None, settings) for t in texts
        ]
        engine.run()
        outputs[fmt] = [h.generated().text for h in handles]
    # Assert: with slmstack's kernel (float32 inputs and sums on the file's own blocks) the default format is
    # float32's text on every prompt; where it cannot be built, torch's int4 kernel rounds inputs, scales and
    # offsets to bfloat16, and most texts are float32's (16 of 20 when last measured; the others part where two
    # tokens are nearly tied, one at its second token: "The fruit that is yellow" against "The most obvious yellow
    # fruit")
    same = sum(a == b for a, b in zip(outputs["auto"], outputs["dense"], strict=True))
    assert same >= (18 if gguf_kernels() is not None else 15), same
    assert outputs["int4-weights"] == outputs["auto"]  # the default model: every projection is 4-bit
