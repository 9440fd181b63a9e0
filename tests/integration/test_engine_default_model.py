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


def test_engine_greedy_text_equals_transformers_on_the_default_model(tmp_path_factory, monkeypatch) -> None:
    from slmstack.engine import Engine
    from slmstack.models import load_model
    from slmstack.stack.config import GenerationSettings
    from slmstack.stack.generation import format_prompt, generate_batch

    monkeypatch.setenv("SLMSTACK_CACHE", str(Path(tmp_path_factory.mktemp("engine-cache"))))
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
