"""Write a pruned model as a directory that transformers and ``slmstack`` load, with masks and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmstack.errors import ConfigError
from slmstack.io import atomic_dir, atomic_write_json, check_output_dir, read_json
from slmstack.ownership import LEGACY, claim_dir
from slmstack.pruning.engine import PruneResult
from slmstack.pruning.masks import save_masks

__all__ = ["save_pruned"]

REPORT = "prune_report.json"


def save_pruned(result: PruneResult, tokenizer: Any, out: Path, overwrite: bool = False) -> Path:
    """Save model (safetensors), tokenizer, bit-packed ``masks.safetensors`` and ``prune_report.json``.

    The directory is written under a temp name and renamed into place. An existing directory that is
    not a previous slmstack prune output is refused unless ``overwrite``.
    """
    out = check_output_dir(Path(out), "pruned model directory")
    claim_dir(out.parent, "prune", "--out folder", legacy=LEGACY["prune"])
    if out.exists():
        ours = (out / REPORT).is_file()
        if not overwrite or not ours:
            what = "a previous prune output" if ours else "something else"
            raise ConfigError(f"{out} already holds {what}. Use another --out, or pass --overwrite"
                              + ("" if ours else " after checking it is safe to replace") + ".")  # fmt: skip

    def write(tmp: Path) -> None:
        result.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_masks(result.masks, tmp / "masks.safetensors")
        atomic_write_json(tmp / REPORT, result.report)

    return atomic_dir(out, write)


def read_report(path: Path) -> dict[str, Any]:
    """The ``prune_report.json`` of a pruned model directory."""
    return read_json(Path(path) / REPORT, "prune report", "Prune the block again.", expect=dict)
