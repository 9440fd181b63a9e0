"""Training examples for one stage: tokenisation with prompt-masked labels, and length-grouped batches.

Loss falls only on the target tokens: prompt positions carry the label ``-100``. Batches are grouped
by length (sorted inside seeded mega-chunks, as HF's ``group_by_length``) and padded only to their own
longest row, so little compute goes to padding. Every row keeps its own attention mask: rows never
attend to each other (no packing across samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmstack.engine.text import cut_left, format_prompt
from slmstack.errors import InputError
from slmstack.io import iter_jsonl

__all__ = ["IGNORE_INDEX", "Seq2SeqExample", "StageRecord", "TokenizedExample", "collate", "load_stage_records",
           "make_batches", "tokenize_example", "tokenize_seq2seq"]  # fmt: skip

IGNORE_INDEX = -100


@dataclass
class StageRecord:
    """One training pair for a stage: the rendered prompt and the target completion."""

    id: str
    prompt: str
    completion: str


@dataclass
class TokenizedExample:
    """Token ids of prompt + target, and labels that are ``-100`` on the prompt."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        """How many positions carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Seq2SeqExample:
    """An encoder-decoder example: encoder ids of the prompt, decoder labels of the target."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        """How many positions carry loss."""
        return len(self.labels)


def tokenize_seq2seq(tokenizer: Any, prompt: str, completion: str, max_length: int) -> Seq2SeqExample:
    """Tokenise one pair for an encoder-decoder model (BART, T5): prompt to the encoder, target to the decoder."""
    source = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
    target = tokenizer(text_target=completion, truncation=True, max_length=max_length)["input_ids"]
    return Seq2SeqExample(source, target)


def load_stage_records(path: Path, skip_bad: bool = False) -> list[StageRecord]:
    """Read a stage's JSONL (``prompt`` and ``completion`` per line, as ``slmstack distill`` writes).

    Raises:
        InputError: a missing file, malformed line, or missing field, with the file and line.
    """
    if not path.is_file():
        raise InputError(f"{path}: no training data for this stage. Run slmstack distill first, or pass --stages.")
    records = []
    for number, rec in iter_jsonl(path, skip_bad=skip_bad):
        missing = [k for k in ("prompt", "completion") if not isinstance(rec.get(k), str)]
        if missing:
            if skip_bad:
                continue
            raise InputError(f"{path}:{number}: missing text field {missing[0]!r} (keys: {', '.join(rec)})")
        records.append(StageRecord(str(rec.get("id", number)), rec["prompt"], rec["completion"]))
    if not records:
        raise InputError(f"{path}: holds no training records")
    return records


def tokenize_example(
    tokenizer: Any, role: str, prompt: str, completion: str, max_length: int, chat: bool
) -> TokenizedExample:
    """Tokenise one pair exactly as inference will see it (chat template, role as system message).

    Too long: the target keeps up to ``max_length - 1`` tokens, and the prompt is cut from the left, keeping
    its first token (see :func:`slmstack.engine.text.cut_left`), as inference cuts it.
    """
    text = format_prompt(tokenizer, role, prompt, chat)
    prompt_ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    target_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target_ids = target_ids[: max_length - 1]
    prompt_ids = cut_left(prompt_ids, max_length - len(target_ids))
    return TokenizedExample(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)


def make_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: bool = True) -> list[list[int]]:
    """Seeded batch order for one epoch; with ``group``, rows of similar length share a batch."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 16
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda j: -lengths[j])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def collate(examples: list, pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (or ``pad_to``); padding has attention 0 and label -100.

    Encoder-decoder examples (:class:`Seq2SeqExample`) get their labels padded apart, as ``decoder_labels``.
    """
    if examples and isinstance(examples[0], Seq2SeqExample):
        return _collate_seq2seq(examples, pad_id)
    width = pad_to or max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _collate_seq2seq(examples: list[Seq2SeqExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    target_width = max(len(e.labels) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, S)
    labels = torch.full((len(examples), target_width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_labels": labels}
