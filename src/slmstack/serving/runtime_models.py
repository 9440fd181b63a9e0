"""Models added to a running server: a LoRA adapter (vLLM's ``/v1/load_lora_adapter``) or a whole stack YAML.

``POST /v1/load_lora_adapter {"lora_name", "lora_path", "base_model"?}`` serves ``lora_name``: the base model of
an in-process stack with the peft adapter at ``lora_path``, as a one-stage plain model (vLLM's shape). The base is
that of the served model ``base_model`` names, or the only one served. ``POST /v1/unload_lora_adapter
{"lora_name"}`` removes it. ``POST /v1/stacks {"path"}`` serves a stack YAML under its ``name``, on the loaded base
model when it names one already loaded (its adapters join that engine), else on a newly loaded one;
``DELETE /v1/stacks/{name}`` removes a stack added so.

Every change is checked before anything changes (the path, the adapter's fit to the base, the engine's support for
it), so a bad request is a 400 and the server is left as it was. Adapters join the running engine between two
steps; requests in flight go on untouched. On unload the name leaves ``/v1/models`` at once (a new request for it
is a 404 saying it is being unloaded), and its adapter leaves the engine once its last request in flight has
ended. Only models added at runtime can be removed. One change runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from slmstack.errors import SlmstackError
from slmstack.serving.requests import ApiError

logger = logging.getLogger(__name__)

__all__ = ["RuntimeModels"]

UNLOAD_WAIT_S = 120.0  # how long an unload waits for the requests in flight on the adapter


def _name(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value or len(value) > 200 or value != value.strip():
        raise ApiError(400, f"'{field}' must be a non-empty name without surrounding spaces", param=field)
    return value


class RuntimeModels:
    """Loads and unloads models for one server (its :class:`~slmstack.serving.state.ServerState`)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.added: dict[str, list[str]] = {}  # served name -> peft adapter names it added to its base
        self.unloading: set[str] = set()
        self.lock = asyncio.Lock()

    # ---- adapters
    async def load_adapter(self, body: dict[str, Any]) -> str:
        """Serve ``lora_name`` (see the module docstring); the message of the reply."""
        name, path = _name(body, "lora_name"), body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "'lora_path' must be the path of a peft adapter directory", param="lora_path")
        async with self.lock:
            self._check_new_name(name)
            base = self._base_stack(body.get("base_model"))
            from slmstack.stack.config import GenerationSettings, StackConfig, StageConfig

            stage = StageConfig(name="answer", role="", template="{input}", adapter=str(Path(path).expanduser()),
                                generation=GenerationSettings())  # fmt: skip
            config = StackConfig(name=name, model=base.config.model, stages=[stage], device=base.config.device,
                                 dtype=base.config.dtype, engine=base.config.engine,
                                 description=f"{base.config.model} with the adapter {Path(path).name}")  # fmt: skip
            await self._add(config, base)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, body: dict[str, Any]) -> str:
        """Stop serving ``lora_name``; the message of the reply."""
        name = _name(body, "lora_name")
        await self.remove(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ---- stacks
    async def load_stack(self, body: dict[str, Any]) -> str:
        """Serve the stack YAML at ``path`` under its name; that name."""
        from slmstack.stack.config import load_stack_config

        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "'path' must be the path of a stack YAML file", param="path")
        try:
            config = load_stack_config(Path(path).expanduser())
        except SlmstackError as exc:
            raise ApiError(400, str(exc)[:500], param="path") from None
        async with self.lock:
            self._check_new_name(config.name)
            base = self._same_base(config)
            await self._add(config, base)
        return config.name

    async def remove(self, name: str) -> None:
        """Stop serving a model added at runtime (waiting for its requests in flight, then freeing its adapters)."""
        async with self.lock:
            if name not in self.added:
                known = name in self.state.stacks
                raise ApiError(404 if not known else 400,
                               f"'{name[:100]}' was not added at runtime, so it cannot be removed" if known else
                               f"The model '{name[:100]}' does not exist; GET /v1/models lists them",
                               code=None if known else "model_not_found")  # fmt: skip
            stack = self.state.stacks.pop(name)
            batcher = self.state.batchers.pop(name, None)
            self.unloading.add(name)
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._free, stack, self.added.pop(name))
            finally:
                self.unloading.discard(name)
            if batcher is not None and all(b is not batcher for b in self.state.batchers.values()):
                await batcher.stop()  # the stack had a base of its own
        logger.info("stopped serving %s", name)

    # ---- the work
    def _check_new_name(self, name: str) -> None:
        if name in self.state.stacks or name in self.unloading:
            raise ApiError(400, f"a model named '{name[:100]}' is already served; pick another name", param="name")

    def _base_stack(self, wanted: Any) -> Any:
        from slmstack.stack.backends import LocalBackend

        local = {n: s for n, s in self.state.stacks.items() if isinstance(s.backend, LocalBackend)}
        if wanted is not None:
            if not isinstance(wanted, str) or wanted not in local:
                raise ApiError(400, f"'base_model' must name a served in-process model; served: {', '.join(local)}",
                               param="base_model")  # fmt: skip
            return local[wanted]
        bases = {id(s.backend): s for s in local.values()}
        if len(bases) != 1:
            raise ApiError(400, "several base models are served: name one with 'base_model'" if bases else
                           "no in-process model is served to add an adapter to", param="base_model")  # fmt: skip
        return next(iter(bases.values()))

    def _same_base(self, config: Any) -> Any:
        from slmstack.stack.backends import LocalBackend

        if config.backend is not None:
            return None
        for stack in self.state.stacks.values():
            c = stack.config
            if isinstance(stack.backend, LocalBackend) and (c.model, c.device, c.dtype) == (
                    config.model, config.device, config.dtype):  # fmt: skip
                return stack
        return None

    async def _add(self, config: Any, base: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            stack, adapters = await loop.run_in_executor(None, self._build, config, base)
        except ApiError:
            raise
        except SlmstackError as exc:
            raise ApiError(400, str(exc)[:500], param="lora_path" if base is not None else "path") from None
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # peft / safetensors on a corrupt adapter
            raise ApiError(400, f"the adapter could not be loaded ({type(exc).__name__}: {str(exc)[:200]})",
                           param="lora_path") from None  # fmt: skip
        if base is not None:
            self.state.batchers[config.name] = self.state.batchers[base.config.name]
        else:
            self.state.start_batcher(config.name, stack)
        self.state.stacks[config.name] = stack
        self.added[config.name] = adapters
        logger.info("serving %s (added at runtime)", config.name)

    def _build(self, config: Any, base: Any) -> tuple[Any, list[str]]:
        """The new stack, its adapters in the shared peft model and in the engine (nothing changed on failure)."""
        from dataclasses import replace

        from slmstack.stack.adapters import check_adapter
        from slmstack.stack.runtime import Stack

        if base is None:  # a stack on a base of its own (or a remote backend)
            stack = Stack(config)
            if stack.model is not None:
                stack.backend.score_apart = True
            return stack, []
        if base.backend.engine is None:
            raise ApiError(400, "adding adapters to a running server needs slmstack's engine; this base runs on "
                           "transformers", param="lora_path")  # fmt: skip
        prefix = config.name.replace(".", "_") + "/"
        for stage in config.stages:  # every adapter checked before any is attached
            path = config.adapter_path(stage)
            if path is not None:
                if not path.is_dir():
                    raise ApiError(400, f"no adapter directory at {path}", param="lora_path")
                check_adapter(base.loaded.model, path, f"stage {stage.name!r}", config.model)
        before = set(getattr(base.model, "peft_config", {}) or {})
        try:
            stack = Stack(config, loaded=replace(base.loaded, model=base.model), adapter_prefix=prefix)
            added = sorted(set(getattr(stack.model, "peft_config", {}) or {}) - before)
            self._into_engines(base, stack.model, added)
        except Exception:
            self._detach(base, stack.model if "stack" in locals() else base.model, before)
            raise
        for other in self.state.stacks.values():  # every stack on this base now holds the wrapper
            if other.backend is base.backend:
                other.model = stack.model
        stack.backend = base.backend
        base.backend.model = stack.model
        return stack, added

    @staticmethod
    def _into_engines(base: Any, model: Any, added: list[str]) -> None:
        backend = base.backend
        for engine in (backend._engine, backend._scoring):
            if engine is not None:
                for name in added:
                    engine.add_adapter(model, name)
        from slmstack.stack.backends import _lora_version

        backend._lora_version = _lora_version(model)

    @staticmethod
    def _detach(base: Any, model: Any, before: set[str]) -> None:
        for name in set(getattr(model, "peft_config", {}) or {}) - before:
            for engine in (base.backend._engine, base.backend._scoring):
                if engine is not None and name in engine.lora.ids:
                    engine.remove_adapter(name)
            model.delete_adapter(name)

    def _free(self, stack: Any, adapters: list[str]) -> None:
        """Drop the stack's adapters from the engines and the peft model once no request runs on them."""
        backend = stack.backend
        deadline = time.monotonic() + UNLOAD_WAIT_S
        for name in adapters:
            for engine in (getattr(backend, "_engine", None), getattr(backend, "_scoring", None)):
                if engine is None or name not in engine.lora.ids:
                    continue
                while True:
                    try:
                        engine.remove_adapter(name)
                        break
                    except SlmstackError:  # a request in flight still runs on it
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            stack.model.delete_adapter(name)
        if adapters:
            from slmstack.stack.backends import _lora_version

            backend._lora_version = _lora_version(stack.model)
