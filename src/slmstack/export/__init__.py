"""Moving a trained stack into the engines people already run: ``slmstack export``.

Each format is a few lines behind :data:`EXPORTERS` (``write(config, out) -> manifest``):

- ``merged`` (:mod:`.merged`): one Hugging Face model folder per stage with its adapter merged into the base
  weights (peft's ``merge_and_unload``); stages without an adapter share one copy of the base.
- ``gguf-lora`` (:mod:`.gguf_lora`): each stage's adapter as a GGUF LoRA file that llama.cpp loads with ``--lora``,
  the ``llama-server`` command line, and a stack YAML whose ``backend: {type: llamacpp}`` runs the stack there.
- ``vllm`` (:mod:`.vllm`): a ``--lora-modules`` layout beside the base model folder (slmstack's dequantized copy,
  so the weights are the ones the adapters were trained on), the ``vllm serve`` command line, and a stack YAML
  whose ``backend: {type: vllm}`` runs the stack there.

Every format writes ``export.json`` (the format, each stage's files, the command) into a fresh folder, built beside
``--out`` and moved into place when complete; ``--out`` must be new, empty, or an earlier export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmstack.registry import Registry

__all__ = ["EXPORTERS", "export_stack"]

EXPORTERS: Registry[Callable[[Any, Path], dict[str, Any]]] = Registry("export format")


def export_stack(config: Any, fmt: str, out: str | Path) -> dict[str, Any]:
    """Write ``config``'s stack to ``out`` in format ``fmt``; the manifest (also ``out/export.json``).

    Raises:
        ConfigError: an unknown format, a stack with a remote backend or without adapters where the format needs
            them, or an adapter the format cannot carry.
        InputError: ``out`` holds files slmstack export did not write.
    """
    from slmstack.errors import ConfigError
    from slmstack.io import atomic_dir, atomic_write_json
    from slmstack.ownership import MARKER, check_dir_ours

    write = EXPORTERS.get(fmt)
    if config.backend is not None:
        raise ConfigError(f"stack {config.name!r} runs on a remote backend: export needs the stack's own model and "
                          "adapters (remove its backend: section)")  # fmt: skip
    out = check_dir_ours(Path(out), "export", "--out folder")
    manifest: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        manifest.update({"format": fmt, "stack": config.name, "model": config.model, **write(config, tmp)})
        atomic_write_json(tmp / "export.json", manifest)
        atomic_write_json(tmp / MARKER, {"written_by": "slmstack", "verb": "export"})

    atomic_dir(out, build)
    return manifest


from slmstack.export import gguf_lora, merged, vllm  # noqa: E402, F401  (each registers its format)
