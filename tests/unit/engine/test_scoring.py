"""Log-likelihoods on the engine's forward equal transformers' (the scorer's reference path), adapters included."""

from __future__ import annotations

import pytest
import torch

from slmstack.engine import Engine
from slmstack.engine.scoring import score_groups
from slmstack.errors import ConfigError
from slmstack.evaluation.scorer import Scorer
from tests.conftest import build_tiny_llama, build_tokenizer
from tests.unit.engine.test_lora import _peft_model

# a shared prefix of 9+ characters (char-level tokenizer: one token each), then different questions; the last group
# has more continuations than the engine has slots, and one continuation is longer than a step
PAIRS = [("Question: red or blue?\nAnswer:", c) for c in [" red", " blue", " green", " a long answer here"]] + [
    ("Question: why?\nAnswer:", c) for c in [" because", " no", " x", " y", " z"]
]


def _reference(model, tok, pairs, adapter=None):
    return Scorer(model, tok, adapter=adapter, batch_size=3).loglikelihood(pairs)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adapter", [None, "all", "mlp"])
def test_engine_loglikelihoods_equal_transformers(adapter: str | None, device: str) -> None:
    # Prepare: a peft model with three adapters; an engine with 3 slots (fewer than a group's continuations)
    model, tok = _peft_model().to(device), build_tokenizer()
    engine = Engine(model, tok, max_batch=3)
    # Execute
    ours = Scorer(model, tok, adapter=adapter, engine=engine).loglikelihood(PAIRS)
    theirs = _reference(model, tok, PAIRS, adapter)
    # Assert: every continuation's sum and greedy flag; and the adapter changed the numbers
    torch.testing.assert_close(torch.tensor([o[0] for o in ours]), torch.tensor([t[0] for t in theirs]),
                               atol=1e-4, rtol=1e-5)  # fmt: skip
    assert [o[1] for o in ours] == [t[1] for t in theirs]
    if adapter is not None:
        base = _reference(model, tok, PAIRS, None)
        assert max(abs(o[0] - b[0]) for o, b in zip(ours, base, strict=True)) > 1e-2


def test_prefix_runs_once_and_long_pieces_split_into_steps() -> None:
    # Prepare: two groups sharing a 10-token prefix; steps of at most 4 tokens
    model, tok = build_tiny_llama().eval(), build_tokenizer()
    engine = Engine(model, tok, max_batch=4)
    scorer = Scorer(model, tok)
    groups, pairs = [], []
    for question, conts in [("shared bit one?", [" yes", " no"]), ("shared bit two!", [" maybe so"])]:
        ctx, _ = scorer.encode_pair(question, conts[0])
        groups.append((ctx, [scorer.encode_pair(question, c)[1] for c in conts]))
        pairs += [(question, c) for c in conts]
    seen: list[tuple[int, int]] = []  # (tokens, sampled) per step
    forward = engine.runner.decoder.forward

    def counting(step):
        seen.append((len(step.tokens), len(step.tokens) if step.sample is None else len(step.sample)))
        return forward(step)

    engine.runner.decoder.forward = counting
    # Execute
    ours = score_groups(engine.runner.decoder, engine.cache, groups, 0, 4, 4, max_tokens=4)
    # Assert: equal to transformers; no step over 4 tokens; the shared prefix counted once in the tokens run
    theirs = _reference(model, tok, pairs)
    torch.testing.assert_close(torch.tensor([x[0] for g in ours for x in g]), torch.tensor([t[0] for t in theirs]),
                               atol=1e-4, rtol=1e-5)  # fmt: skip
    assert max(n for n, _ in seen) <= 4
    heads = [len(ctx) - 1 for ctx, _ in groups]
    shared = next(k for k in range(min(heads)) if groups[0][0][k] != groups[1][0][k])
    assert shared >= 4
    conts = sum(len(c) for _, cs in groups for c in cs)
    assert sum(n for n, _ in seen) == sum(heads) - shared + conts
    assert sum(s for _, s in seen) == conts  # logits only for the continuations' tokens


def test_busy_engine_and_bad_requests_are_refused() -> None:
    from slmstack.stack.config import GenerationSettings

    model, tok = build_tiny_llama().eval(), build_tokenizer()
    engine = Engine(model, tok, max_batch=2)
    with pytest.raises(ConfigError, match="at least one token"):
        engine.loglikelihoods([([1, 2], [[]])])
    with pytest.raises(ConfigError, match="exceeds"):
        engine.loglikelihoods([([1] * engine.max_length, [[2, 3]])])
    engine.submit([1, 2, 3], settings=GenerationSettings(max_new_tokens=2))
    with pytest.raises(ConfigError, match="generating"):
        engine.loglikelihoods([([1, 2], [[3]])])
    # the scorer sees the busy engine and scores on transformers instead
    busy = Scorer(model, tok, engine=engine).loglikelihood(PAIRS[:2])
    torch.testing.assert_close(torch.tensor([b[0] for b in busy]), torch.tensor([t[0] for t in _reference(model, tok,
                               PAIRS[:2])]))  # fmt: skip


@pytest.mark.parametrize("adapter", ["__base__", "all"])
def test_prompt_logprobs_equal_transformers_log_softmax(adapter: str | None) -> None:
    # Prepare: two prompts of different lengths (one longer than a scoring step of 8 tokens)
    model, tok = _peft_model(), build_tokenizer()
    engine = Engine(model, tok, max_batch=2)
    prompts = [tok("Question: red or blue?")["input_ids"], tok("hi")["input_ids"]]
    # Execute
    scored = engine.prompt_logprobs(prompts, adapter, top=3)
    # Assert: each token's log-probability and the top 3 at its position are transformers' log-softmax; the last
    # entry is the greedy next token after the whole prompt
    from slmstack.engine.hf import only_adapter

    for ids, tokens in zip(prompts, scored, strict=True):
        assert len(tokens) == len(ids)
        with only_adapter(model, adapter), torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        for j, t in enumerate(tokens):
            row = logprobs[j]
            expected = ids[j + 1] if j + 1 < len(ids) else int(row.argmax())
            assert t.token == expected
            torch.testing.assert_close(torch.tensor(t.logprob), row[expected], atol=1e-4, rtol=1e-5)
            top = row.topk(3)
            assert [i for i, _ in t.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in t.top]), top.values, atol=1e-4, rtol=1e-5)
            assert t.top[0][1] >= t.logprob  # the greedy check lm-eval's client makes
