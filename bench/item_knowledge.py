"""What knowing the movies would add to a user's own rating level: the ceiling a task-adapted base can bring.

    python -m bench.item_knowledge --num-clients 20                  # validation split of the 20 longest histories
    python -m bench.item_knowledge --num-clients 100 --train-clients 20,100,0

No LLM. A personal adapter learns the user's level (docs/quality.md: it answers like ref-recent-mean on most
questions); to beat that rule, the model must also know how each movie is rated by people in general, which only
the task-adapted base can carry. This prints, on the same validation questions bench.quality scores, the rule
ref-recent-mean alone and two predictors built from the ratings of T training users (sampled as a run samples
them, each user's `--task-history` latest items, as task adaptation sees them): *population* (the training
users' mean rating plus the movie's shrunk offset: the best a non-personal base could be) and *level + item* (the
user's recent mean plus that offset: what a base with that knowledge and a personal adapter could reach).
T=0 stands for every user outside the test set (all their items): knowledge of the movies as a larger model
might bring from pretraining. If *level + item* does not beat ref-recent-mean for a population size, no base
trained on that population can make `oppu` beat the rule through item knowledge.
"""

from __future__ import annotations

import argparse
import statistics as stats
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import finish
from client.data import User, load_movielens
from client.history import validation_view
from client.partition import split_users
from client.references import RECENT_ITEMS, RECENT_MEAN, reference_predictions
from common.config import RunConfig, UserCounts
from common.tasks import get_task

SHRINK = 5.0  # pseudo-ratings of offset 0 per movie: a movie rated by few training users stays near the mean


def item_offsets(users: list[User], task_history: int) -> tuple[float, dict[str, float]]:
    """(mean rating, {movie id: shrunk mean of (rating - the rater's own mean)}) over `users`' latest items."""
    offsets: dict[str, list[float]] = defaultdict(list)
    ratings: list[float] = []
    for user in users:
        items = user.history[-task_history:] if task_history else user.history
        scores = [float(item.fields["score"]) for item in items]
        level = stats.fmean(scores)
        ratings += scores
        for item, score in zip(items, scores):
            offsets[item.id].append(score - level)
    return stats.fmean(ratings), {movie: sum(d) / (len(d) + SHRINK) for movie, d in offsets.items()}


def rounded(value: float) -> float:
    return float(min(5, max(1, round(value))))


def recent_level(user: User) -> float:
    """The user's mean rating over the items ref-recent-mean reads."""
    return stats.fmean(float(item.fields["score"]) for item in user.history[-RECENT_ITEMS:])


def level_profile(user: User) -> str | None:
    """The user's recent level as a one-line profile (what ref-recent-mean reads, to one decimal), or None for a
    user without history: the cheapest profile a device can write, for prompts that carry the user's level."""
    if not user.history:
        return None
    return f"mean of the {min(len(user.history), RECENT_ITEMS)} latest ratings {recent_level(user):.1f}"


def asked_movie(user_id: str, query_id: str) -> str:
    """The movie a MovieLens question asks about: a validation question is "val-<movie>", a test query
    "<user>-<movie>" (client/history.py, client/data.py)."""
    return query_id.removeprefix("val-").removeprefix(f"{user_id}-")


def ceiling_predictions(user: User, mean: float, offsets: dict[str, float]) -> dict[str, list[float]]:
    """The population (mean + the movie's offset) and level + item (the user's recent mean + the movie's offset)
    answers to each of `user`'s questions; a movie nobody in the population rated gets offset 0."""
    level = recent_level(user)
    asked = [offsets.get(asked_movie(user.user_id, q.id), 0.0) for q in user.queries]
    return {"population": [rounded(mean + o) for o in asked], "level+item": [rounded(level + o) for o in asked]}


def ceiling_rows(tests: list[User], population: list[User], task_history: int) -> dict[str, float]:
    """MAE of population and level + item on the validation questions of `tests` (views from validation_view)."""
    mean, offsets = item_offsets(population, task_history)
    population_errors, level_errors, covered = [], [], 0
    for user in tests:
        answers = ceiling_predictions(user, mean, offsets)
        for i, query in enumerate(user.queries):
            covered += asked_movie(user.user_id, query.id) in offsets
            gold = float(query.gold)
            population_errors.append(abs(answers["population"][i] - gold))
            level_errors.append(abs(answers["level+item"][i] - gold))
    return {"population": stats.fmean(population_errors), "level+item": stats.fmean(level_errors),
            "covered": covered / len(level_errors)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.item_knowledge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=20, help="test users: the longest histories")
    parser.add_argument("--train-clients", default="20,40,100,200,0",
                        help="comma-separated training-user counts (0: every user outside the test set)")
    parser.add_argument("--task-history", type=int, default=0,
                        help="latest items per training user that count (0: all; a run's default is 16)")
    parser.add_argument("--validation-items", type=int, default=5, help="validation questions per test user")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.train_clients.split(",") if c.strip()]
    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(test=args.num_clients, train=0), RunConfig())
    views = [validation_view(user, task, args.validation_items) for user in tests]
    test_ids = {user.user_id for user in tests}
    outside = [user for user in users if user.user_id not in test_ids]
    recent = stats.fmean(abs(float(answer) - float(query.gold)) for view in views  # the report's own row
                         for answer, query in zip(reference_predictions(task, view)[RECENT_MEAN], view.queries))
    rows: dict[str, dict[str, float]] = {}
    for count in counts:
        population = outside if count == 0 else split_users(users, UserCounts(args.num_clients, count), RunConfig())[1]
        history = 0 if count == 0 else args.task_history
        rows["all outside" if count == 0 else str(count)] = ceiling_rows(views, population, history)
    lines = [f"{len(views)} test users, {sum(len(v.queries) for v in views)} validation questions; "
             f"ref-recent-mean MAE {recent:.3f}; training users' items: "
             f"{'all' if not args.task_history else f'the {args.task_history} latest'}",
             "| training users | population MAE | level + item MAE | level + item vs ref-recent-mean | "
             "questions whose movie they rated |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['population']:.3f} | {r['level+item']:.3f} | {r['level+item'] - recent:+.3f} | "
              f"{r['covered']:.0%} |" for name, r in rows.items()]
    return finish(args, {"command": argv, "ref-recent-mean": recent, "rows": rows}, lines)


if __name__ == "__main__":
    main()
