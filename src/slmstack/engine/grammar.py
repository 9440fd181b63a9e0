"""Structured output: OpenAI's ``response_format`` as a grammar that masks a row's logits, token by token.

The grammar library is llguidance (Microsoft; the structured-output engine in vLLM, SGLang and llama.cpp): a
JSON schema or ``{"type": "json_object"}`` is compiled once per request into a matcher that, before each token,
gives the set of tokens that keep the text a prefix of a valid document (a bitmask over the vocabulary), and takes
each chosen token. A constrained row's logits outside the mask are set to ``-inf`` before the sampler picks, so
greedy and sampled rows alike stay inside the grammar, and the row ends (``stop``) once the document is complete.
Rows without a ``response_format`` in the same step are untouched.

Why llguidance: a pip wheel with no dependencies (abi3, so one wheel for every Python), a mask in tens of
microseconds on a CPU without a GPU kernel or a compile step, JSON-schema coverage checked against the JSON Schema
test suite, and the tokenizer read from transformers' fast tokenizers (ByteLevel and SentencePiece byte fallback).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from slmstack.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = ["JSON_LAYOUT", "Constraint", "compile_response_format", "grammar_tokenizer", "normalize_response_format"]

# the layout of the JSON a grammar allows: one way to write each document, as ``json.dumps`` writes it (a small
# model left free to add whitespace can wander in it until its budget runs out); a schema's own ``x-guidance``
# options override these
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.torch  # noqa: F401
    except ImportError:
        raise ConfigError("structured output (response_format) needs llguidance: pip install "
                                "'slmstack[serve]'") from None  # fmt: skip
    return llguidance


def normalize_response_format(value: Any, where: str = "response_format") -> dict[str, Any] | None:
    """OpenAI's ``response_format`` checked: None for free text, else ``{"type": "json_object"}`` or a schema.

    Raises:
        InputError: naming what is wrong (an unknown type, a ``json_schema`` without a ``schema`` object).
    """
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise InputError(f'{where} must be {{"type": "text" | "json_object" | "json_schema", ...}}')
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InputError(f"{where}: type json_schema needs json_schema.schema, a JSON schema object")
    return {"type": "json_schema", "json_schema": {"name": str(spec.get("name", "schema")), "schema": schema}}


def _schema(response_format: dict[str, Any]) -> dict[str, Any]:
    if response_format["type"] == "json_object":
        return {"type": "object"}
    return response_format["json_schema"]["schema"]


@dataclass(frozen=True)
class _TokenBytes:
    """A tokenizer as llguidance's generic wrapper reads it: each token's bytes, for tokenizers it cannot parse."""

    eos_token_id: int
    bos_token_id: int | None
    tokens: list[bytes]
    special_token_ids: list[int]
    encode: Any

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


@functools.lru_cache(maxsize=8)
def _grammar_tokenizer(tokenizer: Any, n_vocab: int) -> Any:
    llg = _llguidance()
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
    except ValueError:  # a decoder llguidance does not read: each token's bytes from its own decoding
        special = set(tokenizer.all_special_ids)
        names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        # llguidance's convention: a special token's bytes are 0xFF then its name (no text can contain 0xFF)
        tokens = [b"\xff" + str(names[i] if i < len(names) else f"<unused{i}>").encode()
                  if i in special or i >= len(names) else tokenizer.decode([i]).encode("utf-8")
                  for i in range(n_vocab)]  # fmt: skip
        wrapped = _TokenBytes(tokenizer.eos_token_id, tokenizer.bos_token_id, tokens, sorted(special),
                              lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])  # fmt: skip
        return llg.LLTokenizer(llg.TokenizerWrapper(wrapped), n_vocab=n_vocab)


def grammar_tokenizer(tokenizer: Any, n_vocab: int) -> Any:
    """The tokenizer as llguidance reads it: over a vocabulary of ``n_vocab`` logits (built once, about a second)."""
    return _grammar_tokenizer(tokenizer, n_vocab)


def compile_response_format(response_format: dict[str, Any], tokenizer: Any, n_vocab: int) -> str:
    """The llguidance grammar of a normalized ``response_format``, checked against the tokenizer.

    Raises:
        InputError: the schema uses something llguidance cannot enforce (its message, one line).
    """
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(_schema(response_format)), defaults=JSON_LAYOUT)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise InputError(f"response_format: the JSON schema cannot be enforced ({reason})") from None
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, grammar_tokenizer(tokenizer, n_vocab))
    if failed:
        raise InputError(f"response_format: the JSON schema cannot be enforced ({' '.join(messages)[:200]})")
    return grammar


class Constraint:
    """One row's grammar: :meth:`mask` its logits before a token is chosen, :meth:`take` the chosen token."""

    def __init__(self, grammar: str, tokenizer: Any, n_vocab: int) -> None:
        llg = _llguidance()
        self.lltok = grammar_tokenizer(tokenizer, n_vocab)
        self.matcher = llg.LLMatcher(self.lltok, grammar)
        self.bitmask = llg.torch.allocate_token_bitmask(1, n_vocab)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar does not allow next to ``-inf`` (one row, in place)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        row = logits.view(1, -1)
        llguidance.torch.apply_token_bitmask_inplace(row, self.bitmask.to(row.device))

    def take(self, token: int) -> bool:
        """Advance by the chosen token; True once the document is complete (the row should stop)."""
        if not self.matcher.consume_token(token):  # the mask left no token (a tokenizer that cannot spell it)
            logger.warning("a constrained row ended early: %s", self.matcher.get_error().splitlines()[0][:200])
            return True
        return self.matcher.is_stopped()
