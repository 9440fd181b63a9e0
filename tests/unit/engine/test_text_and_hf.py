from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmstack.engine.hf import generate_batch
from slmstack.engine.text import Generated, finish_row, format_prompt, prompt_token_limit
from slmstack.errors import InputError
from slmstack.models import load_model
from slmstack.stack.config import GenerationSettings
from tests.conftest import build_tokenizer


def test_format_prompt_uses_chat_template_with_role_as_system() -> None:
    tok = build_tokenizer()
    text = format_prompt(tok, "be brief", "hi", chat_template=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tok, "be brief", "hi", chat_template=False) == "be brief\n\nhi\n"
    assert format_prompt(tok, "", "hi", chat_template=False) == "hi"


def test_finish_counts_eos_and_cuts_at_stop_string() -> None:
    tok = build_tokenizer()
    ids = tok("ab. cd", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert finish_row(tok, ids + [eos, 7, 7], 3, False, [eos], []) == Generated("ab. cd", 3, len(ids) + 1)
    assert finish_row(tok, ids, 3, False, [eos], ["."]) == Generated("ab", 3, len(ids))


def test_prompt_token_limit() -> None:
    class M:
        class config:  # noqa: N801
            max_position_embeddings = 100

    assert prompt_token_limit(M, 30) == 70
    assert prompt_token_limit(M, 30, 50) == 50
    with pytest.raises(InputError, match="leaves no room"):
        prompt_token_limit(M, 100)


def test_generate_batch_respects_max_new_tokens_and_base_rows(tiny_model_dir: Path) -> None:
    lm = load_model(tiny_model_dir, device="cpu")
    settings = GenerationSettings(max_new_tokens=5)
    texts = [format_prompt(lm.tokenizer, "r", q) for q in ["a", "bbbbbbbbbb"]]
    outs = generate_batch(lm.model, lm.tokenizer, texts, settings, adapter_names=["__base__"] * 2)
    assert [o.tokens_in for o in outs] == [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert all(1 <= o.tokens_out <= 5 for o in outs)


def test_row_streamer_holds_back_stop_strings_whitespace_and_stops_at_eos(tiny_model_dir: Path) -> None:
    from slmstack.engine.hf import RowStreamer

    tok = load_model(tiny_model_dir, device="cpu").tokenizer
    a = tok("hello world STOP more", add_special_tokens=False)["input_ids"]
    b = tok("hi ", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    got: dict[int, list[str]] = {0: [], 1: []}
    streamer = RowStreamer(tok, 2, [eos], ["STOP"], lambda row, delta: got[row].append(delta))
    # Execute: the prompt batch, then one token per row per step; row 1 ends with EOS and then pads
    streamer.put(torch.zeros((2, 3), dtype=torch.long))
    for step in range(len(a)):
        second = b[step] if step < len(b) else eos if step == len(b) else 7
        streamer.put(torch.tensor([a[step], second]))
    # Assert: never past the stop string or the trailing space; nothing after EOS; flush completes the answer
    assert "".join(got[0]) == "hello world"
    assert len(got[0]) > 1  # streamed piece by piece, not at the end
    assert "".join(got[1]) == "hi"
    streamer.flush(0, "hello world")
    assert "".join(got[0]) == "hello world"


def test_generate_batch_streams_each_rows_text_as_decoded(tiny_model_dir: Path) -> None:
    lm = load_model(tiny_model_dir, device="cpu")
    texts = [format_prompt(lm.tokenizer, "r", q) for q in ["a", "bbbbbbbbbb", "cc"]]
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    outs = generate_batch(lm.model, lm.tokenizer, texts, GenerationSettings(max_new_tokens=8),
                          on_text=lambda row, delta: pieces[row].append(delta))  # fmt: skip
    assert ["".join(pieces[i]) for i in range(3)] == [o.text for o in outs]
    assert any(len(p) > 1 for p in pieces.values())
