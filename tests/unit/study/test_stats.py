"""Protocol 2's statistics by hand: Holm's correction, the randomization test, per-item means over seeds."""

from __future__ import annotations

import itertools

import pytest

from slmstack.study.stats import holm, seed_mean_items, sign_flip_p


def test_holm_by_hand() -> None:
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, the step-down keeps it
    # at least the one before)
    assert holm([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_the_randomization_p_equals_the_exact_enumeration() -> None:
    # Prepare: 6 paired differences; all 2^6 sign patterns are equally likely under the null
    diffs = [1.0, 1.0, 1.0, 0.0, 1.0, -1.0]
    observed = abs(sum(diffs)) / 6
    exact = sum(abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) / 6 >= observed - 1e-12
                for signs in itertools.product([-1, 1], repeat=6)) / 2**6  # fmt: skip
    # by hand: |sum| >= 3 needs at least 4 of the 5 nonzero signs to agree: 2 * (1 + 5) = 12 of 32 patterns
    assert exact == pytest.approx(12 / 32)
    # Execute / Assert: the Monte Carlo p lands on it
    assert sign_flip_p(diffs, samples=40_000, seed=1) == pytest.approx(exact, abs=0.01)
    assert sign_flip_p([0.0, 0.0], samples=100) == 1.0  # no difference: every flip is as extreme


def test_item_scores_are_averaged_over_seeds_task_by_task() -> None:
    runs = [{"tasks": {"a": {"items": [1, 0]}, "b": {"items": [1]}}},
            {"tasks": {"a": {"items": [0, 0]}, "b": {"items": [1]}}},
            {"tasks": {"a": {"items": [1, 1]}, "b": {"items": [0]}}}]  # fmt: skip
    assert seed_mean_items(runs, ["a", "b"]) == pytest.approx([2 / 3, 1 / 3, 2 / 3])
