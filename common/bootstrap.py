"""Paired per-user bootstrap of a method difference, recomputed from combined sufficient statistics.

Users are the unit of resampling: each resample draws users with replacement, sums each method's
statistics over the drawn users and finalizes the primary metric, so corpus-level metrics (macro-F1,
RMSE) are resampled exactly as they are computed, not as an average of per-user scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.metrics import Statistics, finalize, primary_metric
from common.tasks import TaskSpec

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Difference:
    """metric(method) - metric(reference) over the same users, with a percentile confidence interval."""

    method: str
    reference: str
    difference: float
    low: float
    high: float
    users: int
    level: float = LEVEL
    resamples: int = RESAMPLES


def _layout(stats: Statistics) -> list[tuple[str, int | None]]:
    """Each statistic's name and length (None for a scalar), in a fixed order."""
    return [(key, len(value) if isinstance(value, list) else None) for key, value in sorted(stats.items())]


def _flatten(stats: Statistics, layout: list[tuple[str, int | None]]) -> np.ndarray:
    return np.concatenate([np.atleast_1d(np.asarray(stats[key], dtype=float)) for key, _ in layout])


def _unflatten(row: np.ndarray, layout: list[tuple[str, int | None]]) -> Statistics:
    stats: Statistics = {}
    start = 0
    for key, length in layout:
        stats[key] = row[start:start + length].tolist() if length is not None else float(row[start])
        start += length or 1
    return stats


def paired_difference(
    task: TaskSpec,
    per_user: Sequence[Mapping[str, Statistics]],
    method: str,
    reference: str,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Difference:
    """The primary-metric difference method - reference over users that have both, with a bootstrap CI.

    `per_user` holds one mapping {method: statistics} per user; users without queries for either method
    carry no information and are left out.
    """
    users = [u for u in per_user if u.get(method, {}).get("n") and u.get(reference, {}).get("n")]
    if not users:
        raise ValueError(f"no user has statistics for both {method!r} and {reference!r}")
    lead, _ = primary_metric(task)
    layout = _layout(users[0][method])
    ours = np.stack([_flatten(u[method], layout) for u in users])  # (users, statistics)
    theirs = np.stack([_flatten(u[reference], layout) for u in users])

    def metric(totals: np.ndarray) -> float:
        return finalize(task, _unflatten(totals, layout))[lead]

    point = metric(ours.sum(axis=0)) - metric(theirs.sum(axis=0))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(users), np.full(len(users), 1 / len(users)), size=resamples)  # (resamples, users)
    ours_totals, theirs_totals = counts @ ours, counts @ theirs
    draws = np.array([metric(a) - metric(b) for a, b in zip(ours_totals, theirs_totals)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Difference(method, reference, float(point), float(low), float(high), len(users), level, resamples)
