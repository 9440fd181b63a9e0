from __future__ import annotations

import torch

from slmstack.training.train_data import IGNORE_INDEX, collate, make_batches, tokenize_example
from tests.conftest import build_tiny_llama, build_tokenizer


def test_labels_mask_the_prompt_exactly() -> None:
    # Prepare: char-level tokenizer, so ids are hand-computable
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    # Execute: no chat template -> the model input is "r\n\nab\n", the target "cd" + EOS
    ex = tokenize_example(tok, "r", "ab", "cd", max_length=64, chat=False)
    # Assert
    prompt_ids = [vocab[c] for c in "r\n\nab\n"]
    target_ids = [vocab["c"], vocab["d"], vocab["<|im_end|>"]]
    assert ex.input_ids == prompt_ids + target_ids
    assert ex.labels == [IGNORE_INDEX] * 6 + target_ids
    assert ex.n_targets == 3


def test_overlong_example_keeps_target_and_cuts_prompt_from_left_keeping_its_first_token() -> None:
    tok = build_tokenizer()
    ex = tokenize_example(tok, "", "abcdefghij", "xyz", max_length=6, chat=False)
    vocab = tok.get_vocab()
    assert ex.input_ids == [vocab["a"], vocab["j"], vocab["x"], vocab["y"], vocab["z"], vocab["<|im_end|>"]]
    assert ex.labels[:2] == [IGNORE_INDEX] * 2


def test_a_cut_prompt_never_starts_at_a_zero_embedding_so_the_gradient_stays_finite() -> None:
    """The cause of the NaN loss seen on a GPU (issue #19), reproduced on a CPU in float32.

    A random-weight model has a zero embedding row for its pad token (here <|im_end|>, which is also EOS, as in
    SmolLM2). A prompt cut from the left could start at that token; position 0 attends only to itself, so its
    hidden state stays exactly zero through every layer, and RMSNorm's gradient at zero is 1/sqrt(eps) (~316)
    per norm for eps 1e-5 (here eps 1e-10, so that a 12-layer model overflows as the 30-layer 135M one does):
    the gradient overflows to inf, then NaN, although the loss is finite.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmstack.training.train_data import collate
    from slmstack.training.trainer import _masked_loss

    tok = build_tokenizer()
    eos = tok.eos_token_id
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=12, vocab_size=96, pad_token_id=eos, eos_token_id=eos, bos_token_id=1,
                      rms_norm_eps=1e-10, initializer_range=0.2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    assert not model.get_input_embeddings().weight[eos].any()  # transformers zeroes the padding row
    # the chat-templated prompt "...<|im_end|>\n<|im_start|>assistant\n" cut to its last tokens: without the fix
    # it would start at <|im_end|>
    room = len(tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    ex = tokenize_example(tok, "sys", "a question", "an answer " * 3, max_length=room + 31, chat=True)
    assert ex.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # the first token is kept
    loss, _ = _masked_loss(model, collate([ex], tok.pad_token_id))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # and the same row cut the old way (its last tokens only) starts at <|im_end|>: the gradient is NaN
    model.zero_grad()
    old = type(ex)([eos, *ex.input_ids[2:]], [IGNORE_INDEX, *ex.labels[2:]])
    loss, _ = _masked_loss(model, collate([old], tok.pad_token_id))
    loss.backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batches_cover_every_row_once_and_group_by_length() -> None:
    lengths = [5, 50, 6, 48, 7, 52, 4, 49] * 4
    batches = make_batches(lengths, batch_size=4, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spans) <= 4  # short rows never share a batch with long ones here
    assert batches == make_batches(lengths, batch_size=4, seed=1, epoch=0)
    assert batches != make_batches(lengths, batch_size=4, seed=1, epoch=1)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    naive = sum(max(lengths[i] for i in b) * len(b) for b in make_batches(lengths, 4, 1, 0, group=False))
    assert padded < 0.8 * naive


def test_rows_of_a_batch_never_attend_to_each_other() -> None:
    # Prepare: three examples of different lengths in one right-padded batch
    model = build_tiny_llama().float()
    tok = build_tokenizer()
    examples = [
        tokenize_example(tok, "r", p, c, 64, chat=True) for p, c in [("a", "bcd"), ("hello there", "x"), ("q", "yy")]
    ]
    batch = collate(examples, tok.pad_token_id)
    # Execute
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
    # Assert: each row's logits on its real tokens equal the logits of that example run alone
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        torch.testing.assert_close(together[i, :n], alone[i], atol=1e-5, rtol=1e-4)
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()
