"""LaMP metrics as per-user sufficient statistics (client.metrics): hand-computed values and exact pooling."""

from __future__ import annotations

import copy
import math
import random

import pytest
from rouge_score import rouge_scorer

from common.metrics import combine, finalize, primary_metric, statistics
from common.tasks import MOVIE_TAGS, NEWS_CATEGORIES, get_task

MOVIES = get_task("LaMP-2M")
CITATION = get_task("LaMP-1")
NEWS = get_task("LaMP-2N")
RATING = get_task("LaMP-3")
HEADLINE = get_task("LaMP-4")


# --- classification ---------------------------------------------------------------------------------------


def test_classification_hand_computed():
    golds = ["comedy", "comedy", "action", "sci-fi"]
    predictions = [" comedy\n", "action", "action", "banana"]  # whitespace is stripped; banana is off-list
    stats = statistics(MOVIES, predictions, golds)
    index = {label: i for i, label in enumerate(MOVIE_TAGS)}
    tp, fp, fn = [0.0] * 15, [0.0] * 15, [0.0] * 15
    tp[index["comedy"]] = 1
    fn[index["comedy"]] = 1  # comedy predicted as action
    tp[index["action"]] = 1
    fp[index["action"]] = 1
    fn[index["sci-fi"]] = 1  # the off-list prediction is only a false negative of the gold
    assert stats == {"n": 4.0, "correct": 2.0, "tp": tp, "fp": fp, "fn": fn}
    # F1: comedy 2/3, action 2/3, sci-fi 0, the 12 labels never seen 0 -> macro over all 15 labels
    result = finalize(MOVIES, stats)
    assert result == {"accuracy": 0.5, "f1": pytest.approx(4 / 45, abs=1e-15)}
    assert result["f1"] == pytest.approx((2 / 3 + 2 / 3) / 15, abs=1e-15)


def test_classification_citation():
    golds = ["[1]", "[1]", "[2]", "[2]"]
    predictions = ["[1]", "[2]", "[1]", "1"]
    stats = statistics(CITATION, predictions, golds)
    assert stats == {"n": 4.0, "correct": 1.0, "tp": [1.0, 0.0], "fp": [1.0, 1.0], "fn": [1.0, 2.0]}
    # [1]: 2*1/(2+1+1) = 0.5; [2]: 0
    assert finalize(CITATION, stats) == {"accuracy": 0.25, "f1": 0.25}


def test_classification_all_correct_few_labels_seen():
    golds = ["travel", "travel", "women"]
    stats = statistics(NEWS, golds, golds)
    assert finalize(NEWS, stats) == {"accuracy": 1.0, "f1": pytest.approx(2 / 15, abs=1e-15)}
    assert stats["fp"] == [0.0] * 15 and sum(stats["fn"]) == 0.0 and sum(stats["tp"]) == 3.0


def test_classification_all_off_list():
    stats = statistics(NEWS, ["?", "", "Travel"], ["travel", "women", "travel"])
    assert finalize(NEWS, stats) == {"accuracy": 0.0, "f1": 0.0}
    assert sum(stats["fp"]) == 0.0 and sum(stats["fn"]) == 3.0


# --- regression --------------------------------------------------------------------------------------------


def test_regression_hand_computed():
    golds = ["2", "4", "3", "5", "1", "2", "4"]
    predictions = ["3", "x", "abc", " 5 ", "", "four", "4.5"]
    # parsed: 3; gold 4 -> 1 (farther); gold 3 -> 5 (tie: abs(1-3) > abs(5-3) is False); 5; gold 1 -> 5; gold 2 -> 5; 4.5
    errors = [1, 3, 2, 0, 4, 3, 0.5]
    stats = statistics(RATING, predictions, golds)
    assert stats == {"n": 7.0, "abs_error": sum(errors), "sq_error": sum(e * e for e in errors)}
    assert stats["abs_error"] == 13.5 and stats["sq_error"] == 39.25
    assert finalize(RATING, stats) == {"mae": 13.5 / 7, "rmse": math.sqrt(39.25 / 7)}


@pytest.mark.parametrize(("gold", "error"), [("1", 4.0), ("2", 3.0), ("3", 2.0), ("4", 3.0), ("5", 4.0)])
def test_regression_unparseable_is_the_farther_extreme(gold, error):
    stats = statistics(RATING, ["no idea"], [gold])
    assert stats["abs_error"] == error and stats["sq_error"] == error * error


def test_regression_movielens():
    stats = statistics(get_task("MovieLens"), ["1", "5"], ["3", "3"])
    assert finalize(get_task("MovieLens"), stats) == {"mae": 2.0, "rmse": 2.0}


# --- generation ---------------------------------------------------------------------------------------------


def test_rouge_hand_computed():
    # pair 1: prediction "the cat sat" against gold "the cat sat on the mat":
    #   unigram overlap 3, P = 3/3, R = 3/6 -> F = 2/3; LCS 3 -> same
    # pair 2: "d c b a" against "a b c d": unigram F = 1; LCS 1 -> P = R = 1/4 -> F = 1/4
    stats = statistics(HEADLINE, ["the cat sat", "d c b a"], ["the cat sat on the mat", "a b c d"])
    assert stats["n"] == 2.0
    assert stats["rouge1"] == pytest.approx(2 / 3 + 1, abs=1e-12)
    assert stats["rougeL"] == pytest.approx(2 / 3 + 1 / 4, abs=1e-12)
    result = finalize(HEADLINE, stats)
    assert result == {"rouge-1": pytest.approx(5 / 6, abs=1e-12), "rouge-L": pytest.approx(11 / 24, abs=1e-12)}


