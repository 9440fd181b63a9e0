"""Log-likelihood scoring with lm-evaluation-harness semantics, on any causal LM (optionally one adapter).

``loglikelihood`` reproduces lm-eval's ``HFLM`` request by request: the same context/continuation
split (trailing context spaces move to the continuation; the whole string is encoded, then split),
the same left truncation to ``max_length + 1`` tokens, the same sum of log-softmax over the
continuation and the same greedy flag.

Given slmstack's engine (``engine=``, as evaluation targets pass it when the engine runs their model), requests run
on the engine's forward (:meth:`slmstack.engine.Engine.loglikelihoods`): each context once, its continuations side
by side in cache slots, and the prefix all contexts share once per call. Otherwise (and for requests the engine
does not take: left-truncated ones, empty continuations, sequences over :data:`ENGINE_MAX_TOKENS`) requests run on
transformers' forward, batched, longest first, right-padded (no mask is needed: under a causal mask no real token
sees the padding after it), and, when several requests share a context, the context is run once and its
key/value cache reused for every continuation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["ENGINE_MAX_TOKENS", "Scorer", "model_max_length"]

# the longest sequence scored on the engine: its cache holds every slot at the longest length scored (45 KB a token
# and slot for the default model), so a few long perplexity windows go to transformers instead
ENGINE_MAX_TOKENS = 1024
_UNKNOWN = "\0unknown"


def model_max_length(model: Any, tokenizer: Any, default: int = 2048) -> int:
    """lm-eval's rule: the first of the config's context attributes, else the tokenizer's, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else default


@dataclass
class _Request:
    index: int
    context: list[int]
    continuation: list[int]


