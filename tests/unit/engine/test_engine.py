"""Continuous batching never changes a token; the scheduler's joins, cancellations, stops and limits."""

from __future__ import annotations

import shutil

import pytest
import torch

from slmstack.engine import Engine
from slmstack.engine.hf import generate_batch
from slmstack.engine.scheduler import Request, Scheduler
from slmstack.errors import InputError
from slmstack.stack.config import GenerationSettings
from tests.conftest import build_tiny_llama, build_tokenizer
from tests.unit.engine.test_lora import _peft_model

TEXTS = ["what is two plus two?", "name a red fruit.", "why is the sky blue? tell me more about it", "hi",
         "a b c d e f g", "one more question here", "short", "the last, eighth prompt of all"]  # fmt: skip
ADAPTERS = ["qv", "__base__", "all", "mlp", "qv", "all", "__base__", "mlp"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _alone(model, tok, text: str, adapter: str, settings: GenerationSettings) -> str:
    engine = Engine(model, tok, max_batch=1)
    handle = engine.submit(tok(text)["input_ids"], adapter, settings)
    engine.run()
    return handle.generated().text


def test_a_rows_greedy_text_is_the_same_alone_and_in_a_mixed_continuous_batch() -> None:
    # Prepare: 8 rows with different adapters and lengths; small step budget so prompts are chunked
    model, tok = _peft_model(), build_tokenizer()
    budgets = [GenerationSettings(max_new_tokens=n) for n in (12, 3, 20, 7, 15, 9, 1, 18)]
    alone = [_alone(model, tok, t, a, s) for t, a, s in zip(TEXTS, ADAPTERS, budgets, strict=True)]
    # Execute: rows join at different steps (half now, half after 4 steps), and leave when they end
    engine = Engine(model, tok, max_batch=8, max_tokens_per_step=12)
    handles = [
        engine.submit(tok(t)["input_ids"], a, s) for t, a, s in zip(TEXTS[:4], ADAPTERS[:4], budgets[:4], strict=True)
    ]
    for _ in range(4):
        engine.step()
    handles += [
        engine.submit(tok(t)["input_ids"], a, s) for t, a, s in zip(TEXTS[4:], ADAPTERS[4:], budgets[4:], strict=True)
    ]
    engine.run()
    # Assert
    assert [h.generated().text for h in handles] == alone
    assert len(set(alone)) > 4  # the rows really differ


def test_greedy_text_equals_transformers_generate() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    settings = GenerationSettings(max_new_tokens=24)
    engine = Engine(model, tok)
    handles = [engine.submit(tok(t)["input_ids"], None, settings) for t in TEXTS]
    engine.run()
    reference = generate_batch(model, tok, TEXTS, settings, chat=False)
    assert [h.generated() for h in handles] == reference  # text, tokens in and out


def test_a_request_that_joins_mid_decode_gets_its_own_text() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    settings = GenerationSettings(max_new_tokens=16)
    engine = Engine(model, tok, max_batch=4)
    first = engine.submit(tok(TEXTS[0])["input_ids"], None, settings)
    for _ in range(5):
        engine.step()
    assert len(first.request.output) == 5  # decoding when the second arrives
    second = engine.submit(tok(TEXTS[1])["input_ids"], None, settings)
    engine.step()
    assert len(first.request.output) == 6 and second.request.computed == len(second.request.prompt)
    engine.run()
    assert second.generated().text == _alone(model, tok, TEXTS[1], None, settings)


def test_a_cancelled_request_ends_and_frees_its_slot_for_the_next() -> None:
    from slmstack.engine.text import GenerationCancelled

    model, tok = build_tiny_llama(), build_tokenizer()
    settings = GenerationSettings(max_new_tokens=40)
    engine = Engine(model, tok, max_batch=1)
    done = []
    first = engine.submit(tok("aaa")["input_ids"], None, settings, on_done=done.append)
    waiting = engine.submit(tok("bbb")["input_ids"], None, GenerationSettings(max_new_tokens=3))
    engine.step()
    engine.step()
    first.cancel()
    engine.run()
    assert done == [first] and first.finish_reason == "cancelled"
    with pytest.raises(GenerationCancelled):
        first.generated()
    assert waiting.generated().tokens_out == 3  # took the freed slot


def test_stop_strings_that_span_tokens_end_the_row_and_are_cut() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    free = _alone(model, tok, TEXTS[2], None, GenerationSettings(max_new_tokens=30))
    stop = free[2:5]  # three characters: three tokens of this char-level tokenizer
    engine = Engine(model, tok)
    streamed = []
    handle = engine.submit(tok(TEXTS[2])["input_ids"], None, GenerationSettings(max_new_tokens=30, stop=[stop]),
                           on_text=streamed.append)  # fmt: skip
    engine.run()
    text = handle.generated().text
    assert text == free[: free.index(stop)].strip() and handle.finish_reason == "stop"
    assert len(handle.request.output) < 30 and "".join(streamed) == text


def test_max_new_tokens_1_empty_prompt_and_overflow() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    engine = Engine(model, tok)
    one = engine.submit(tok("hello")["input_ids"], None, GenerationSettings(max_new_tokens=1))
    engine.run()
    assert one.generated().tokens_out == 1 and one.finish_reason in ("length", "stop")
    with pytest.raises(InputError, match="the prompt is empty"):
        engine.submit([], None, GenerationSettings())
    with pytest.raises(InputError, match="exceeds the 1024-token context"):
        engine.submit([7] * 1000, None, GenerationSettings(max_new_tokens=64))


def test_seeded_sampling_repeats_and_does_not_depend_on_its_batch() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    sampled = GenerationSettings(max_new_tokens=20, do_sample=True, temperature=1.3, top_p=0.9, top_k=20, seed=5)
    alone = _alone(model, tok, TEXTS[0], None, sampled)
    engine = Engine(model, tok)
    handles = [engine.submit(tok(t)["input_ids"], None, sampled if i == 0 else GenerationSettings(max_new_tokens=9))
               for i, t in enumerate(TEXTS)]  # fmt: skip
    engine.run()
    assert handles[0].generated().text == alone
    assert alone != _alone(model, tok, TEXTS[0], None, GenerationSettings(max_new_tokens=20))


def test_the_scheduler_fills_the_step_budget_and_admits_in_order() -> None:
    sched = Scheduler(max_rows=2, max_tokens=8)
    a, b, c = Request(list(range(10))), Request(list(range(3))), Request(list(range(2)))
    for r in (a, b, c):
        sched.add(r)
    plan = sched.schedule()  # a takes the whole budget (8 of its 10 prompt tokens)
    assert [(r.request, len(r.tokens), r.sample) for r in plan.prefill] == [(a, 8, False)]
    a.computed = 8
    plan = sched.schedule()  # a's last 2 tokens, then b joins with its 3 (c waits: 2 slots)
    assert [(r.request, len(r.tokens), r.sample) for r in plan.prefill] == [(a, 2, True), (b, 3, True)]
    a.computed, b.computed = 10, 3
    a.output, b.output = [1], [2]
    plan = sched.schedule()  # both decode; c still waits for a slot
    assert [r.request for r in plan.decode] == [a, b] and not plan.prefill
    sched.finish(a, "stop")
    plan = sched.schedule()
    assert [r.request for r in plan.decode] == [b] and [r.request for r in plan.prefill] == [c]
    assert c.slot == 0  # the freed slot


def test_the_cache_grows_with_the_longest_request_and_keeps_what_it_holds() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    engine = Engine(model, tok)
    short = engine.submit(tok("hi")["input_ids"], None, GenerationSettings(max_new_tokens=4))
    engine.step()
    assert engine.cache.length == 16
    long_text = "x" * 40
    long = engine.submit(tok(long_text)["input_ids"], None, GenerationSettings(max_new_tokens=30))
    engine.run()
    assert engine.cache.length == 128
    assert short.generated().text == _alone(model, tok, "hi", None, GenerationSettings(max_new_tokens=4))
    assert long.generated().text == _alone(model, tok, long_text, None, GenerationSettings(max_new_tokens=30))
    assert engine.steps > 0 and torch.is_tensor(engine.cache.kv[0])


def _run_graphs(model, tok, graphs: str, budgets=(12, 3, 20, 7, 15), kernel: str = "auto") -> tuple[list[str], int]:
    """Rows joining and leaving, mixed adapters, a bucket larger than the rows (padding rows present): the texts
    and how many steps ran on the graph path."""
    rows = list(zip(TEXTS, ADAPTERS, [GenerationSettings(max_new_tokens=n) for n in budgets], strict=False))
    engine = Engine(model, tok, max_batch=8, graphs=graphs, decode_kernel=kernel)
    handles = [engine.submit(tok(t)["input_ids"], a, s) for t, a, s in rows]
    static_steps = {"n": 0}
    if engine.runner.graphs is not None:
        real = engine.runner.graphs.run

        def counting(*args):
            static_steps["n"] += 1
            return real(*args)

        engine.runner.graphs.run = counting
    engine.run()
    return [h.generated().text for h in handles], static_steps["n"]


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_the_cuda_graph_static_path_gives_the_same_text_eagerly_on_a_cpu(kernel: str) -> None:
    model, tok = _peft_model(), build_tokenizer()  # "matmul" is the decode kernel a GPU runs
    eager, _ = _run_graphs(model, tok, "off", kernel=kernel)
    static, used = _run_graphs(model, tok, "static", kernel=kernel)
    # Assert: the static path ran the decode steps, and not one token changed
    assert used > 10 and static == eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_cuda_graphs_replay_the_static_path_through_cache_growth() -> None:
    # Prepare: budgets long enough that the cache grows mid-run (graphs are captured again after it does)
    model, tok = _peft_model().to("cuda"), build_tokenizer()
    budgets = (40, 3, 90, 7, 60)
    static, _ = _run_graphs(model, tok, "static", budgets)
    captured, used = _run_graphs(model, tok, "capture", budgets)
    # Assert: the graphs ran the decode steps and replayed exactly what the static path computes
    assert used > 50 and captured == static


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_a_prompt_prefix_kept_across_requests_changes_no_token(device: str) -> None:
    # Prepare: prompts sharing a 30-token preamble (a stage's system turn and role), under two adapters, in two
    # waves; between them the rows' slots are filled with noise, so the second wave sees only what it copies
    model, tok = _peft_model().to(device), build_tokenizer()
    preamble = "system: you answer briefly. user: "
    questions = ["what is two plus two?", "name a red fruit.", "why is the sky blue?", "a b c d e f g"]
    waves = [[(preamble + q, a) for a in ("qv", "all") for q in qs] for qs in (questions[:2], questions[2:])]
    settings = GenerationSettings(max_new_tokens=8)

    def run(prefix_slots: int) -> tuple[list[str], Engine]:
        engine = Engine(model, tok, max_batch=4, max_tokens_per_step=16, prefix_slots=prefix_slots)
        texts = []
        for wave in waves:
            handles = [engine.submit(tok(t)["input_ids"], a, settings) for t, a in wave]
            engine.run()
            texts += [h.generated().text for h in handles]
            for kv in engine.cache.kv:
                kv[:4].normal_(0, 5)
        return texts, engine

    # Execute
    plain, _ = run(0)
    reused, engine = run(4)
    # Assert: the same text; the preamble kept once per adapter, and the second wave did not compute it
    assert reused == plain
    n = len(tok(preamble)["input_ids"])
    kept = sorted((e.adapter, len(e.tokens)) for e in engine.runner.prefixes.entries)
    assert [a for a, _ in kept] == [engine.lora.id("qv"), engine.lora.id("all")]
    assert all(length >= n - 1 for _, length in kept)
    assert engine.runner.prefixes.reused_tokens >= 4 * (n - 1)
    # a changed adapter drops the prefixes computed under the old one
    engine.add_adapter(model, "qv")
    assert engine.runner.prefixes.entries == []


def _two_rows(engine: Engine, tok) -> list[str]:
    handles = [engine.submit(tok(t)["input_ids"], a, GenerationSettings(max_new_tokens=n))
               for t, a, n in (("what is two plus two?", "qv", 9), ("hi", "all", 4))]  # fmt: skip
    engine.run()
    return [h.generated().text for h in handles]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="needs a C++ compiler")
