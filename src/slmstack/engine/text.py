"""The text side of generation, shared by every way of generating: settings, results, streams and stop strings.

A stage decodes under :class:`GenerationSettings`; each row ends as a :class:`Generated`; text streams out through
a :class:`TextStream` that never sends what a stop string may still take back. The engine (:mod:`.engine`), the
transformers fallback (:mod:`.hf`) and every caller above them use these, and nothing here knows about stacks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from slmstack.config import check_range
from slmstack.errors import ConfigError, InputError, SlmstackError

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_ADAPTER",
    "MIN_TEMPERATURE",
    "GenerationCancelled",
    "GenerationSettings",
    "Generated",
    "TextStream",
    "cut_left",
    "encode_prompts",
    "eos_token_ids",
    "finish_row",
    "format_prompt",
    "prompt_token_limit",
    "tail_text",
]

BASE_ADAPTER = "__base__"  # the adapter name of a row that runs on the bare base model
MIN_TEMPERATURE = 1e-4  # below it logits / temperature overflows; greedy decoding is what is meant


@dataclass(kw_only=True)
class GenerationSettings:
    """How one stage decodes. Greedy (``do_sample: false``) is deterministic; sampling uses ``seed``."""

    max_new_tokens: int = field(default=64, metadata={"help": "upper bound on generated tokens"})
    do_sample: bool = field(default=False, metadata={"help": "false = greedy decoding"})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = field(default=0, metadata={"help": "torch seed set before sampling"})
    stop: list[str] = field(default_factory=list, metadata={"help": "strings that end generation"})
    response_format: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "OpenAI's response_format: {type: json_object} or {type: json_schema, json_schema: {schema: ...}}"
        },
    )

    def __post_init__(self) -> None:
        from slmstack.engine.grammar import normalize_response_format

        try:
            self.response_format = normalize_response_format(self.response_format)
        except InputError as exc:
            raise ConfigError(str(exc)) from None
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= MIN_TEMPERATURE:
            raise ConfigError(f"temperature must be >= {MIN_TEMPERATURE}, got {self.temperature}; "
                              "use do_sample: false for greedy")  # fmt: skip
        check_range(self, "top_p", 0, 1, low_open=True)
        check_range(self, "top_k", 0)
        check_range(self, "repetition_penalty", 0, low_open=True)
        check_range(self, "seed", 0, 2**63 - 1)
        if any(not s for s in self.stop):
            raise ConfigError("stop: every stop string must be non-empty")


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


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a row: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, list | tuple) else [ids]
    ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None})


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
