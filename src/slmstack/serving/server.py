"""Load the stacks and run the app under uvicorn (``slmstack serve``)."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from slmstack.errors import ConfigError
from slmstack.serving.settings import ServeSettings

logger = logging.getLogger(__name__)

__all__ = ["load_stacks", "require_serve", "serve"]


def require_serve() -> None:
    """One clear line when the ``serve`` extra is missing."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'slmstack[serve]'")


def load_stacks(stack_files: list[str], models: list[str], dtype: str | None = None) -> dict[str, Any]:
    """Model name -> loaded :class:`Stack`: each stack YAML under its ``name``, each ``NAME=REF`` as a plain model.

    With neither, the packaged default stack. Names must be unique. Stacks on the same base model share
    one loaded copy (and their rows share forward passes). ``dtype`` overrides every stack's own.
    """
    from slmstack.stack.config import GenerationSettings, StackConfig, StageConfig, load_stack_config
    from slmstack.stack.runtime import Stack

    configs = [load_stack_config(f) for f in stack_files]
    for item in models:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ConfigError(f"--model {item!r}: give NAME=REF, e.g. --model base=default")
        stage = StageConfig(name="answer", role="", template="{input}", generation=GenerationSettings())
        configs.append(StackConfig(name=name, model=ref, stages=[stage], description=f"the plain model {ref}"))
    if not configs:
        configs = [load_stack_config(None)]
    for config in configs:
        config.dtype = dtype or config.dtype
    names = [c.name for c in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"two served models are named {duplicated[0]!r}; rename one stack (its name field)")
    return {c.name: s for c, s in zip(configs, Stack.sharing_bases(configs), strict=True)}


def serve(stacks: dict[str, Any], settings: ServeSettings) -> None:
    """Serve until interrupted."""
    import uvicorn

    from slmstack.serving.app import build_app

    logger.info("serving %s on http://%s:%d", ", ".join(stacks), settings.host, settings.port)
    uvicorn.run(build_app(stacks, settings), host=settings.host, port=settings.port, log_level="warning")
