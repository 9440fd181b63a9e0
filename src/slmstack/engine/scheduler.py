"""Iteration-level scheduling: which rows run in the next step. Knows requests and token counts, no tensors.

Every running request that has its prompt in the cache decodes one token per step. The rest of the step's
token budget goes to prompts: first to requests whose prompt is part-way in (chunked prefill), then to
waiting requests, admitted in arrival order while a cache slot is free. So a request joins the batch at the
next step after it arrives, decoding rows never wait for a long prompt to finish, and a finished request
frees its slot for the next one at once (Orca's iteration-level scheduling; nano-vllm's scheduler, without
preemption: a slot is held until the request ends).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from slmstack.engine.sampling import SamplingParams

__all__ = ["Request", "Row", "Scheduler", "State", "StepPlan"]

_ARRIVALS = itertools.count()


class State(Enum):
    """Where a request is."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence to extend: its prompt, adapter, budget and decoding, and how far it has come."""

    prompt: list[int]
    adapter: int = 0  # 0: the bare base model
    max_new_tokens: int = 64
    params: SamplingParams = field(default_factory=SamplingParams)
    eos: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    slot: int | None = None
    state: State = State.WAITING
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    arrival: int = field(default_factory=lambda: next(_ARRIVALS))
    admitted: float | None = None  # time.perf_counter() when it got a slot

    @property
    def length(self) -> int:
        """Prompt and output tokens so far."""
        return len(self.prompt) + len(self.output)

    @property
    def budget(self) -> int:
        """The most tokens this request can ever hold in the cache."""
        return len(self.prompt) + self.max_new_tokens


@dataclass
class Row:
    """One request's part of a step: ``tokens`` fed at positions ``start..``, and whether to sample after them."""

    request: Request
    start: int
    tokens: list[int]
    sample: bool


@dataclass
class StepPlan:
    """The rows of one step: decode rows (one token each, in slot order), then prefill chunks."""

    decode: list[Row]
    prefill: list[Row]

    @property
    def rows(self) -> list[Row]:
        """Every row, in the order their tokens are laid out."""
        return self.decode + self.prefill


class Scheduler:
    """Queues requests and plans steps under two limits: rows (cache slots) and tokens per step."""

    def __init__(self, max_rows: int, max_tokens: int) -> None:
        if max_rows < 1 or max_tokens < 1:
            raise ValueError("max_rows and max_tokens must be >= 1")
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free = list(range(max_rows))  # free slots, sorted: the lowest is taken first

    def add(self, request: Request) -> None:
        """Queue a request; it joins at a coming step."""
        self.waiting.append(request)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Take a request out (finished or cancelled) and free its slot."""
        if request.state is State.RUNNING:
            self.running.remove(request)
            bisect.insort(self.free, request.slot)
        elif request.state is State.WAITING:
            self.waiting.remove(request)
        request.state, request.finish_reason, request.slot = State.FINISHED, reason, None

    def schedule(self) -> StepPlan | None:
        """The next step's rows, or None when there is nothing to run."""
        decode = sorted((r for r in self.running if r.computed >= len(r.prompt)), key=lambda r: r.slot)
        rows = [Row(r, r.computed, [r.output[-1]], True) for r in decode]
        budget = self.max_tokens - len(rows)
        prefill = []
        for r in sorted((r for r in self.running if r.computed < len(r.prompt)), key=lambda r: r.arrival):
            if budget <= 0:
                break
            prefill.append(self._chunk(r, budget))
            budget -= len(prefill[-1].tokens)
        while self.waiting and self.free and budget > 0:
            r = self.waiting.popleft()
            r.slot, r.state, r.admitted = self.free.pop(0), State.RUNNING, time.perf_counter()
            self.running.append(r)
            prefill.append(self._chunk(r, budget))
            budget -= len(prefill[-1].tokens)
        if not rows and not prefill:
            return None
        return StepPlan(rows, prefill)

    @staticmethod
    def _chunk(r: Request, budget: int) -> Row:
        tokens = r.prompt[r.computed : r.computed + budget]
        return Row(r, r.computed, tokens, r.computed + len(tokens) == len(r.prompt))
