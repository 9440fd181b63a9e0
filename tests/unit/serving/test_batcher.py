"""The micro-batcher on its own: stage-by-stage reporting, and a client that leaves mid-batch."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from slmstack.serving.batcher import MicroBatcher, Pending  # noqa: E402
from slmstack.stack.runtime import StageTrace  # noqa: E402


def test_a_request_whose_client_left_is_dropped_at_the_next_stage(stacks) -> None:
    stack = stacks["tiny-stack"]
    loop = asyncio.new_event_loop()
    try:
        batch = [Pending(stack, q, None, loop.create_future(), stream=True) for q in ("stay", "leave", "stay too")]
        events: list[tuple[int, object]] = []

        def report(row: int, event: object) -> None:
            events.append((row, event))
            if row == 1 and isinstance(event, StageTrace):
                batch[1].future.cancel()  # the client of row 1 disconnects after its first stage

        results = MicroBatcher(4, 0, executor=None)._generate(batch, report)
    finally:
        loop.close()
    # Assert: row 1 ran one stage and no more; the others ran all three, and their stages were reported in order
    assert [len(r.trace) for r in results] == [3, 1, 3]
    stages = [e.stage for row, e in events if row == 0 and isinstance(e, StageTrace)]
    assert stages == ["first", "second", "third"]
    streamed = "".join(e for row, e in events if row == 2 and isinstance(e, str))
    assert streamed == results[2].answer
