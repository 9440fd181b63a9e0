"""slmstack: large-model behaviour from small language models.

The public API is imported lazily, so ``import slmstack`` is cheap and never pulls in optional
stacks (flwr, lm_eval, vllm).
"""

from __future__ import annotations

from slmstack._lazy import lazy_getattr
from slmstack.stack import _EXPORTS as _STACK_EXPORTS
from slmstack.version import __version__

_EXPORTS = {
    **_STACK_EXPORTS,  # the stack runtime's names, listed once in slmstack.stack
    "ARCHITECTURES": "slmstack.arch",
    "DistillConfig": "slmstack.training.distill",
    "Example": "slmstack.training.data",
    "LocalTeacher": "slmstack.training.teachers",
    "OpenAITeacher": "slmstack.training.teachers",
    "TrainConfig": "slmstack.training.trainer",
    "distill": "slmstack.training.distill",
    "read_examples": "slmstack.training.data",
    "train_stack": "slmstack.training.trainer",
    "LoadedModel": "slmstack.models",
    "Registry": "slmstack.registry",
    "SlmstackError": "slmstack.errors",
    "get_arch": "slmstack.arch",
    "load_model": "slmstack.models",
    "resolve_model_ref": "slmstack.models",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__ = lazy_getattr("slmstack", _EXPORTS)
