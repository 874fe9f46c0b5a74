"""LaMP's metrics as per-user sufficient statistics: computed on a device, combined exactly anywhere.

Only these statistics leave a device. Combining is a plain sum, so metrics over all users equal the
metrics computed centrally from all predictions:
- classification: accuracy and macro-F1 over the task's label list (an off-list output is wrong and
  counts as a false negative of the gold class only, as LaMP's evaluation maps it to label -1);
- regression: MAE and RMSE, an unparseable output scored as the farther of 1 and 5 from the gold;
- generation: ROUGE-1 and ROUGE-L F-measure (rouge-score), averaged over queries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Literal

from common.tasks import TaskSpec

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

Statistics = dict[str, float | list[float]]


@cache
def _rouge() -> RougeScorer:
    """ROUGE-1 and ROUGE-L, made on first use: rouge-score brings nltk and scipy (0.75 s to import), which only
    generation tasks need, and every process reading a config would pay for them (a SuperNode starts one per
    message)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"])


def _parse_rating(text: str, gold: float) -> float:
    """LaMP-3's reading of a rating: a number, or the worst of 1 and 5 when there is none."""
    try:
        return float(text.strip())
    except ValueError:
        return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def statistics(task: TaskSpec, predictions: Sequence[str], golds: Sequence[str]) -> Statistics:
    """Sufficient statistics of one user's predictions."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    n = float(len(golds))
    if task.metric == "classification":
        labels = list(task.labels)
        tp, fp, fn = [0.0] * len(labels), [0.0] * len(labels), [0.0] * len(labels)
        correct = 0.0
        for prediction, gold in zip(predictions, golds):
            p, g = prediction.strip(), gold.strip()
            if p == g:
                correct += 1
            if p == g and g in labels:
                tp[labels.index(g)] += 1
                continue
            if g in labels:
                fn[labels.index(g)] += 1
            if p in labels:
                fp[labels.index(p)] += 1
        return {"n": n, "correct": correct, "tp": tp, "fp": fp, "fn": fn}
    if task.metric == "regression":
        errors = [abs(_parse_rating(p, float(g)) - float(g)) for p, g in zip(predictions, golds)]
        return {"n": n, "abs_error": sum(errors), "sq_error": sum(e * e for e in errors)}
    scores = [_rouge().score(g, p) for p, g in zip(predictions, golds)]
    return {
        "n": n,
        "rouge1": sum(s["rouge1"].fmeasure for s in scores),
        "rougeL": sum(s["rougeL"].fmeasure for s in scores),
    }


def combine(parts: Iterable[Statistics]) -> Statistics:
    """Element-wise sum of statistics (lists summed position by position)."""
    total: Statistics = {}
    for part in parts:
        for key, value in part.items():
            if key not in total:
                total[key] = list(value) if isinstance(value, list) else value
            elif isinstance(value, list):
                total[key] = [a + b for a, b in zip(total[key], value)]  # type: ignore[arg-type]
            else:
                total[key] = total[key] + value  # type: ignore[operator]
    return total


def finalize(task: TaskSpec, stats: Statistics) -> dict[str, float]:
    """Metric values from (combined) statistics."""
    n = stats.get("n", 0.0)  # combine([]) is {}: no queries at all
    if not n:
        return {}
    if task.metric == "classification":
        f1s = [
            2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
            for tp, fp, fn in zip(stats["tp"], stats["fp"], stats["fn"])  # type: ignore[arg-type]
        ]
        return {"accuracy": stats["correct"] / n, "f1": sum(f1s) / len(f1s)}  # type: ignore[operator]
    if task.metric == "regression":
        return {"mae": stats["abs_error"] / n, "rmse": math.sqrt(stats["sq_error"] / n)}  # type: ignore[operator]
    return {"rouge-1": stats["rouge1"] / n, "rouge-L": stats["rougeL"] / n}  # type: ignore[operator]


def primary_metric(task: TaskSpec) -> tuple[str, bool]:
    """The metric the paper's Table 2 leads with, and whether higher is better."""
    return {"classification": ("accuracy", True), "regression": ("mae", False), "generation": ("rouge-1", True)}[
        task.metric
    ]


DecisionRule = Literal["argmax", "median", "mean"]


DECISION_RULES: tuple[str, ...] = ("auto", "argmax", "median", "mean")


def decision_rule(task: TaskSpec, rule: str = "auto") -> DecisionRule:
    """The rule that turns label probabilities into an answer; 'auto' fits the task's primary metric.

    MAE is minimised by the median of a distribution over ratings, accuracy by its mode (the paper's argmax);
    the mean (RMSE's minimiser) and the median need ordered numeric labels, so only rating tasks take them.
    """
    if rule not in DECISION_RULES:
        raise ValueError(f"decision rule {rule!r}: expected one of {', '.join(DECISION_RULES)}")
    if rule == "auto":
        return "median" if task.metric == "regression" else "argmax"
    if rule != "argmax" and task.metric != "regression":
        raise ValueError(f"decision rule {rule!r} needs numeric labels; {task.name} is scored by {task.metric}")
    return rule  # type: ignore[return-value]


def expected_rating(labels: Sequence[str], probabilities: Sequence[float]) -> float:
    """The mean of a distribution over numeric `labels` (the `mean` rule's answer, unrounded)."""
    return sum(float(label) * p for label, p in zip(labels, probabilities)) / sum(probabilities)


def decide(labels: Sequence[str], probabilities: Sequence[float], rule: DecisionRule, quantile: float = 0.5) -> str:
    """One answer from a distribution over `labels` (numeric labels in ascending order for median/mean). The
    median rule answers the first label whose cumulative probability reaches `quantile` (0.5: the median; a
    calibrated shared model's methods use another, `answer_quantile`)."""
    if rule == "argmax":  # ties go to the earlier label
        return labels[max(range(len(labels)), key=lambda j: (probabilities[j], -j))]
    if rule == "mean":
        return f"{expected_rating(labels, probabilities):.3f}"
    total = sum(probabilities)
    cumulative = 0.0
    for label, p in zip(labels, probabilities):
        cumulative += p / total
        if cumulative >= quantile:
            return label
    return labels[-1]


# the quantiles a calibration round scores (server/calibration.py): the median and five steps of 0.05 either side
ANSWER_QUANTILES: tuple[float, ...] = tuple(round(0.25 + 0.05 * i, 2) for i in range(11))


def quantile_errors(labels: Sequence[str], probabilities: Sequence[Sequence[float]],
                    golds: Sequence[str]) -> list[float]:
    """Per quantile of ANSWER_QUANTILES, the mean absolute error of answering at it (numeric labels)."""
    return [sum(abs(float(decide(labels, row, "median", q)) - float(gold)) for row, gold in zip(probabilities, golds))
            / len(golds) for q in ANSWER_QUANTILES]


def answer_quantile(errors: Sequence[float]) -> float:
    """The quantile of ANSWER_QUANTILES with the lowest error; among equal errors the one nearest the median."""
    return min(zip(ANSWER_QUANTILES, errors), key=lambda qe: (round(qe[1], 9), abs(qe[0] - 0.5)))[0]
