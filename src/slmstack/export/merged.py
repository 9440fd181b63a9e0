"""``merged``: one Hugging Face model folder per stage, its LoRA adapter merged into the base weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmstack.export.base import EXPORTERS

__all__ = ["write_merged"]


def write_merged(config: Any, out: Path) -> dict[str, Any]:
    """Each adapter stage as ``out/<stage>/`` (peft's ``merge_and_unload``); bare stages share ``out/base/``."""
    from peft import PeftModel

    from slmstack.models import load_model
    from slmstack.stack.adapters import check_adapter

    stages: dict[str, str] = {}
    base_written = False
    for stage in config.stages:
        if stage.kind == "retrieve":
            continue
        path = config.adapter_path(stage)
        loaded = load_model(config.model, device="cpu", dtype="float32")
        if path is None:
            if not base_written:
                loaded.model.save_pretrained(out / "base")
                loaded.tokenizer.save_pretrained(out / "base")
                base_written = True
            stages[stage.name] = "base"
            continue
        check_adapter(loaded.model, path, f"stage {stage.name!r}", config.model)
        merged = PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
        merged.save_pretrained(out / stage.name)
        loaded.tokenizer.save_pretrained(out / stage.name)
        stages[stage.name] = stage.name
    return {"stages": stages}


EXPORTERS.add("merged", write_merged)
