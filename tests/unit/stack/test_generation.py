from __future__ import annotations

from pathlib import Path

import pytest

from slmstack.errors import InputError
from slmstack.models import load_model
from slmstack.stack.config import GenerationSettings
from slmstack.stack.generation import Generated, _finish, format_prompt, generate_batch, prompt_token_limit
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
    assert _finish(tok, ids + [eos, 7, 7], 3, False, [eos], []) == Generated("ab. cd", 3, len(ids) + 1)
    assert _finish(tok, ids, 3, False, [eos], ["."]) == Generated("ab", 3, len(ids))


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
