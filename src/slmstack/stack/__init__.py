"""The stack runtime: a base model shared by prompted stages, each with an optional LoRA adapter.

Modules: ``config`` (the stack YAML), ``adapters`` (peft adapters on one base), ``generation``
(batched, per-row adapter routing), ``runtime`` (:class:`Stack`), ``batch_io`` (resumable JSONL runs)
and ``render`` (stage cards). Names are imported lazily, so ``import slmstack.stack`` stays cheap.
"""

from __future__ import annotations

from slmstack._lazy import lazy_getattr

_EXPORTS = {
    "GenerationSettings": "slmstack.engine.text",
    "Stack": "slmstack.stack.runtime",
    "StackConfig": "slmstack.stack.config",
    "StackResult": "slmstack.stack.trace",
    "StageConfig": "slmstack.stack.config",
    "StageTrace": "slmstack.stack.trace",
    "attach_adapters": "slmstack.stack.adapters",
    "load_stack_config": "slmstack.stack.config",
    "save_stack_config": "slmstack.stack.config",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("slmstack.stack", _EXPORTS)
