"""bench.item_knowledge: the movie offsets and the two ceiling predictors on hand-computed values."""

from __future__ import annotations

import pytest

from bench.item_knowledge import SHRINK, ceiling_rows, item_offsets
from client.data import HistoryItem, Query, User


def rated(user_id: str, ratings: list[tuple[str, int]], queries: list[tuple[str, int]] = ()) -> User:
    history = [HistoryItem(id=m, fields={"movie": m, "score": str(s)}) for m, s in ratings]
    return User(user_id, "MovieLens", history, [Query(id=f"val-{m}", input=m, gold=str(s)) for m, s in queries])


def test_offsets_are_shrunk_means_of_rating_minus_the_raters_level() -> None:
    raters = [rated("a", [("hit", 5), ("flop", 1)]), rated("b", [("hit", 4), ("x", 2)])]
    mean, offsets = item_offsets(raters, task_history=0)
    assert mean == pytest.approx(3.0)
    assert offsets["hit"] == pytest.approx((2 + 1) / (2 + SHRINK))  # a: 5 - 3, b: 4 - 3
    assert offsets["flop"] == pytest.approx(-2 / (1 + SHRINK))
    _, latest = item_offsets(raters, task_history=1)  # only each user's latest item counts
    assert set(latest) == {"flop", "x"} and latest["flop"] == 0.0


def test_level_plus_item_beats_the_level_only_where_the_population_knows_the_movie() -> None:
    raters = [rated(f"r{i}", [("hit", 5), ("flop", 1)]) for i in range(6)]  # offsets +-2 * 6 / (6 + 5) = +-1.09
    user = rated("t", [("old", 3)] * 32, queries=[("hit", 4), ("flop", 2), ("unknown", 3)])
    rows = ceiling_rows([user], raters, task_history=0)
    # level 3: hit 3 + 1.09 -> 4 (right), flop 3 - 1.09 -> 2 (right), unknown 3 (right)
    assert rows["level+item"] == 0.0 and rows["covered"] == pytest.approx(2 / 3)
    # the population's mean is 3 as well here, so the non-personal predictor answers the same
    assert rows["population"] == 0.0
    far = rated("t2", [("old", 5)] * 32, queries=[("hit", 5), ("flop", 4)])
    rows = ceiling_rows([far], raters, task_history=0)
    assert rows["level+item"] == 0.0  # 5 + 1.09 -> 5 (clipped); 5 - 1.09 = 3.91 -> 4
    assert rows["population"] == pytest.approx((1 + 2) / 2)  # 3 + 1.09 -> 4 vs 5; 3 - 1.09 -> 2 vs 4
