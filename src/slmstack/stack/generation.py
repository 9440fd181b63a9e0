"""Batched generation on one shared model, with a LoRA adapter chosen per row.

Rows are left-padded into one batch. On a peft model, ``adapter_names`` routes each row through
its own adapter (``"__base__"`` = no adapter) in a single forward pass, so different stages, or
different stacks, can share a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from slmstack.errors import InputError, SlmstackError
from slmstack.stack.config import GenerationSettings
from slmstack.stack.fused_lora import fused_lora

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_ADAPTER",
    "GenerationCancelled",
    "Generated",
    "RowStreamer",
    "TextStream",
    "cut_left",
    "encode_prompts",
    "eos_token_ids",
    "finish_row",
    "format_prompt",
    "generate_batch",
    "prompt_token_limit",
    "tail_text",
]

BASE_ADAPTER = "__base__"


class GenerationCancelled(SlmstackError):
    """Generation was stopped from outside (the server is shutting down, or the caller cancelled)."""


@dataclass
class Generated:
    """One row's result: the text, how many tokens went in and came out, and whether input was cut."""

    text: str
    tokens_in: int
    tokens_out: int
    truncated: bool = False


class TextStream:
    """One row's text as its tokens arrive: ``on_text(delta)`` for each new piece that can no longer change.

    Text that may still change is held back: an incomplete UTF-8 character, trailing whitespace (the final
    answer is stripped), a tail that could grow into a stop string, and everything from a stop string on. So
    the streamed pieces always add up to a prefix of the final answer, and :meth:`flush` sends the rest.
    """

    def __init__(self, tokenizer: Any, stop: list[str], on_text: Any) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> None:
        """A new (non-EOS) token of the row."""
        self.ids.append(token)
        self._emit(self._safe_text())

    def end(self) -> None:
        """The row ended on EOS: the held-back tail is final now."""
        self._emit(self._safe_text(ended=True))

    def flush(self, final: str) -> None:
        """Send whatever of ``final`` (the row's finished answer) has not been streamed yet."""
        self._emit(final)

    def _safe_text(self, ended: bool = False) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return ""
        for s in self.stop:
            if s in text:
                text = text[: text.index(s)]
        if not ended:  # a tail that may yet grow into a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        return text.rstrip()

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent) :], text
            self.on_text(delta)


class RowStreamer:
    """Streams each row's text while ``generate`` decodes: ``on_text(row, delta)`` per new piece of text.

    A transformers streamer (``put``/``end``, as ``BaseStreamer``) that handles batches: the first ``put``
    is the prompt batch and is skipped; each later one holds one new token per row. A row stops streaming
    at its EOS token. Each row's text is a :class:`TextStream`.
    """

    def __init__(self, tokenizer: Any, n_rows: int, eos_ids: list[int], stop: list[str],
                 on_text: Any) -> None:  # fmt: skip
        self.eos_ids = set(eos_ids)
        self.rows = [TextStream(tokenizer, stop, lambda delta, row=row: on_text(row, delta)) for row in range(n_rows)]
        self.done = [False] * n_rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Called by ``generate``: first the prompts (B, T), then one token per row (B,)."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                self.rows[row].end()
                continue
            self.rows[row].add(token)

    def end(self) -> None:
        """Called by ``generate`` when decoding ends (the caller sends the final text with :meth:`flush`)."""

    def flush(self, row: int, final: str) -> None:
        """Send whatever of ``final`` (the row's finished answer) has not been streamed yet."""
        self.rows[row].flush(final)


def format_prompt(tokenizer: Any, role: str, message: str, chat_template: bool = True) -> str:
    """The exact text the model sees: the chat template (system = role) when there is one, else plain text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": role}] if role else []
        messages.append({"role": "user", "content": message})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{role}\n\n{message}\n" if role else message


def prompt_token_limit(model: Any, max_new_tokens: int, max_input_tokens: int | None = None) -> int:
    """Longest prompt that fits: ``max_input_tokens`` if set, else the context window minus the new tokens."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    limit = context - max_new_tokens
    if max_input_tokens is not None:
        limit = min(limit, max_input_tokens)
    if limit < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for input in a {context}-token context")
    return limit


def tail_text(tokenizer: Any, ids: list[int], chars: int) -> str:
    """The decoded text of the last tokens of ``ids``, at least ``chars`` characters of it when there are that many.

    Decodes the last ``chars`` tokens, and twice as many while that gives fewer than ``chars`` characters (tokens
    that decode to nothing, such as special tokens, would otherwise hide a stop string).
    """
    window = chars
    while True:
        text = tokenizer.decode(ids[-window:], skip_special_tokens=True)
        if len(text) >= chars or window >= len(ids):
            return text
        window *= 2


def cut_left(ids: list[int], limit: int) -> list[int]:
    """The last ``limit`` tokens of ``ids``, but with its first token kept in front (when ``limit`` >= 2).

    The first token of a prompt (BOS, or the chat template's first marker) stays: a sequence that starts at an
    arbitrary token can start at one whose embedding is zero (a padding row), and position 0 attends only to
    itself, so its hidden state stays zero through every layer; RMSNorm's gradient at zero is 1/sqrt(eps)
    (about 316) per norm, and after a few dozen norms the gradient overflows to NaN.
    """
    if len(ids) <= limit:
        return list(ids)
    return ids[:1] + ids[len(ids) - limit + 1 :] if limit >= 2 else ids[-limit:]