def test_compiled_decode_steps_give_the_same_text_as_eager_steps() -> None:
    # Prepare: two rows under two adapters, decoding together (bucket 2), then one alone (bucket 1)
    model, tok = _peft_model(), build_tokenizer()
    eager = _two_rows(Engine(model, tok, max_batch=2, graphs="off"), tok)
    engine = Engine(model, tok, max_batch=2, graphs="compile")
    # Execute
    compiled = _two_rows(engine, tok)
    # Assert: the decode steps ran compiled (no fallback), and not one token changed
    assert engine.runner.graphs is not None and engine.runner.graphs.compiled and engine.runner.graphs.replays >= 8
    assert compiled == eager


def test_compiled_decode_steps_fall_back_to_eager_steps_when_compiling_fails(monkeypatch, caplog) -> None:
    from slmstack.engine import graphs
    from slmstack.engine import runner as engine_module

    def no_compiler(fn, **_):
        def fails(*args):
            raise RuntimeError("no C++ compiler found")

        return fails

    model, tok = _peft_model(), build_tokenizer()
    eager = _two_rows(Engine(model, tok, max_batch=2, graphs="off"), tok)
    # torch.compile unusable here (the probe failed): no static path at all
    monkeypatch.setattr(engine_module, "_can_compile", lambda: False)
    assert Engine(model, tok, max_batch=2, graphs="compile").runner.graphs is None
    # the probe passed but the decode step fails to compile: a warning, then eager steps
    monkeypatch.setattr(engine_module, "_can_compile", lambda: True)
    monkeypatch.setattr(graphs.torch, "compile", no_compiler)
    engine = Engine(model, tok, max_batch=2, graphs="compile")
    with caplog.at_level("WARNING", logger="slmstack.engine.engine"):
        text = _two_rows(engine, tok)
    assert text == eager and engine.runner.graphs is None
    assert "could not compile the decode step (RuntimeError: no C++ compiler found)" in caplog.text


def test_a_cpu_engine_keeps_large_freed_blocks_for_reuse_under_glibc() -> None:
    import platform

    from slmstack.engine.runner import reuse_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    Engine(build_tiny_llama(), build_tokenizer())  # a CPU engine sets it (once per process)
    assert reuse_freed_memory.cache_info().currsize == 1 and reuse_freed_memory() is True
