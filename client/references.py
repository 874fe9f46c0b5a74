"""Non-LLM reference rows: the simplest predictors a skeptical reviewer tries first, computed on the device.

A method shows it learned the user only if it beats these on the same queries:
- rating tasks: the user's mean of their latest ratings (rounded), and the median of all their ratings;
- label tasks: the user's most frequent label;
- generation tasks: the answer of the user's BM25-most-similar history item;
- every label task: the best constant, learned from the training users' answer frequencies (statistics only).
Like every method's, only their metric statistics leave the device.
"""

from __future__ import annotations

import statistics as stats
from collections import Counter
from collections.abc import Sequence

from client.data import User
from client.retrieval import HistoryRetriever
from common.metrics import decide
from common.tasks import TaskSpec

PREFIX = "ref-"
RECENT_MEAN = PREFIX + "recent-mean"
MEDIAN = PREFIX + "median"
MODE = PREFIX + "mode"
NEAREST = PREFIX + "nearest"
CONSTANT = PREFIX + "constant"
RECENT_ITEMS = 32  # the 32 latest ratings: the history a default personal adapter trains on

DESCRIPTIONS = {
    RECENT_MEAN: f"the user's mean of their {RECENT_ITEMS} latest ratings, rounded",
    MEDIAN: "the median of all the user's ratings",
    MODE: "the user's most frequent label",
    NEAREST: "the answer of the BM25-most-similar history item",
    CONSTANT: "the best constant answer, from the training users' answer shares",
}


def is_reference(name: str) -> bool:
    return name.startswith(PREFIX)


def _format_number(value: float) -> str:
    return f"{value:g}"


def answer_frequencies(task: TaskSpec, user: User) -> list[float]:
    """Share of each of the task's labels among the user's history answers and query golds (what a training
    user contributes to the best constant; only these shares leave the device)."""
    answers = [item.fields[task.answer_field].strip() for item in user.history] + [q.gold.strip() for q in user.queries]
    counts = Counter(a for a in answers if a in task.labels)
    total = sum(counts.values())
    return [counts[label] / total if total else 0.0 for label in task.labels]


def reference_predictions(task: TaskSpec, user: User, constant: str | None = None) -> dict[str, list[str]]:
    """Each reference row's prediction for every query of `user`, from the user's own history only."""
    answers = [item.fields[task.answer_field].strip() for item in user.history]
    queries = user.queries
    rows: dict[str, list[str]] = {}
    if answers and task.metric == "regression":
        ratings = [float(a) for a in answers]
        rows[RECENT_MEAN] = [_format_number(round(stats.fmean(ratings[-RECENT_ITEMS:])))] * len(queries)
        rows[MEDIAN] = [_format_number(stats.median(ratings))] * len(queries)
    elif answers and task.metric == "classification":
        counts = Counter(answers)
        latest = {a: i for i, a in enumerate(answers)}  # ties go to the label used most recently
        rows[MODE] = [max(counts, key=lambda a: (counts[a], latest[a]))] * len(queries)
    elif answers:
        retriever = HistoryRetriever(task, user.history)
        rows[NEAREST] = [retriever.top_k(q.input, 1)[0].fields[task.answer_field] for q in queries]
    if constant is not None:
        rows[CONSTANT] = [constant] * len(queries)
    return rows


def reference_names(task: TaskSpec, with_constant: bool) -> list[str]:
    """The reference rows a run of `task` reports, in report order."""
    names = {"regression": [RECENT_MEAN, MEDIAN], "classification": [MODE], "generation": [NEAREST]}[task.metric]
    return names + ([CONSTANT] if with_constant else [])


def best_constant(task: TaskSpec, frequencies: Sequence[float], rule: str) -> str | None:
    """The constant answer that the decision rule picks from the pooled training-user frequencies."""
    if not task.labels or not sum(frequencies):
        return None
    return decide(task.labels, list(frequencies), rule)  # type: ignore[arg-type]
