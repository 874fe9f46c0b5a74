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
from common.item_table import ItemReading
from common.metrics import decide
from common.tasks import TaskSpec

PREFIX = "ref-"
RECENT_MEAN = PREFIX + "recent-mean"
MEDIAN = PREFIX + "median"
MODE = PREFIX + "mode"
NEAREST = PREFIX + "nearest"
CONSTANT = PREFIX + "constant"
POPULATION = PREFIX + "population"
LEVEL_ITEM = PREFIX + "level-item"
RECENT_ITEMS = 32  # the 32 latest ratings: the history a default personal adapter trains on

DESCRIPTIONS = {
    RECENT_MEAN: f"the user's mean of their {RECENT_ITEMS} latest ratings, rounded",
    MEDIAN: "the median of all the user's ratings",
    MODE: "the user's most frequent label",
    NEAREST: "the answer of the BM25-most-similar history item",
    CONSTANT: "the best constant answer, from the training users' answer shares",
    POPULATION: "the other users' mean rating of the item (--item-statistics), rounded",
    LEVEL_ITEM: "the user's recent mean plus the other users' offset for the item (--item-statistics), rounded",
}


def _format_number(value: float) -> str:
    return f"{value:g}"


def answer_frequencies(task: TaskSpec, user: User) -> list[float]:
    """Share of each of the task's labels among the user's history answers and query golds (what a training
    user contributes to the best constant; only these shares leave the device)."""
    answers = [item.fields[task.answer_field].strip() for item in user.history] + [q.gold.strip() for q in user.queries]
    counts = Counter(a for a in answers if a in task.labels)
    total = sum(counts.values())
    return [counts[label] / total if total else 0.0 for label in task.labels]


def reference_predictions(task: TaskSpec, user: User, constant: str | None = None,
                          readings: Sequence[ItemReading] = ()) -> dict[str, list[str]]:
    """Each reference row's prediction for every query of `user`, from the user's own history only, and with the
    population's `readings` of the queries' items (--item-statistics) the two rows built on them."""
    answers = [item.fields[task.answer_field].strip() for item in user.history]
    queries = user.queries
    rows: dict[str, list[str]] = {}
    if answers and task.metric == "regression":
        ratings = [float(a) for a in answers]
        rows[RECENT_MEAN] = [_format_number(round(stats.fmean(ratings[-RECENT_ITEMS:])))] * len(queries)
        rows[MEDIAN] = [_format_number(stats.median(ratings))] * len(queries)
        if readings:
            level = stats.fmean(ratings[-RECENT_ITEMS:])
            rows[POPULATION] = [_format_number(_rating(r.mean, task)) for r in readings]
            rows[LEVEL_ITEM] = [_format_number(_rating(level + r.offset, task)) for r in readings]
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


def _rating(value: float, task: TaskSpec) -> float:
    """`value` rounded (as ref-recent-mean rounds) into the task's rating range."""
    ratings = [float(label) for label in task.labels]
    return float(min(max(ratings), max(min(ratings), round(value))))


def reference_names(task: TaskSpec, with_constant: bool, with_items: bool = False) -> list[str]:
    """The reference rows a run of `task` reports, in report order (`with_items`: under --item-statistics)."""
    names = {"regression": [RECENT_MEAN, MEDIAN], "classification": [MODE], "generation": [NEAREST]}[task.metric]
    items = [POPULATION, LEVEL_ITEM] if with_items and task.metric == "regression" else []
    return names + items + ([CONSTANT] if with_constant else [])


def best_constant(task: TaskSpec, frequencies: Sequence[float], rule: str) -> str | None:
    """The constant answer that the decision rule picks from the pooled training-user frequencies."""
    if not task.labels or not sum(frequencies):
        return None
    return decide(task.labels, list(frequencies), rule)  # type: ignore[arg-type]
