"""The names of every precision and weight format a model can run in: one table, read by every layer that checks one.

A stack's ``dtype`` is either a compute dtype (the model's weights and arithmetic in it) or a weight format of
slmstack's engine (weights stored smaller, arithmetic in float32; :class:`slmstack.engine.layers.Linear`). Of the
weight formats only ``float16-weights`` also runs on transformers (:mod:`slmstack.fp16_weights`).
"""

from __future__ import annotations

__all__ = ["COMPUTE_DTYPES", "DTYPES", "FP16_WEIGHTS", "JOBS", "LINEAR_FORMATS", "WEIGHT_FORMATS", "engine_weights"]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
FP16_WEIGHTS = "float16-weights"  # the one weight format transformers' generate runs too
WEIGHT_FORMATS = (FP16_WEIGHTS, "bfloat16-weights", "int8-weights", "int4-weights")
LINEAR_FORMATS = ("dense", *WEIGHT_FORMATS)  # how the engine keeps a linear layer's weight
DTYPES = ("auto", *COMPUTE_DTYPES, *WEIGHT_FORMATS)  # what a stack's dtype may say


JOBS = ("generate", "score")  # what a verb does with the model: text for people, or lm-eval-identical scores


def engine_weights(dtype: str, job: str = "generate") -> str:
    """The engine's linear-layer format for a stack ``dtype`` in a verb that does ``job``.

    A weight format is taken as it is and a compute dtype (``float32``...) is ``dense``. ``auto`` depends on the
    job (the table in docs/engine.md): generating text, the engine's ``auto`` (on a CPU, ``int4-weights`` for
    the projections the model's GGUF file stores in 4-bit blocks, taken exactly, and float32 for the rest);
    scoring, ``dense``, float32, in which lm-eval identity is defined.
    """
    if job not in JOBS:
        raise ValueError(f"job {job!r} is not one of {', '.join(JOBS)}")
    if dtype in WEIGHT_FORMATS:
        return dtype
    return "auto" if dtype == "auto" and job == "generate" else "dense"
