"""Decision rules over label probabilities: each minimises its metric's expected loss."""

from __future__ import annotations

import random

import pytest

from common.metrics import decide, decision_rule
from common.tasks import RATINGS, get_task


def expected_abs_error(answer: float, probabilities: list[float]) -> float:
    return sum(p * abs(answer - float(label)) for label, p in zip(RATINGS, probabilities))


def test_rules_on_a_known_distribution():
    probabilities = [0.1, 0.1, 0.2, 0.3, 0.3]
    assert decide(RATINGS, probabilities, "argmax") == "4"  # tie of 4 and 5: the earlier label
    assert decide(RATINGS, probabilities, "median") == "4"  # cumulative 0.1, 0.2, 0.4, 0.7
    assert decide(RATINGS, probabilities, "mean") == "3.600"
    skewed = [0.45, 0.0, 0.0, 0.2, 0.35]
    assert decide(RATINGS, skewed, "argmax") == "1"
    assert decide(RATINGS, skewed, "median") == "4"
    assert expected_abs_error(4, skewed) == pytest.approx(1.7)
    assert expected_abs_error(1, skewed) == pytest.approx(2.0)


def test_median_minimises_expected_absolute_error_and_mean_squared_error():
    rng = random.Random(0)
    for _ in range(200):
        raw = [rng.random() ** 3 for _ in RATINGS]
        probabilities = [x / sum(raw) for x in raw]
        median = float(decide(RATINGS, probabilities, "median"))
        best = min(expected_abs_error(float(label), probabilities) for label in RATINGS)
        assert expected_abs_error(median, probabilities) == pytest.approx(best)
        mean = float(decide(RATINGS, probabilities, "mean"))
        expected = sum(p * float(label) for label, p in zip(RATINGS, probabilities))
        assert mean == pytest.approx(expected, abs=5e-4)  # the expectation, to the 3 decimals the rule writes
        squared = lambda a: sum(p * (a - float(label)) ** 2 for label, p in zip(RATINGS, probabilities))  # noqa: E731
        assert squared(mean) <= min(squared(mean - 0.01), squared(mean + 0.01))  # no nearby answer does better


def test_auto_rule_fits_the_primary_metric_and_numeric_rules_need_ratings():
    assert decision_rule(get_task("MovieLens")) == "median"
    assert decision_rule(get_task("LaMP-3"), "mean") == "mean"
    assert decision_rule(get_task("LaMP-2M")) == "argmax"
    with pytest.raises(ValueError, match="needs numeric labels"):
        decision_rule(get_task("LaMP-2M"), "median")
    with pytest.raises(ValueError, match="expected one of auto, argmax, median, mean"):
        decision_rule(get_task("MovieLens"), "mode")
