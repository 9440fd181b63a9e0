"""The one way a stack runs: each input is a chain of requests that moves to its next stage as soon as a stage ends.

Each input is a :class:`Chain`: its current stage is one request on the stack's backend
(:class:`slmstack.stack.backends.Backend`), and when that request ends (its ``on_done`` runs before the backend's
next step) the chain renders its next stage's prompt and submits it. On the engine it joins the very next step, so
rows of one chain, of other chains at other stages, and of other stacks on the same base share every step, each
under its own adapter; on transformers or a remote server it joins the next micro-batch. A ``retrieve`` stage runs
no model: its search runs when the chain reaches it, and the chain moves straight on. The trace is built here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from slmstack.engine.text import BASE_ADAPTER, GenerationCancelled
from slmstack.stack.backends import Row
from slmstack.stack.config import StageConfig
from slmstack.stack.trace import StageTrace

__all__ = ["Chain", "retrieve_stage", "run_chains", "start_chain"]


@dataclass(eq=False)
class Chain:
    """One input going through a stack's stages.

    ``overrides(stage_index)`` gives the :class:`GenerationSettings` fields a stage runs with (serving's
    per-request sampling); ``adapter`` runs every stage under that adapter instead of its own (``"__base__"``: the
    bare base, attribution's ``base`` intervention); ``on_stage`` sees each finished stage's trace; ``on_text``
    streams the final stage's text; ``on_end`` runs once when the chain has finished, failed or been cancelled.
    """

    stack: Any
    stages: list[StageConfig]
    values: dict[str, str]
    result: Any  # StackResult
    overrides: Callable[[int], dict[str, Any]] | None = None
    adapter: str | None = None
    on_stage: Callable[[Any], None] | None = None
    on_text: Callable[[str], None] | None = None
    on_end: Callable[[Chain], None] | None = None
    index: int = 0
    handle: Any = None  # the current stage's request handle
    error: BaseException | None = None
    finished: bool = False
    cancelled: bool = False
    started: float = field(default=0.0)

    def cancel(self) -> None:
        """Stop the chain at the backend's next step (or before its next stage starts)."""
        self.cancelled = True
        handle = self.handle
        if handle is not None:
            handle.cancel()


def start_chain(chain: Chain) -> Chain:
    """Submit the chain's first stage; the rest follow on their own as the backend steps."""
    _submit(chain)
    return chain


def _submit(chain: Chain) -> None:
    stack, stage = chain.stack, chain.stages[chain.index]
    if chain.cancelled:
        _end(chain, GenerationCancelled("generation was cancelled"))
        return
    try:
        if stage.kind == "retrieve":  # no model: the search runs now and the chain moves on to its next stage
            _record(chain, retrieve_stage(stack, stage, [chain.values])[0])
            return
        settings = stage.generation
        extra = chain.overrides(chain.index) if chain.overrides else {}
        if extra:
            settings = replace(settings, **extra)
        cfg, last = stack.config, chain.index == len(chain.stages) - 1
        row = Row(stage.role, stack.render(stage, chain.values), chain.adapter or stack.adapter_for(stage.name))
        chain.started = time.perf_counter()
        chain.handle = stack.backend.submit(row, settings, stack.uses_chat_template, cfg.max_input_tokens,
                                            cfg.on_overflow, on_text=chain.on_text if last else None,
                                            on_done=lambda handle: _advance(chain, row, handle))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the chain's caller gets it (an overflow error, a bad override)
        _end(chain, exc)


def _advance(chain: Chain, row: Any, handle: Any) -> None:
    try:
        out = handle.generated()  # raises GenerationCancelled when cancelled
    except Exception as exc:  # noqa: BLE001
        _end(chain, exc)
        return
    stage = chain.stages[chain.index]
    request = getattr(handle, "request", None)  # an engine request: its token ids (the server's logprobs)
    if request is not None and hasattr(request, "output"):
        chain.result.token_ids = (list(request.prompt), [t for t in request.output if t not in request.eos])
    chain.values[stage.name] = out.text
    adapter = None if row.adapter == BASE_ADAPTER else row.adapter
    trace = StageTrace(stage.name, row.prompt, out.text, out.tokens_in, out.tokens_out,
                       round(time.perf_counter() - chain.started, 4), adapter, out.truncated)  # fmt: skip
    _record(chain, trace)


def _record(chain: Chain, trace: StageTrace) -> None:
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


def _end(chain: Chain, error: BaseException | None) -> None:
    chain.error, chain.finished, chain.handle = error, True, None
    if chain.on_end is not None:
        chain.on_end(chain)


def run_chains(chains: list[Chain], on_finished: Callable[[Chain], None] | None = None) -> None:
    """Start every chain and step their backends until all have ended; the first error is raised after.

    Chains of stacks on one backend (stacks on one base model) share its steps.
    """
    for chain in chains:
        if on_finished is not None:
            chain.on_end = on_finished
        start_chain(chain)
    backends = {id(c.stack.backend): c.stack.backend for c in chains}
    for backend in backends.values():
        mine = [c for c in chains if c.stack.backend is backend]
        backend.run(until=lambda mine=mine: all(c.finished for c in mine))
    for chain in chains:
        if chain.error is not None:
            raise chain.error


def retrieve_stage(stack: Any, stage: StageConfig, values: list[dict[str, str]]) -> list[StageTrace]:
    """Run a ``retrieve`` stage for a batch of rows: one search, each row's passages as its output and trace.

    The query is the stage's rendered template; the stage's ``exclude`` ids are never returned (per-query
    exclusions, such as an item's own passage, go through the retriever's ``search`` directly).
    """
    from slmstack.retrieval import format_passages

    start = time.perf_counter()
    queries = [stack.render(stage, v) for v in values]
    exclude = [set(stage.exclude or ()) for _ in values]
    found = stack.retrievers[stage.name].search(queries, stage.k, exclude)
    seconds = round(time.perf_counter() - start, 4)
    traces = []
    for query, row_values, passages in zip(queries, values, found, strict=True):
        text = format_passages(passages)
        row_values[stage.name] = text
        traces.append(StageTrace(stage.name, query, text, 0, 0, seconds, None, False, "retrieve"))
    return traces