class Scorer:
    """Scores continuations and texts with one model (and, on a peft model, one named adapter).

    Example:
        >>> scorer = Scorer(lm.model, lm.tokenizer)
        >>> scorer.loglikelihood([("The capital of France is", " Paris")])
        [(-1.93, True)]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapter: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        show_progress: bool = False,
        engine: Any = None,
    ) -> None:
        self.model, self.tokenizer, self.batch_size, self.engine = model, tokenizer, batch_size, engine
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.adapter = adapter
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        bos = tokenizer.bos_token_id
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        self.tokens_processed = 0

    # ------------------------------------------------------------------ encoding (lm-eval's rules)
    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM's rule: the tokenizer's default special tokens, except none when the text already starts with BOS."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and prefix and text.startswith(prefix):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(text, **kwargs)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``_encode_pair``: trailing context spaces join the continuation; split the whole encoding."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ model calls
    def _forward(self, input_ids: torch.Tensor, past: Any = None, cache: bool = False) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"use_cache": cache or past is not None}
        if past is not None:
            kwargs["past_key_values"] = past
        from slmstack.engine.hf import only_adapter

        # the one adapter made the active one (peft's plain path; its mixed-batch ``adapter_names`` needs every
        # LoRA layer to see (batch, ...) inputs, which OPT's flattened MLP does not give)
        with only_adapter(self.model, self.adapter):
            out = self.model(input_ids=input_ids, **kwargs)
        self.tokens_processed += int(input_ids.numel())
        return out.logits, out.past_key_values

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context), and whether greedy decoding would produce it, per pair."""
        requests = [_Request(i, *self.encode_pair(c, x)) for i, (c, x) in enumerate(pairs)]
        return self.loglikelihood_tokens(requests)

    def loglikelihood_tokens(self, requests: list[_Request]) -> list[tuple[float, bool]]:
        """Score pre-encoded requests; groups sharing a context reuse the context's KV cache."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[_Request]] = {}
        for r in requests:
            groups.setdefault(tuple(r.context), []).append(r)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=not self.show_progress)
        rest = list(groups.values())
        adapter = self._engine_adapter() if self.engine is not None else _UNKNOWN
        if adapter is not _UNKNOWN and not self.engine.has_work():
            takes = [self._fits(g) and self._engine_takes(g) for g in rest]
            on_engine = [g for g, t in zip(rest, takes, strict=True) if t]
            rest = [g for g, t in zip(rest, takes, strict=True) if not t]
            if on_engine:
                scored = self.engine.loglikelihoods([(g[0].context, [r.continuation for r in g]) for g in on_engine],
                                                    adapter, progress=bar.update)  # fmt: skip
                for group, out in zip(on_engine, scored, strict=True):
                    for r, res in zip(group, out, strict=True):
                        results[r.index] = res
                self.tokens_processed += sum(len(g[0].context) - 1 + sum(len(r.continuation) for r in g)
                                             for g in on_engine)  # fmt: skip
        shared = [g for g in rest if len(g) > 1 and self._fits(g)]
        single = [r for g in rest if not (len(g) > 1 and self._fits(g)) for r in g]
        for group in shared:
            for r, res in zip(group, self._score_shared_context(group), strict=True):
                results[r.index] = res
            bar.update(len(group))
        single.sort(key=lambda r: (-len(r.context) - len(r.continuation), tuple(r.context + r.continuation)))
        for start in range(0, len(single), self.batch_size):
            chunk = single[start : start + self.batch_size]
            for r, res in zip(chunk, self._score_batch(chunk), strict=True):
                results[r.index] = res
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _fits(self, group: list[_Request]) -> bool:
        return all(len(r.context) + len(r.continuation) <= self.max_length + 1 for r in group)

    def _engine_adapter(self) -> str | None:
        """The adapter transformers' forward runs: the named one, else a peft model's active one, else none."""
        if self.adapter is not None or not hasattr(self.model, "peft_config"):
            return self.adapter
        active = getattr(self.model, "active_adapter", None)
        return active if isinstance(active, str) else _UNKNOWN  # several active adapters: transformers scores

    def _engine_takes(self, group: list[_Request]) -> bool:
        limit = min(ENGINE_MAX_TOKENS, self.engine.max_length)
        return bool(group[0].context) and all(r.continuation and len(r.context) + len(r.continuation) - 1 <= limit
                                              for r in group)  # fmt: skip

    def _score_batch(self, chunk: list[_Request]) -> list[tuple[float, bool]]:
        inputs = [(r.context + r.continuation)[-(self.max_length + 1) :][:-1] for r in chunk]
        width = max(len(x) for x in inputs)
        batch = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T), right padding
        for i, x in enumerate(inputs):
            batch[i, : len(x)] = torch.tensor(x)
        with torch.inference_mode():
            logits, _ = self._forward(batch.to(self.device))
        out = []
        for r, x, row in zip(chunk, inputs, logits, strict=True):
            n = len(r.continuation)
            out.append(self._sum(row[len(x) - n : len(x)], r.continuation))
        return out

    def _score_shared_context(self, group: list[_Request]) -> list[tuple[float, bool]]:
        # The context minus its last token runs once; each continuation then needs only
        # [last context token] + continuation[:-1] on top of the cached keys/values.
        ctx = group[0].context
        head, tail = ctx[:-1], ctx[-1:]
        past = None
        with torch.inference_mode():
            if head:
                _, past = self._forward(torch.tensor([head], device=self.device), cache=True)
            out: list[tuple[float, bool]] = []
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                rows = [tail + r.continuation[:-1] for r in chunk]
                width = max(len(x) for x in rows)
                batch = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, x in enumerate(rows):
                    batch[i, : len(x)] = torch.tensor(x)
                cache = _expand_cache(past, len(chunk)) if past is not None else None
                logits, _ = self._forward(batch.to(self.device), cache)
                out += [
                    self._sum(row[: len(r.continuation)], r.continuation) for r, row in zip(chunk, logits, strict=True)
                ]
        return out

    @staticmethod
    def _sum(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (n, V)
        target = torch.tensor(continuation, device=logits.device)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(logprobs.gather(1, target[:, None]).sum()), greedy

    # ------------------------------------------------------------------ perplexity
    def loglikelihood_rolling(self, text: str) -> tuple[float, int]:
        """lm-eval's rolling log-likelihood of a text (disjoint windows of ``max_length``) and its token count."""
        tokens = self.tok_encode(text)
        windows = _rolling_windows(tokens, self.prefix_token_id, self.max_length)
        requests = [_Request(i, ctx, cont) for i, (ctx, cont) in enumerate(windows)]
        return sum(ll for ll, _ in self.loglikelihood_tokens(requests)), len(tokens)


def _rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def _expand_cache(past: Any, n: int) -> Any:
    """A copy of a batch-1 KV cache repeated ``n`` times along the batch."""
    import copy

    cache = copy.deepcopy(past)
    if n > 1:
        cache.batch_repeat_interleave(n)
    return cache


def word_count(text: str) -> int:
    """Words as lm-eval counts them for word perplexity (whitespace split)."""
    return len(text.split())


def byte_count(text: str) -> int:
    """UTF-8 bytes, for byte perplexity and bits per byte."""
    return len(text.encode("utf-8"))


def perplexities(loglikelihood: float, words: int, nbytes: int, tokens: int) -> dict[str, float]:
    """lm-eval's word_perplexity, byte_perplexity and bits_per_byte, plus token perplexity."""
    return {
        "word_perplexity": math.exp(-loglikelihood / words),
        "byte_perplexity": math.exp(-loglikelihood / nbytes),
        "bits_per_byte": -loglikelihood / nbytes / math.log(2),
        "token_perplexity": math.exp(-loglikelihood / tokens),
    }
