"""Stack training: read instruction data, distil each stage's targets from a teacher, LoRA-train each stage.

Modules: ``data`` (instruction readers), ``teachers`` (local model or OpenAI-compatible endpoint),
``distill`` (per-stage datasets), ``train_data`` (tokenised, length-grouped batches), ``trainer``
(:func:`train_stack`) and ``checkpoint`` (atomic, resumable checkpoints).
"""
