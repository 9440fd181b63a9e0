"""Task metrics: accuracy over a label set, and ROUGE-L through Google's ``rouge-score`` package.

Both are registered (:data:`METRICS`); a metric maps (prediction, references) to a score in [0, 1] and a
task's score is the mean over its examples. Accuracy compares the chosen label with the target exactly.
ROUGE-L is the F-measure of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``, the
best over the references (``score_multi``), as the paper scored generation.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from slmstack.errors import ConfigError
from slmstack.registry import Registry

__all__ = ["METRICS", "accuracy", "rouge_l"]

METRICS: Registry[Callable[[str, list[str]], float]] = Registry("metric")


@METRICS.register("accuracy")
def accuracy(prediction: str, references: list[str]) -> float:
    """1.0 when the predicted label equals the (first) reference label, else 0.0."""
    return float(prediction.strip() == references[0].strip())


@lru_cache(maxsize=1)
def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("ROUGE-L needs rouge-score: pip install 'slmstack[transfer]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@METRICS.register("rouge_l")
def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure of ``prediction`` against the best of ``references`` (rouge-score, stemmed)."""
    return _scorer().score_multi(references, prediction)["rougeL"].fmeasure