def test_rouge_matches_rouge_score():
    golds = [
        "Council backs plan for a new river bridge",
        "Storm batters the coast, thousands without power",
        "Local team wins the cup after extra time",
    ]
    predictions = [
        "City council votes for new bridge over the river",
        "thousands lose power as storm hits coast",
        "",
    ]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(g, p) for g, p in zip(golds, predictions)]  # score(target, prediction)
    expected_1 = sum(s["rouge1"].fmeasure for s in scores) / 3
    expected_l = sum(s["rougeL"].fmeasure for s in scores) / 3
    result = finalize(HEADLINE, statistics(HEADLINE, predictions, golds))
    assert result == {"rouge-1": pytest.approx(expected_1, rel=1e-12), "rouge-L": pytest.approx(expected_l, rel=1e-12)}
    assert 0 < result["rouge-L"] < result["rouge-1"] < 1
    # the empty prediction scores 0
    assert statistics(HEADLINE, [""], [golds[2]])["rouge1"] == 0.0


def test_rouge_not_stemmed():
    """LaMP's evaluate('rouge') default: no stemming, so "runs" and "running" do not match."""
    stats = statistics(HEADLINE, ["dog runs"], ["dog running"])
    assert stats["rouge1"] == pytest.approx(0.5, abs=1e-12)


# --- statistics -> combine -> finalize -------------------------------------------------------------------------


def _random_users(rng: random.Random, task, make_pair, num_users: int = 7):
    users = []
    for _ in range(num_users):
        n = rng.choice([0, 1, 2, 5, 9])
        pairs = [make_pair(rng) for _ in range(n)]
        users.append(([p for p, _ in pairs], [g for _, g in pairs]))
    return users


WORDS = "the a cat dog sat ran on under mat big red bridge council storm power".split()
GENERATORS = {
    "LaMP-2N": lambda rng: (rng.choice(list(NEWS_CATEGORIES) + ["none", " sports ", ""]), rng.choice(NEWS_CATEGORIES)),
    "LaMP-1": lambda rng: (rng.choice(["[1]", "[2]", "[3]", "2"]), rng.choice(["[1]", "[2]"])),
    "LaMP-3": lambda rng: (rng.choice(["1", "2", "3", "4", "5", "2.5", "x", ""]), rng.choice("12345")),
    "LaMP-5": lambda rng: (
        " ".join(rng.choices(WORDS, k=rng.randint(0, 8))),
        " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
    ),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_combine_equals_pooled(name, seed):
    task = get_task(name)
    rng = random.Random(seed)
    users = _random_users(rng, task, GENERATORS[name])
    parts = [statistics(task, predictions, golds) for predictions, golds in users]
    before = copy.deepcopy(parts)
    combined = combine(parts)
    assert parts == before  # combining does not change the parts
    all_predictions = [p for predictions, _ in users for p in predictions]
    all_golds = [g for _, golds in users for g in golds]
    pooled = statistics(task, all_predictions, all_golds)
    assert combined["n"] == pooled["n"] == len(all_golds) > 0
    if task.metric == "generation":
        # float sums in another order: equal up to rounding
        assert finalize(task, combined) == pytest.approx(finalize(task, pooled), rel=1e-12, abs=1e-15)
    else:
        # counts and errors are exact in binary: the very same values
        assert combined == pooled
        assert finalize(task, combined) == finalize(task, pooled)
    # combining in two stages (e.g. per node, then on the server) gives the same
    staged = combine([combine(parts[:3]), combine(parts[3:])])
    assert finalize(task, staged) == pytest.approx(finalize(task, combined), rel=1e-12, abs=1e-15)


def test_combine_sums_lists_and_numbers():
    a = {"n": 1.0, "tp": [1.0, 0.0], "x": 2.0}
    b = {"n": 2.0, "tp": [0.5, 3.0], "x": 1.0}
    assert combine([a, b]) == {"n": 3.0, "tp": [1.5, 3.0], "x": 3.0}
    assert combine([a]) == a and combine([a])["tp"] is not a["tp"]


def test_empty():
    assert combine([]) == {}
    assert finalize(MOVIES, combine([])) == {}
    assert finalize(RATING, statistics(RATING, [], [])) == {}
    assert finalize(HEADLINE, combine([statistics(HEADLINE, [], []), statistics(HEADLINE, [], [])])) == {}


def test_length_mismatch():
    with pytest.raises(ValueError, match="^2 predictions for 3 golds$"):
        statistics(RATING, ["1", "2"], ["1", "2", "3"])


def test_primary_metric():
    assert primary_metric(MOVIES) == ("accuracy", True)
    assert primary_metric(RATING) == ("mae", False)
    assert primary_metric(HEADLINE) == ("rouge-1", True)
