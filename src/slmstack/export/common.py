"""What every export format shares: the stages with adapters, the launch script, the backend stack YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from slmstack.io import atomic_write_text

__all__ = ["adapter_stages", "backend_stack", "max_rank", "write_launch"]


def adapter_stages(config: Any) -> dict[str, Path]:
    """Stage name -> its adapter folder, for the stages that have one."""
    return {s.name: p for s in config.stages if (p := config.adapter_path(s)) is not None}


def max_rank(adapters: dict[str, Path]) -> int:
    """The largest LoRA rank among the adapters (what vLLM's ``--max-lora-rank`` must allow)."""
    ranks = [json.loads((p / "adapter_config.json").read_text())["r"] for p in adapters.values()]
    return max([8, *ranks])


def write_launch(out: Path, command: str) -> None:
    """``out/launch.sh``: the command that serves the export, run from inside the export folder."""
    atomic_write_text(out / "launch.sh", f'#!/bin/sh\n# written by slmstack export\ncd "$(dirname "$0")"\n{command}\n')
    (out / "launch.sh").chmod(0o755)


def backend_stack(config: Any, backend: dict[str, Any], path: Path) -> None:
    """The stack YAML, its stages unchanged but without adapters, generating on ``backend``."""
    from slmstack.config import dataclass_to_dict

    data = dataclass_to_dict(config)
    data["backend"] = backend
    for stage, original in zip(data["stages"], config.stages, strict=True):
        stage.pop("adapter", None)
        if original.index is not None:  # a retrieve stage's index, wherever the YAML now lives
            stage["index"] = str(config.index_path(original).resolve())
    data.pop("source", None)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
