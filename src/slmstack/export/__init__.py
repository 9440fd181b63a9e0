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

from slmstack.export import gguf_lora, merged, vllm  # noqa: F401  (each registers its format)
from slmstack.export.base import EXPORTERS, export_stack

__all__ = ["EXPORTERS", "export_stack"]
