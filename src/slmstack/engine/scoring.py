"""Log-likelihood scoring on the engine's forward: each context runs once, its continuations side by side.

lm-eval's multiple-choice tasks send one request per choice, every one with the same context. Here a *group* is a
context and its continuations (token ids, split as lm-eval splits them; see ``slmstack.evaluation.scorer``):

1. The prefix every context of the call shares (a chat template's system turn with a stage's role, a few-shot
   preamble) runs once, into the spare cache slot.
2. A round takes groups until their continuations fill the cache slots. Each group's first slot gets the shared
   prefix copied in and runs the rest of its context but the last token, with no logits (the LM head is skipped).
3. The context's keys and values are copied into the slots of the group's other continuations, and steps run every
   continuation as ``[last context token] + continuation[:-1]`` with the logits of all its tokens: the logits at
   index ``j`` score continuation token ``j``.

Each continuation's result is lm-eval's pair: the sum of its tokens' log-softmax, and whether greedy decoding produces
it. :func:`score_tokens` runs the same steps and keeps each token's log-probability and the ``top`` most likely tokens
at its position (the server's ``logprobs``). Steps hold at most ``max_tokens`` tokens (a longer piece runs in several
steps, in order), which also bounds the logits held at once (``max_tokens`` x vocabulary floats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812

from slmstack.engine.cache import KVCache
from slmstack.engine.lora import StepAdapters
from slmstack.engine.model import Decoder
from slmstack.engine.prefix import common_prefix
from slmstack.engine.runner import Span, step_input

__all__ = ["Group", "TokenScore", "score_groups", "score_tokens"]

Group = tuple[list[int], list[list[int]]]  # (context, continuations), token ids; context non-empty
MIN_SHARED = 4  # a shared prefix shorter than this is not worth its own step and copies


@dataclass
class TokenScore:
    """One scored token: its id, its log-probability, and the ``top`` most likely tokens there (id, log-prob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class _Piece:
    """Tokens of one slot at positions ``start..``; ``key`` (group, continuation, offset) when they are scored."""

    slot: int
    start: int
    tokens: list[int]
    key: tuple[int, int, int] | None = None


def score_groups(decoder: Decoder, cache: KVCache, groups: list[Group], adapter: int, slots: int, spare: int,
                 max_tokens: int = 512,
                 progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:  # fmt: skip
    """(log-likelihood, greedy) of every continuation of every group (arguments as :func:`score_tokens`)."""
    totals = _score(decoder, cache, groups, adapter, slots, spare, max_tokens, progress, None)
    return [[(float(totals.sums[g, j][0]), bool(totals.sums[g, j][1])) for j in range(len(conts))]
            for g, (_, conts) in enumerate(groups)]  # fmt: skip


def score_tokens(decoder: Decoder, cache: KVCache, groups: list[Group], adapter: int, slots: int, spare: int,
                 top: int, max_tokens: int = 512,
                 progress: Callable[[int], None] | None = None) -> list[list[list[TokenScore]]]:  # fmt: skip
    """Every token of every continuation of every group: its log-probability and the ``top`` most likely tokens.

    Args:
        decoder: the engine's decoder.
        cache: its KV cache; no request may be running (this uses every slot).
        groups: (context, continuations) token ids; contexts and continuations non-empty.
        adapter: the LoRA adapter id every token runs under (0: the bare base).
        slots: cache slots ``0..slots-1`` hold a round's continuations.
        spare: the slot that holds the prefix shared by every context.
        max_tokens: tokens per step.
        top: how many of the most likely tokens to keep at each position (at least one is computed).
        max_tokens: tokens per step.
        progress: called with the number of continuations scored after each round.
    """
    totals = _score(decoder, cache, groups, adapter, slots, spare, max_tokens, progress, max(top, 1))
    return [[totals.tokens[g, j] for j in range(len(conts))] for g, (_, conts) in enumerate(groups)]


@dataclass
class _Totals:
    """What the steps add up: per (group, continuation), [log-likelihood, greedy], and with ``top`` every token."""

    top: int | None
    sums: dict[tuple[int, int], list] = field(default_factory=dict)
    tokens: dict[tuple[int, int], list[TokenScore]] = field(default_factory=dict)


def _score(decoder: Decoder, cache: KVCache, groups: list[Group], adapter: int, slots: int, spare: int,
           max_tokens: int, progress: Callable[[int], None] | None, top: int | None) -> _Totals:  # fmt: skip
    device = cache.device
    heads = [ctx[:-1] for ctx, _ in groups]
    shared = min(common_prefix(heads[0], h) for h in heads) if len(groups) > 1 else 0
    shared = shared if shared >= MIN_SHARED else 0
    cache.ensure(max(len(ctx) - 1 + max(len(c) for c in conts) for ctx, conts in groups))
    lora = StepAdapters(single=adapter)
    totals = _Totals(top)
    if shared:
        _run([_Piece(spare, 0, heads[0][:shared])], decoder, lora, max_tokens, device, groups, totals)
    work = [(g, list(range(s, min(len(conts), s + slots)))) for g, (_, conts) in enumerate(groups)
            for s in range(0, len(conts), slots)]  # fmt: skip
    i = 0
    while i < len(work):
        plan, used = [], 0  # (group, continuations, their slots)
        while i < len(work) and used + len(work[i][1]) <= slots:
            g, js = work[i]
            plan.append((g, js, list(range(used, used + len(js)))))
            used, i = used + len(js), i + 1
        if shared:
            cache.copy(spare, [s[0] for _, _, s in plan], shared)
        contexts = [_Piece(s[0], shared, heads[g][shared:]) for g, _, s in plan if len(heads[g]) > shared]
        _run(contexts, decoder, lora, max_tokens, device, groups, totals)
        for g, _, s in plan:
            if len(s) > 1 and heads[g]:
                cache.copy(s[0], s[1:], len(heads[g]))
        pieces = [_Piece(slot, len(heads[g]), groups[g][0][-1:] + groups[g][1][j][:-1], (g, j, 0))
                  for g, js, s in plan for j, slot in zip(js, s, strict=True)]  # fmt: skip
        _run(pieces, decoder, lora, max_tokens, device, groups, totals)
        if progress is not None:
            progress(used)
    return totals


def _run(pieces: list[_Piece], decoder: Decoder, lora: StepAdapters, max_tokens: int, device: torch.device,
         groups: list[Group], totals: _Totals) -> None:  # fmt: skip
    """Run pieces in steps of at most ``max_tokens`` tokens (a longer piece split in order) and score them."""
    step: list[_Piece] = []
    width = 0
    for piece in pieces:
        if len(piece.tokens) > max_tokens:
            for off in range(0, len(piece.tokens), max_tokens):
                key = None if piece.key is None else (*piece.key[:2], piece.key[2] + off)
                _step([_Piece(piece.slot, piece.start + off, piece.tokens[off : off + max_tokens], key)],
                      decoder, lora, device, groups, totals)  # fmt: skip
            continue
        if width + len(piece.tokens) > max_tokens:
            _step(step, decoder, lora, device, groups, totals)
            step, width = [], 0
        step.append(piece)
        width += len(piece.tokens)
    if step:
        _step(step, decoder, lora, device, groups, totals)


def _step(pieces: list[_Piece], decoder: Decoder, lora: StepAdapters, device: torch.device, groups: list[Group],
          totals: _Totals) -> None:  # fmt: skip
    spans = [Span(p.tokens, p.start, p.slot, sample="none" if p.key is None else "all") for p in pieces]
    logits = decoder.forward(step_input(spans, 0, device, lora=lora))  # (scored tokens, V)
    scored = [p for p in pieces if p.key is not None]
    if not scored:
        return
    targets = torch.tensor([t for p in scored for t in _targets(p, groups)], dtype=torch.long, device=device)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    hits = (logprobs.argmax(-1) == targets).tolist()
    best = logprobs.topk(totals.top, dim=-1) if totals.top else None
    best_ids, best_values = (best.indices.tolist(), best.values.tolist()) if best is not None else ([], [])
    at = 0
    for p in scored:
        n = len(p.tokens)
        entry = totals.sums.setdefault(p.key[:2], [0.0, True])
        entry[0] += sum(picked[at : at + n])
        entry[1] = entry[1] and all(hits[at : at + n])
        if best is not None:
            targets_p = _targets(p, groups)
            totals.tokens.setdefault(p.key[:2], []).extend(
                TokenScore(targets_p[k], picked[at + k], list(zip(best_ids[at + k], best_values[at + k], strict=True)))
                for k in range(n)
            )  # fmt: skip
        at += n


def _targets(piece: _Piece, groups: list[Group]) -> list[int]:
    g, j, off = piece.key  # type: ignore[misc]
    return groups[g][1][j][off : off + len(piece.tokens)]