def encode_prompts(
    tokenizer: Any, texts: list[str], limit: int, on_overflow: str, chat: bool
) -> tuple[list, list[bool]]:
    """Token ids of each text, cut to ``limit`` tokens as ``on_overflow`` says, and whether each was cut."""
    # A chat template already holds the special tokens; don't let the tokenizer add a second BOS.
    encoded = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    rows, truncated = [], []
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            if on_overflow == "error":
                raise InputError(
                    f"input {i} is {len(ids)} tokens, over the {limit}-token limit. Shorten it, raise "
                    "max_input_tokens, or set on_overflow: truncate."
                )
            logger.warning("input %d is %d tokens; keeping its first and last %d (on_overflow: truncate)", i, len(ids),
                           limit - 1)  # fmt: skip
            ids = cut_left(ids, limit)
        rows.append(ids)
        truncated.append(len(encoded[i]) > limit)
    return rows, truncated


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a row: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, list | tuple) else [ids]
    ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None})


def _generation_config(settings: GenerationSettings, pad_id: int, eos_ids: list[int]) -> Any:
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    return GenerationConfig(**kwargs)


def generate_batch(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    settings: GenerationSettings,
    adapter_names: list[str] | None = None,
    max_input_tokens: int | None = None,
    on_overflow: str = "truncate",
    chat: bool = True,
    on_text: Any = None,
    cancel: Any = None,
) -> list[Generated]:
    """Generate a continuation for every text in one left-padded batch.

    Args:
        model: a causal LM, or a peft model when ``adapter_names`` names adapters.
        tokenizer: its tokenizer.
        texts: full model inputs (already passed through :func:`format_prompt`).
        settings: decoding settings shared by the batch.
        adapter_names: per-row peft adapter (``"__base__"`` for none); None = use the model as is.
        max_input_tokens: cap on prompt length (default: context window minus ``max_new_tokens``).
        on_overflow: ``truncate`` (keep the last tokens, with a warning) or ``error``.
        chat: the texts came from a chat template (so the tokenizer adds no special tokens).
        on_text: ``on_text(row, delta)`` streams each row's text as it is decoded (see :class:`RowStreamer`).
        cancel: a ``threading.Event``; once set, decoding stops at the next token and
            :class:`GenerationCancelled` is raised.

    Returns:
        One :class:`Generated` per text, in order.
    """
    limit = prompt_token_limit(model, settings.max_new_tokens, max_input_tokens)
    rows, truncated = encode_prompts(tokenizer, texts, limit, on_overflow, chat)
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    batch = _left_pad(rows, pad_id, device)
    extra: dict[str, Any] = {}
    single = None  # the one adapter every row uses: run peft's plain path, not the mixed-batch one
    if adapter_names is not None and hasattr(model, "peft_config"):
        if len(set(adapter_names)) == 1:
            single = adapter_names[0]
        else:
            extra["adapter_names"] = list(adapter_names)
    elif adapter_names is not None and any(name != BASE_ADAPTER for name in adapter_names):
        raise ValueError(f"adapters {sorted(set(adapter_names))} requested, but the model has no adapters loaded")
    streamer = None
    if on_text is not None:
        streamer = RowStreamer(tokenizer, len(rows), eos_ids, settings.stop, on_text)
        extra["streamer"] = streamer
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    config = _generation_config(settings, pad_id, eos_ids)
    criteria = _stopping_criteria(tokenizer, batch["input_ids"].shape[1], settings.stop, cancel)
    if criteria:
        extra["stopping_criteria"] = criteria
    with torch.inference_mode(), _only_adapter(model, single), fused_lora(model):
        out = model.generate(**batch, generation_config=config, **extra)
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation was cancelled")
    new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()  # (B, new)
    results = [
        finish_row(tokenizer, ids, len(row), cut, eos_ids, settings.stop)
        for ids, row, cut in zip(new_tokens, rows, truncated, strict=True)
    ]
    if streamer is not None:
        for i, r in enumerate(results):
            streamer.flush(i, r.text)
    return results


def _stopping_criteria(tokenizer: Any, width: int, stop: list[str], cancel: Any) -> list[Any]:
    """Stop a row once its text holds a stop string, and every row once ``cancel`` is set.

    transformers' own ``stop_strings`` maps each string onto the vocabulary first and raises on characters
    the vocabulary lacks; matching the decoded text works for any string.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    stops = [s for s in stop if s]

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if cancel is not None and cancel.is_set():
                return done.fill_(True)
            if stops:
                chars = max(len(s) for s in stops) + 4
                texts = [tail_text(tokenizer, row[width:].tolist(), chars) for row in input_ids]
                done |= torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)
            return done

    return StoppingCriteriaList([_Stop()]) if stops or cancel is not None else []


@contextmanager
def _only_adapter(model: Any, name: str | None) -> Iterator[None]:
    """Make ``name`` the only adapter in use (``"__base__"``: none) for the block; None: leave routing alone."""
    if name is None:
        yield
    elif name == BASE_ADAPTER:
        with model.disable_adapter():
            yield
    else:
        previous = model.active_adapter
        model.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(previous, inference_mode=True)


def finish_row(tokenizer: Any, ids: list[int], n_in: int, cut: bool, eos_ids: list[int], stop: list[str]) -> Generated:
    """A row's result from its new token ids: the text up to EOS and the first stop string, stripped."""
    end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    kept = ids if end is None else ids[:end]
    n_out = len(kept) + (0 if end is None else 1)  # the EOS token was generated too
    text = tokenizer.decode(kept, skip_special_tokens=True)
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return Generated(text.strip(), n_in, n_out, cut)
