"""bench.task_ceiling on the tiny model: the curve's steps and values, the no-LLM rows, and the JSON it leaves."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from bench.item_knowledge import asked_movie, ceiling_rows
from bench.task_ceiling import about_movies, base_scores, level_plus_offset, main, most_asked, movie_ratings
from client.data import load_movielens
from client.history import validation_view
from client.partition import split_users
from client.references import LEVEL_ITEM, POPULATION, RECENT_MEAN, reference_predictions
from common.config import RunConfig, UserCounts
from common.tasks import get_task


def test_curve_and_reference_rows(tiny, tmp_path):
    out = tmp_path / "ceiling.json"
    results = main(["--model", "tiny-random", "--device", "cpu", "--num-clients", "3", "--users", "4",
                    "--items-per-user", "4", "--batch-tokens", "128", "--eval-every", "2", "--max-steps", "5",
                    "--out", str(out)])
    curve = results["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 5]  # step 0, every 2nd step, and the last one
    assert curve[0]["loss"] is None and curve[0]["examples"] == curve[0]["tokens"] == 0
    assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in curve[1:])
    assert all(0 <= p["mae"] <= 4 and p["sd"] >= 0 for p in curve)
    assert [p["examples"] for p in curve] == sorted(p["examples"] for p in curve) and curve[-1]["tokens"] > 0
    assert results["training"]["users"] == 4 and results["training"]["examples"] == 4 * (5 + 4)  # queries + items
    assert results["questions"] == 3 * 5  # a run's --validation-items

    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(3, 0), RunConfig())
    views = [validation_view(u, task, 5) for u in tests]
    outside = [u for u in users if u not in tests]
    refs = results["references"]
    assert refs["all outside"] == ceiling_rows(views, outside, 0)
    assert refs["training data"] == ceiling_rows(views, split_users(users, UserCounts(3, 4), RunConfig())[1], 4)
    recent = [abs(float(a) - float(q.gold)) for v in views
              for a, q in zip(reference_predictions(task, v)[RECENT_MEAN], v.queries)]
    assert refs[RECENT_MEAN] == pytest.approx(sum(recent) / len(recent))

    assert json.loads(out.read_text())["curve"] == curve
    assert not any("lora" in name for name, _ in tiny[0].named_modules())  # the shared base is left clean


def test_bad_counts_are_refused(capsys):
    for argv, message in [(["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
                          (["--asked-movies", "-1"], "--asked-movies must be 0 or more, got -1"),
                          (["--asked-movies", "5", "--items-per-user", "8"], "--asked-movies picks the training")]:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_movie_slice_trains_on_each_asked_movies_ratings_and_scores_only_their_questions(tiny, tmp_path):
    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(10, 0), RunConfig())
    views = [validation_view(u, task, 5) for u in tests]
    outside = [u for u in users if u not in tests]
    movies = most_asked(views, 4)
    counts = Counter(asked_movie(v.user_id, q.id) for v in views for q in v.queries)
    assert [counts[m] for m in movies] == sorted(counts.values(), reverse=True)[:4]

    raters = movie_ratings(outside, movies, 6, seed=0)
    assert raters == movie_ratings(outside, movies, 6, seed=0)  # seeded
    rated = Counter(u.history[-1].id for u in raters)
    available = {m: sum(any(h.id == m for h in u.history) for u in outside) for m in movies}
    assert rated == {m: min(6, available[m]) for m in movies}
    assert all(not u.queries for u in raters)
    kept = about_movies(views, set(movies))
    assert sum(len(v.queries) for v in kept) == sum(counts[m] for m in movies)

    results = main(["--model", "tiny-random", "--device", "cpu", "--num-clients", "10", "--asked-movies", "4",
                    "--per-movie", "6", "--eval-every", "100", "--max-steps", "3", "--out", str(tmp_path / "m.json")])
    assert results["training"]["examples"] == len(raters)  # one example per sampled rating
    assert results["questions"] == sum(counts[m] for m in movies)
    assert results["references"]["training data"] is None
    assert results["references"]["all outside"] == ceiling_rows(kept, outside, 0)
    # step 0 scores the untouched base (a fresh LoRA adds nothing): the same figures as scoring the base itself
    model, tokenizer = tiny
    untouched = base_scores(model, tokenizer, task, kept, RunConfig())
    first = results["curve"][0]
    assert all(first[k] == pytest.approx(v) for k, v in untouched.items() if k != "level_offset_vs_recent_mean")
    assert first["level_offset_vs_recent_mean"] == pytest.approx(untouched["level_offset_vs_recent_mean"])
    recent = results["references"][RECENT_MEAN]
    difference, low, high = untouched["level_offset_vs_recent_mean"]
    assert difference == pytest.approx(untouched["mae_level_offset"] - recent) and low <= difference <= high



def test_level_plus_llm_offset_adds_the_models_deviation_to_the_users_level():
    # expected ratings 3.0 and 4.0 (mean 3.5): -0.5 and +0.5 around each user's level, rounded into 1..5
    assert level_plus_offset([3.4, 4.2], [3.0, 4.0]) == [3.0, 5.0]
    assert level_plus_offset([1.2, 4.9], [2.0, 4.0]) == [1.0, 5.0]  # clipped to the scale
    assert level_plus_offset([3.6, 3.6, 3.6], [4.1, 4.1, 4.1]) == [4.0, 4.0, 4.0]  # no item signal: the level


def test_personalize_scores_oppu_as_a_run_does_on_the_trained_base(tiny, tmp_path):
    results = main(["--model", "tiny-random", "--device", "cpu", "--num-clients", "3", "--users", "4",
                    "--items-per-user", "4", "--eval-every", "100", "--max-steps", "3", "--dtype", "float32",
                    "--personalize", "--out", str(tmp_path / "p.json")])
    rows = results["personal"]["rows"]
    assert set(rows) >= {"base", "oppu", RECENT_MEAN}
    assert rows[RECENT_MEAN]["mae"] == pytest.approx(results["references"][RECENT_MEAN])  # same questions
    assert rows["base"]["mae"] == pytest.approx(results["curve"][-1]["mae"])  # merged = the curve's unmerged LoRA
    for name in ("base", "oppu"):
        difference, low, high = rows[name]["vs_recent_mean"]
        assert difference == pytest.approx(rows[name]["mae"] - rows[RECENT_MEAN]["mae"]) and low <= difference <= high
    assert results["personal"]["seconds_per_user"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["personal"] == results["personal"]
    assert not any("lora" in name for name, _ in tiny[0].named_modules())  # the shared base is left clean


def test_item_statistics_annotates_every_question_and_reports_the_tables_rows(tiny):
    argv = ["--model", "tiny-random", "--device", "cpu", "--num-clients", "3", "--users", "40", "--items-per-user", "4",
            "--eval-every", "100", "--max-steps", "1"]
    plain, annotated = main(argv), main(argv + ["--item-statistics"])
    assert plain["item_table"] is None
    assert annotated["training"]["examples"] == plain["training"]["examples"]
    # a question whose movie another training user rated gains its "other users rate it ..." line
    assert annotated["training"]["tokens_per_epoch"] > plain["training"]["tokens_per_epoch"]

    # the table's rows re-derived by hand from the 40 training users' full histories (shrunk by 5 pseudo-ratings)
    task = get_task("MovieLens")
    users = load_movielens()
    tests, training = split_users(users, UserCounts(3, 40), RunConfig())
    ratings: dict[str, list[float]] = {}
    offsets: dict[str, list[float]] = {}
    for user in training:
        scores = [float(h.fields["score"]) for h in user.history]
        level = sum(scores) / len(scores)
        for h, s in zip(user.history, scores):
            ratings.setdefault(h.id, []).append(s)
            offsets.setdefault(h.id, []).append(s - level)
    everyone = [s for found in ratings.values() for s in found]
    population = sum(everyone) / len(everyone)
    population_errors, level_errors, rated = [], [], 0
    for view in (validation_view(u, task, 5) for u in tests):
        recent = [float(h.fields["score"]) for h in view.history[-32:]]
        for q in view.queries:
            movie = asked_movie(view.user_id, q.id)
            found = ratings.get(movie, [])
            rated += bool(found)
            mean = (sum(found) + 5 * population) / (len(found) + 5)
            offset = sum(offsets.get(movie, [])) / (len(found) + 5)
            population_errors.append(abs(min(5, max(1, round(mean))) - float(q.gold)))
            level_errors.append(abs(min(5, max(1, round(sum(recent) / len(recent) + offset))) - float(q.gold)))
    assert rated >= 3  # questions whose movie the training users rated (the rest read the population's mean)
    table = annotated["item_table"]
    assert table[POPULATION] == pytest.approx(sum(population_errors) / len(population_errors))
    assert table[LEVEL_ITEM] == pytest.approx(sum(level_errors) / len(level_errors))
