"""The server's batcher on its own: stage-by-stage reporting, streaming, and a client that leaves mid-chain."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from slmstack.serving.batcher import Batcher, stage_overrides  # noqa: E402
from slmstack.stack.trace import StageTrace  # noqa: E402


def test_a_request_whose_client_left_is_dropped_at_the_next_stage(stacks, monkeypatch) -> None:
    from slmstack.engine.text import GenerationCancelled
    from slmstack.serving import batcher as module

    stack = stacks["tiny-stack"]
    real_start = module.start_chain

    def start(chain):  # the client of "leave" goes away the moment its first stage ends (in the stepping thread)
        if chain.values["input"] == "leave":
            on_stage = chain.on_stage
            chain.on_stage = lambda trace: (on_stage(trace), chain.cancel())
        return real_start(chain)

    monkeypatch.setattr(module, "start_chain", start)

    async def serve() -> tuple[list, list]:
        batcher = Batcher(stack.backend)
        batcher.start()
        try:
            pending = [await batcher.submit(stack, q, None, stream=True) for q in ("stay", "leave", "stay too")]
            events: list[list] = [[], [], []]

            async def drain(row: int) -> None:
                while (event := await pending[row].events.get()) is not None:
                    events[row].append(event)

            await asyncio.wait_for(asyncio.gather(*(drain(r) for r in range(3))), 60)
            results = [p.future.exception() or p.future.result() for p in pending]
            return results, events
        finally:
            await batcher.stop()

    results, events = asyncio.run(serve())
    # Assert: row 1 ran one stage and no more; the others ran all three, and their stages were reported in order
    assert isinstance(results[1], GenerationCancelled) and [len(results[r].trace) for r in (0, 2)] == [3, 3]
    assert [e.stage for e in events[1] if isinstance(e, StageTrace)] == ["first"]
    assert [e.stage for e in events[0] if isinstance(e, StageTrace)] == ["first", "second", "third"]
    assert "".join(e for e in events[2] if isinstance(e, str)) == results[2].answer


def test_a_requests_sampling_reaches_the_final_stage_and_max_tokens_only_there(stacks) -> None:
    stack = stacks["tiny-stack"]
    sampling = {"temperature": 1.5, "do_sample": True, "seed": 3}
    assert [stage_overrides(stack, i, sampling, 8) for i in range(3)] == [{}, {}, {**sampling, "max_new_tokens": 8}]
    stack.config.request_sampling = "all"
    try:
        assert stage_overrides(stack, 0, sampling, 8) == sampling
    finally:
        stack.config.request_sampling = "final"
