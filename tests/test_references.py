"""Reference rows on values: the user's recent mean and median rating, most frequent label, nearest item."""

from __future__ import annotations

from client.data import HistoryItem, Query, User
from client.references import answer_frequencies, best_constant, reference_predictions
from common.tasks import get_task


def _user(task: str, items: list[dict[str, str]], queries: list[str]) -> User:
    history = [HistoryItem(f"h{i}", fields) for i, fields in enumerate(items)]
    return User("u", task, history, [Query(f"q{i}", text, "1") for i, text in enumerate(queries)])


def test_rating_references_use_the_latest_32_for_the_mean_and_all_for_the_median():
    task = get_task("MovieLens")
    scores = [1] * 20 + [5] * 20 + [4] * 12  # latest 32: twenty 5s, twelve 4s -> mean 4.625 -> 5; median of all 4
    user = _user("MovieLens", [{"movie": f"m{i}", "score": str(s)} for i, s in enumerate(scores)], ["a", "b"])
    rows = reference_predictions(task, user, constant="4")
    assert rows == {"ref-recent-mean": ["5", "5"], "ref-median": ["4", "4"], "ref-constant": ["4", "4"]}
    even = _user("MovieLens", [{"movie": "x", "score": "2"}, {"movie": "y", "score": "5"}], ["a"])
    assert reference_predictions(task, even)["ref-median"] == ["3.5"]


def test_label_reference_is_the_most_frequent_label_ties_to_the_latest():
    task = get_task("LaMP-2M")
    tags = ["comedy", "sci-fi", "comedy", "sci-fi", "romance"]
    user = _user("LaMP-2M", [{"description": f"d{i}", "tag": t} for i, t in enumerate(tags)], ["q"])
    assert reference_predictions(task, user) == {"ref-mode": ["sci-fi"]}


def test_generation_reference_is_the_bm25_nearest_items_answer():
    task = get_task("LaMP-4")
    items = [{"text": "stocks fall on wall street", "title": "Markets slide"},
             {"text": "the team wins the cup final", "title": "Cup glory"}]
    user = _user("LaMP-4", items, ["Generate a headline for the following article: the final of the cup"])
    assert reference_predictions(task, user) == {"ref-nearest": ["Cup glory"]}


def test_best_constant_follows_the_decision_rule():
    task = get_task("MovieLens")
    user = _user("MovieLens", [{"movie": "m", "score": s} for s in "1115544"], [])
    shares = answer_frequencies(task, user)
    assert shares == [3 / 7, 0, 0, 2 / 7, 2 / 7]
    assert best_constant(task, shares, "argmax") == "1"
    assert best_constant(task, shares, "median") == "4"  # cumulative 3/7, then 5/7 at "4"
    assert best_constant(get_task("LaMP-4"), [], "argmax") is None
