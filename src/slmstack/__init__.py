"""slmstack: large-model behaviour from small language models.

The public API is imported lazily, so ``import slmstack`` is cheap and never pulls in optional
stacks (flwr, lm_eval, vllm).
"""

from __future__ import annotations

from slmstack._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "ARCHITECTURES": "slmstack.arch",
    "DistillConfig": "slmstack.training.distill",
    "Example": "slmstack.training.data",
    "LocalTeacher": "slmstack.training.teachers",
    "OpenAITeacher": "slmstack.training.teachers",
    "TrainConfig": "slmstack.training.trainer",
    "distill": "slmstack.training.distill",
    "read_examples": "slmstack.training.data",
    "train_stack": "slmstack.training.trainer",
    "GenerationSettings": "slmstack.stack.config",
    "LoadedModel": "slmstack.models",
    "Registry": "slmstack.registry",
    "SlmstackError": "slmstack.errors",
    "Stack": "slmstack.stack.runtime",
    "StackConfig": "slmstack.stack.config",
    "StackResult": "slmstack.stack.runtime",
    "StageConfig": "slmstack.stack.config",
    "StageTrace": "slmstack.stack.runtime",
    "attach_adapters": "slmstack.stack.adapters",
    "get_arch": "slmstack.arch",
    "load_model": "slmstack.models",
    "load_stack_config": "slmstack.stack.config",
    "resolve_model_ref": "slmstack.models",
    "save_stack_config": "slmstack.stack.config",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("slmstack", _EXPORTS)
