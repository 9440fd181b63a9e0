"""slmstack: large-model behaviour from small language models.

The public API is imported lazily, so ``import slmstack`` is cheap and never pulls in optional
stacks (flwr, lm_eval, vllm).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ARCHITECTURES": "slmstack.arch",
    "DistillConfig": "slmstack.distill",
    "Example": "slmstack.data",
    "LocalTeacher": "slmstack.teachers",
    "OpenAITeacher": "slmstack.teachers",
    "TrainConfig": "slmstack.training",
    "distill": "slmstack.distill",
    "read_examples": "slmstack.data",
    "train_stack": "slmstack.training",
    "GenerationSettings": "slmstack.stack_config",
    "LoadedModel": "slmstack.models",
    "Registry": "slmstack.registry",
    "SlmstackError": "slmstack.errors",
    "Stack": "slmstack.stack",
    "StackConfig": "slmstack.stack_config",
    "StackResult": "slmstack.stack",
    "StageConfig": "slmstack.stack_config",
    "StageTrace": "slmstack.stack",
    "attach_adapters": "slmstack.adapters",
    "get_arch": "slmstack.arch",
    "load_model": "slmstack.models",
    "load_stack_config": "slmstack.stack_config",
    "resolve_model_ref": "slmstack.models",
    "save_stack_config": "slmstack.stack_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slmstack' has no attribute {name!r}")
