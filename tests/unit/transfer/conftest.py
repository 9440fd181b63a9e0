"""A tiny task collection (the ``yaml`` format users write) and a tiny random BART, built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "fish", "bird"]


def write_collection(root: Path, n: int = 24) -> Path:
    """Three tasks: two yes/no classifications in category ``colour``, one generation in ``animal``."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "is_red": [{"input": f"{w} {i}", "target": "yes" if w == "red" else "no"} for i, w in enumerate(WORDS * 3)],
        "is_blue": [{"input": f"{w} x{i}", "target": "yes" if w == "blue" else "no"} for i, w in enumerate(WORDS * 3)],
        "echo": [{"input": f"say {w}", "target": w} for w in WORDS * 3],
    }
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    spec = {"tasks": [
        {"name": "is_red", "category": "colour", "labels": ["yes", "no"], "data": "is_red.jsonl",
         "instructions": ["Is it red? ", {"prefix": "", "suffix": " Red or not?"}]},
        {"name": "is_blue", "category": "colour", "labels": ["yes", "no"], "data": "is_blue.jsonl",
         "instructions": ["Is it blue? "]},
        {"name": "echo", "category": "animal", "data": "echo.jsonl", "instructions": ["Repeat the word. "]},
    ]}  # fmt: skip
    (root / "tasks.yaml").write_text(yaml.safe_dump(spec))
    return root / "tasks.yaml"


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    return write_collection(tmp_path / "collection")


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    from tests.conftest import build_tokenizer

    path = tmp_path_factory.mktemp("bart")
    cfg = BartConfig(vocab_size=96, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
                     pad_token_id=0, bos_token_id=1, eos_token_id=5, decoder_start_token_id=1,
                     forced_eos_token_id=None)  # fmt: skip
    BartForConditionalGeneration(cfg).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
