"""Stacks on the engine: each input is a chain of requests that moves to its next stage as soon as a stage ends.

With transformers, a batch goes through a stack stage by stage, and every row waits for the batch's slowest
row at every stage. On the engine (:mod:`slmstack.engine`) each input is a :class:`Chain`: its current stage is
one engine request, and when that request ends (its ``on_done`` runs before the next engine step) the chain
renders its next stage's prompt and submits it, so it joins the very next step. Rows of one chain, of other
chains at other stages, and of other stacks on the same base share every step, each under its own adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from slmstack.engine.text import BASE_ADAPTER
from slmstack.stack.config import StageConfig

__all__ = ["Chain", "run_chains", "start_chain"]


@dataclass(eq=False)
class Chain:
    """One input going through a stack's stages on the engine.

    ``overrides(stage_index)`` gives the :class:`GenerationSettings` fields a stage runs with (serving's
    per-request sampling); ``on_stage`` sees each finished stage's trace; ``on_text`` streams the final stage's
    text; ``on_end`` runs once when the chain has finished, failed or been cancelled.
    """

    stack: Any
    stages: list[StageConfig]
    values: dict[str, str]
    result: Any  # StackResult
    overrides: Callable[[int], dict[str, Any]] | None = None
    on_stage: Callable[[Any], None] | None = None
    on_text: Callable[[str], None] | None = None
    on_end: Callable[[Chain], None] | None = None
    index: int = 0
    handle: Any = None  # the current stage's EngineRequest
    error: BaseException | None = None
    finished: bool = False
    cancelled: bool = False
    started: float = field(default=0.0)

    def cancel(self) -> None:
        """Stop the chain at the next engine step (or before its next stage starts)."""
        self.cancelled = True
        handle = self.handle
        if handle is not None:
            handle.cancel()


def start_chain(chain: Chain) -> Chain:
    """Submit the chain's first stage; the rest follow on their own as the engine steps."""
    _submit(chain)
    return chain


def _submit(chain: Chain) -> None:
    from slmstack.engine.text import GenerationCancelled

    stack, stage = chain.stack, chain.stages[chain.index]
    if chain.cancelled:
        _end(chain, GenerationCancelled("generation was cancelled"))
        return
    if stage.kind == "retrieve":  # no model: the search runs now and the chain moves on to its next stage
        _retrieve(chain, stage)
        return
    try:
        settings = stage.generation
        extra = chain.overrides(chain.index) if chain.overrides else {}
        if extra:
            settings = replace(settings, **extra)
        backend, cfg = stack.backend, stack.config
        ids, cut = backend.encode([stack.model_input(stage, chain.values)], settings, stack.uses_chat_template,
                                  cfg.max_input_tokens, cfg.on_overflow)  # fmt: skip
        last = chain.index == len(chain.stages) - 1
        chain.started = time.perf_counter()
        chain.handle = backend.engine.submit(
            ids[0], stack.adapter_for(stage.name), settings, truncated=cut[0],
            on_text=chain.on_text if last else None, on_done=lambda handle: _advance(chain, handle),
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the chain's caller gets it (an overflow error, a bad override)
        _end(chain, exc)


def _retrieve(chain: Chain, stage: StageConfig) -> None:
    from slmstack.stack.runtime import retrieve_stage

    try:
        trace = retrieve_stage(chain.stack, stage, [chain.values])[0]
    except Exception as exc:  # noqa: BLE001 - the chain's caller gets it
        _end(chain, exc)
        return
    _record(chain, trace)


def _record(chain: Chain, trace: Any) -> None:
    """Keep a finished stage's trace, then submit the next stage or end the chain."""
    chain.result.trace.append(trace)
    chain.result.answer = trace.output
    if chain.on_stage is not None:
        chain.on_stage(trace)
    chain.index += 1
    if chain.index < len(chain.stages):
        _submit(chain)
    else:
        _end(chain, None)


def _advance(chain: Chain, handle: Any) -> None:
    from slmstack.stack.runtime import StageTrace

    try:
        out = handle.generated()  # raises GenerationCancelled when cancelled
    except Exception as exc:  # noqa: BLE001
        _end(chain, exc)
        return
    stack, stage = chain.stack, chain.stages[chain.index]
    chain.values[stage.name] = out.text
    adapter = stack.adapter_for(stage.name)
    trace = StageTrace(stage.name, stack.render(stage, chain.values), out.text, out.tokens_in, out.tokens_out,
                       round(time.perf_counter() - chain.started, 4), None if adapter == BASE_ADAPTER else adapter,
                       out.truncated)  # fmt: skip
    _record(chain, trace)


def _end(chain: Chain, error: BaseException | None) -> None:
    chain.error, chain.finished, chain.handle = error, True, None
    if chain.on_end is not None:
        chain.on_end(chain)


def run_chains(chains: list[Chain], on_finished: Callable[[Chain], None] | None = None) -> None:
    """Start every chain and step their engine until all have ended; the first error is raised after.

    All chains must share one engine (stacks on one base model do).
    """
    if not chains:
        return
    engine = chains[0].stack.backend.engine
    for chain in chains:
        if on_finished is not None:
            chain.on_end = on_finished
        start_chain(chain)
    engine.run(until=lambda: all(c.finished for c in chains))
    for chain in chains:
        if chain.error is not None:
            raise chain.error
