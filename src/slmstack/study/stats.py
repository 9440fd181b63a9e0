"""The study's statistics: per-item scores averaged over seeds, a paired randomization test, Holm's correction.

Protocol 2 names one primary contrast before the run and tests it on per-item scores averaged over seeds (so the
seeds' variation is in the item scores, not a choice of seed); the other contrasts get Holm's step-down correction
(Holm 1979, "A simple sequentially rejective multiple test procedure").
"""

from __future__ import annotations

from typing import Any

__all__ = ["contrast", "holm", "seed_mean_items", "sign_flip_p"]


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order.

    Sorted ascending, the i-th smallest (from 0) of m is multiplied by (m - i); each adjusted value is at least the
    one before it (the step-down), and at most 1.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def sign_flip_p(diffs: list[float], samples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired randomization test of mean(diffs) = 0: each difference's sign flipped at random.

    The p-value is (1 + #{|mean of flipped| >= |observed|}) / (1 + samples), which is never 0.
    """
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < samples:  # in chunks: samples x items signs at once would not fit for thousands of items
        chunk = min(1000, samples - done)
        signs = rng.integers(0, 2, size=(chunk, d.size), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ d) / d.size >= observed - 1e-12).sum())
        done += chunk
    return (1 + hits) / (1 + samples)


def seed_mean_items(runs: list[dict[str, Any]], tasks: list[str]) -> list[float]:
    """Each item's score averaged over an arm's seeds, tasks in order (every run scores the same items)."""
    per_run = [[x for t in tasks for x in r["tasks"][t]["items"]] for r in runs]
    return [sum(col) / len(col) for col in zip(*per_run, strict=True)]


def contrast(a: list[float], b: list[float], bootstrap: int, seed: int) -> dict[str, Any]:
    """B - a on paired item scores: the mean difference, its bootstrap 95 % interval and the randomization p."""
    from slmstack.evaluation.attribution import paired_bootstrap_ci

    diffs = [y - x for x, y in zip(a, b, strict=True)]
    lo, hi = paired_bootstrap_ci(a, b, bootstrap, seed)
    return {"delta": sum(diffs) / len(diffs), "ci95": [lo, hi], "p": sign_flip_p(diffs, seed=seed), "n": len(a)}
