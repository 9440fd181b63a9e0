"""``vllm``: the base model folder, each adapter under ``loras/``, the ``vllm serve`` command and a backend stack."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from slmstack.export.base import EXPORTERS
from slmstack.export.common import adapter_stages, backend_stack, max_rank, write_launch

__all__ = ["write_vllm"]

PORT = 8001


def _link_or_copy(src: Path, dst: Path) -> None:
    """``src``'s files under ``dst``: hard links where the file system allows (no second copy of the weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _link_or_copy(item, dst / item.name)
        elif item.name != "slmstack-cache.json":
            try:
                os.link(item, dst / item.name)
            except OSError:
                shutil.copy2(item, dst / item.name)


def write_vllm(config: Any, out: Path) -> dict[str, Any]:
    """``out/base/``, ``out/loras/<stage>/``, ``launch.sh`` and ``stack.yaml`` (``backend: {type: vllm}``)."""
    from slmstack.errors import ConfigError
    from slmstack.models import model_folder

    folder = model_folder(config.model)
    if folder is None:
        base_arg = config.model  # a hub id: vLLM downloads it itself
    else:
        _link_or_copy(folder, out / "base")
        base_arg = "base"
    adapters = adapter_stages(config)
    if not adapters:
        raise ConfigError(f"stack {config.name!r} has no stage with an adapter: serve the base with vLLM directly")
    for name, path in adapters.items():
        shutil.copytree(path, out / "loras" / name)
    modules = " ".join(f"{name}=loras/{name}" for name in adapters)
    command = (f"vllm serve {shlex.quote(base_arg)} --served-model-name base --port {PORT} "
               f"--enable-lora --max-lora-rank {max_rank(adapters)} --max-loras {len(adapters)} "
               f"--lora-modules {modules}")  # fmt: skip
    write_launch(out, command)
    backend = {"type": "vllm", "url": f"http://127.0.0.1:{PORT}/v1", "base_model": "base",
               "models": {name: name for name in adapters}}  # fmt: skip
    backend_stack(config, backend, out / "stack.yaml")
    return {"stages": {s.name: f"loras/{s.name}" if s.name in adapters else "base" for s in config.stages},
            "command": command, "backend_stack": "stack.yaml"}  # fmt: skip


EXPORTERS.add("vllm", write_vllm)
