"""The central upper bound of the shared task adapter: the task LoRA trained on every non-test user's ratings at once.

    python -m bench.task_ceiling --num-clients 20 --users 40 --items-per-user 8 --eval-every 20 --max-steps 40
    python -m bench.task_ceiling --device cuda --batch-tokens 4096 --eval-every 50 --out task_ceiling.json

A run's task adapter sees a few hundred ratings (20 training users x 16 items); this trains the same LoRA, with the
run's own example construction (client.task_adapter.task_examples), forward, loss and optimiser
(client.training.train_adapter), outside Flower on the histories of every user outside the default run's test set
(`--users` samples fewer, `--items-per-user` keeps each one's latest items; `--asked-movies N --per-movie R` trains
instead on R outside ratings of each of the N movies the validation questions ask most about, and scores only the
questions about them: the density of ratings per movie a full run would give, at a fraction of its tokens). Every `--eval-every` optimiser steps it
scores `base` (k=0 prompts, median rule, as a run's `base` row; the LoRA unmerged, which is the same function as the
merged task-adapted base) on the validation questions of the test users, and prints MAE, the spread of the expected
rating across questions, its Pearson correlation with the gold and its MAE rounded, and *level + LLM offset*: the user's recent
mean plus how far the model's expected rating for the question sits from its average over all questions (what a
personal adapter that adds the user's level to this base could reach), beside the no-LLM rows on the same questions:
ref-recent-mean, and population / level+item from bench.item_knowledge. If even this curve stays above
*population*, no amount of federated task adaptation of this model makes the base know the movies.
`--item-statistics` trains and scores as a run with that flag does: the training users' item table (summed as the
run's SecAgg+ round sums it) annotates every question, a training user's with its own ratings left out, and the
table's own rows (ref-population, ref-level-item) join the no-LLM rows; then the curve says how fast the task LoRA
learns to read the table, which is what the run's `base` must do.
The JSON (--out) is rewritten after every evaluation, so a killed run keeps its curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics as stats
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import common_flags, expected_spread, finish, load_model, machine
from bench.item_knowledge import asked_movie, ceiling_rows, level_profile, recent_level, rounded
from client.adapters import adapter_state, attach_fresh, derived_seed
from client.data import User, load_movielens
from client.evaluate import predict, query_prompts
from client.history import validation_view
from client.item_statistics import annotate, contribution, others_table, query_readings
from client.personalize import personalize_user
from client.partition import split_users
from client.references import LEVEL_ITEM, POPULATION, RECENT_MEAN, reference_predictions
from client.task_adapter import TASK_ADAPTER, merge_task_state, remove_adapters, task_examples, task_lora
from client.training import Example, train_adapter
from common.bootstrap import paired_difference
from common.config import RunConfig, UserCounts
from common.item_table import ItemTable
from common.metrics import Statistics, combine, expected_rating, finalize, statistics
from common.store import UserStore, atomic_write_json
from common.tasks import TaskSpec, get_task


@dataclasses.dataclass
class Progress:
    """What training has seen so far, and the time spent evaluating (not counted as training time)."""

    steps: int = 0
    examples: int = 0
    tokens: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    eval_seconds: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


def base_scores(model: Any, tokenizer: Any, task: TaskSpec, views: list[User], cfg: RunConfig,
                level_prompt: bool = False) -> dict[str, Any]:
    """MAE of `base` on the views' questions with its paired CI against ref-recent-mean, the spread and gold
    correlation of its expected rating, and the MAE of level + LLM offset (the user's recent mean + the expected
    rating's deviation from its mean, rounded). With `level_prompt` each prompt carries the user's level as its
    profile (item_knowledge.level_profile)."""
    settings = cfg.prompt_settings(0, use_profile=level_prompt)
    prompts = [p for view in views
               for p in query_prompts(view, task, tokenizer, settings, level_profile(view) if level_prompt else None)]
    golds = [float(q.gold) for view in views for q in view.queries]
    levels = [recent_level(view) for view in views for _ in view.queries]
    predictions, probabilities = predict(model, tokenizer, task, prompts, rule="median")
    assert probabilities is not None  # a rating task is scored over its labels
    expected = [expected_rating(task.labels, row) for row in probabilities]
    spread = expected_spread(expected, golds)
    combined = level_plus_offset(levels, expected)
    return {"mae": stats.fmean(abs(float(a) - g) for a, g in zip(predictions, golds)),
            "mae_rounded_mean": stats.fmean(abs(rounded(e) - g) for e, g in zip(expected, golds)),
            "mae_vs_recent_mean": vs_recent_mean(task, views, predictions), "sd": spread["sd"],
            "corr": spread["corr"],
            "mae_level_offset": stats.fmean(abs(a - g) for a, g in zip(combined, golds)),
            "level_offset_vs_recent_mean": vs_recent_mean(task, views, [f"{a:.0f}" for a in combined])}


def vs_recent_mean(task: TaskSpec, views: list[User], answers: list[str]) -> list[float]:
    """[difference, low, high]: the answers' MAE minus ref-recent-mean's on the same questions, with the paired
    per-user bootstrap 95% CI every report uses (common/bootstrap.py)."""
    per_user, start = [], 0
    for view in views:
        golds = [str(q.gold) for q in view.queries]
        mine = answers[start: start + len(golds)]
        start += len(golds)
        per_user.append({"answers": statistics(task, mine, golds),
                         RECENT_MEAN: statistics(task, reference_predictions(task, view)[RECENT_MEAN], golds)})
    found = paired_difference(task, per_user, "answers", RECENT_MEAN)
    return [found.difference, found.low, found.high]


def level_plus_offset(levels: list[float], expected: list[float]) -> list[float]:
    """Each question's answer from the user's level and the model's item signal: the level plus how far the
    model's expected rating for it sits from its mean over all questions, rounded to a rating."""
    center = stats.fmean(expected)
    return [rounded(level + e - center) for level, e in zip(levels, expected)]


def personal_rows(base: Any, tokenizer: Any, task: TaskSpec, views: list[User], cfg: RunConfig,
                  task_state: dict[str, Any]) -> dict[str, Any]:
    """`base` and `oppu` as a run scores them on these questions: the task LoRA merged into a copy of the base, and
    on it each user's personal adapter trained by the run's own code (client.personalize.personalize_user, the
    run's personal defaults) on the history before the questions; MAE of each row and the paired difference of
    `base` and `oppu` to ref-recent-mean. The adapters go to a temporary store that is deleted afterwards."""
    personal = RunConfig(methods="base,oppu", lora_r=cfg.lora_r, lora_targets=cfg.lora_targets, dtype=cfg.dtype)
    merged = merge_task_state(base, cfg, task_state)
    per_user: list[dict[str, Statistics]] = []
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="task-ceiling-") as scratch:
        for i, view in enumerate(views, 1):
            found, timings = personalize_user(personal, view, UserStore(Path(scratch), view.user_id), merged, base,
                                              tokenizer, model_hash="")
            per_user.append(found)
            seconds.append(sum(timings.values()))
            print(f"personalized {i}/{len(views)} users ({stats.fmean(seconds):.1f} s each)", end="\r", flush=True)
    print(flush=True)
    rows: dict[str, Any] = {name: {"mae": finalize(task, combine(u[name] for u in per_user))["mae"]}
                            for name in per_user[0]}
    for name in ("base", "oppu"):
        found = paired_difference(task, per_user, name, RECENT_MEAN)
        rows[name]["vs_recent_mean"] = [found.difference, found.low, found.high]
    return {"rows": rows, "seconds_per_user": stats.fmean(seconds)}


def most_asked(views: list[User], count: int) -> list[str]:
    """The `count` movies the views' questions ask about most often (ties: by movie id)."""
    asked = Counter(asked_movie(view.user_id, q.id) for view in views for q in view.queries)
    return sorted(asked, key=lambda movie: (-asked[movie], movie))[:count]


def about_movies(views: list[User], movies: set[str]) -> list[User]:
    """The views with only their questions about `movies` (views left without a question are dropped)."""
    kept = [dataclasses.replace(view, queries=[q for q in view.queries if asked_movie(view.user_id, q.id) in movies])
            for view in views]
    return [view for view in kept if view.queries]


def movie_ratings(users: list[User], movies: list[str], per_movie: int, seed: int) -> list[User]:
    """Up to `per_movie` ratings of each movie by `users` (a seeded sample), each as the rater's history up to and
    including that rating, so task_examples with task_history=1 builds exactly the run's example for it."""
    raters: dict[str, list[tuple[User, int]]] = {movie: [] for movie in movies}
    for user in users:
        for i, item in enumerate(user.history):
            if item.id in raters:
                raters[item.id].append((user, i))
    picked = []
    for movie in movies:
        rng = random.Random(derived_seed(seed, "ceiling-movie", movie))
        for user, i in rng.sample(raters[movie], min(per_movie, len(raters[movie]))):
            picked.append(dataclasses.replace(user, history=user.history[: i + 1], queries=[]))
    random.Random(derived_seed(seed, "ceiling-order")).shuffle(picked)
    return picked


def reference_rows(task: TaskSpec, views: list[User], outside: list[User], training: list[User] | None,
                   items: int) -> dict[str, Any]:
    """The no-LLM rows on the same questions: the user's recent mean, and the item-knowledge ceilings learned from
    every outside user's full history and from exactly the training data (none for a movie slice, whose raters'
    levels it does not hold)."""
    recent = stats.fmean(abs(float(answer) - float(query.gold)) for view in views
                         for answer, query in zip(reference_predictions(task, view)[RECENT_MEAN], view.queries))
    return {RECENT_MEAN: recent, "all outside": ceiling_rows(views, outside, 0),
            "training data": ceiling_rows(views, training, items) if training is not None else None}


def population_table(task: TaskSpec, users: list[User]) -> ItemTable:
    """The item table a run's SecAgg+ round sums from these (training) users' nodes."""
    table = ItemTable.empty()
    for user in users:
        table = table.plus(contribution(user, task))
    return table


def table_rows(task: TaskSpec, views: list[User], table: ItemTable) -> dict[str, float]:
    """MAE of the table's two reference rows (as a run reports them) on the views' questions."""
    errors: dict[str, list[float]] = {POPULATION: [], LEVEL_ITEM: []}
    for view in views:
        rows = reference_predictions(task, view, readings=query_readings(view, task, table))
        for name, found in errors.items():
            found += [abs(float(a) - float(q.gold)) for a, q in zip(rows[name], view.queries)]
    return {name: stats.fmean(found) for name, found in errors.items()}


def task_lora_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every task-adapter bench takes: the test users, the task LoRA's shape and rate, the dtype."""
    parser.add_argument("--num-clients", type=int, default=100, help="test users: the longest histories")
    parser.add_argument("--lora-r", type=int, default=8, help="rank of the task LoRA")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="modules that get the LoRA")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (a run's --task-lr)")
    parser.add_argument("--dtype", default="auto", help="auto (as a run picks it), float32 or bfloat16")
    common_flags(parser)


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...],
                 non_negative: tuple[str, ...] = ()) -> None:
    """Each count checked once, with the flag's name in the error (exit 2)."""
    for flag in positive:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in non_negative:
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags; each count is checked once here."""
    parser = argparse.ArgumentParser(prog="bench.task_ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items-per-user", type=int, default=0, help="latest history items per training user (0: all)")
    parser.add_argument("--users", type=int, default=0, help="training users, sampled from the rest (0: all of them)")
    parser.add_argument("--asked-movies", type=int, default=0,
                        help="train on --per-movie ratings of each of the N most asked movies, score their questions")
    parser.add_argument("--per-movie", type=int, default=25, help="outside ratings per movie with --asked-movies")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training examples")
    parser.add_argument("--batch-tokens", type=int, default=RunConfig().task_batch_tokens,
                        help="tokens per optimiser step (a run's --task-batch-tokens)")
    parser.add_argument("--eval-every", type=int, default=100, help="optimiser steps between evaluations")
    parser.add_argument("--eval-users", type=int, default=0, help="test users evaluated (0: all)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0: no cap)")
    parser.add_argument("--item-statistics", action="store_true",
                        help="annotate every question from the training users' item table, as a run with "
                             "--item-statistics does, and report the table's reference rows")
    parser.add_argument("--personalize", action="store_true",
                        help="then give each evaluated user a personal adapter on the trained base, as a run does, "
                             "and score oppu beside base and ref-recent-mean on the same questions")
    task_lora_flags(parser)
    args = parser.parse_args(argv)
    if args.asked_movies and args.items_per_user:
        parser.error("--asked-movies picks the training ratings itself: leave --items-per-user at 0")
    check_counts(parser, args, ("num_clients", "lora_r", "batch_tokens", "eval_every", "per_movie"),
                 ("items_per_user", "users", "eval_users", "max_steps", "asked_movies"))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cfg = RunConfig(task_history=args.items_per_user, lora_r=args.lora_r, lora_targets=args.lora_targets,
                    task_lr=args.lr, local_epochs=args.epochs, task_batch_tokens=args.batch_tokens, dtype=args.dtype)
    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(test=args.num_clients, train=0), RunConfig())
    views = [validation_view(user, task, RunConfig().validation_items) for user in tests[: args.eval_users or None]]
    test_ids = {user.user_id for user in tests}
    outside = [user for user in users if user.user_id not in test_ids]
    # every outside user, or (--users N) a seeded sample of them as a run draws its training users
    training = split_users(users, UserCounts(len(tests), args.users), RunConfig())[1] if args.users else outside
    table_references = None
    if args.item_statistics:  # as a run: the training users' sum; a training user reads it without its own ratings
        summed = population_table(task, training)
        table_references = table_rows(task, views, summed)
        views = [annotate(view, task, summed) for view in views]
        training = [annotate(user, task, others_table(user, "train", task, summed)) for user in training]
    raters: list[User] | None = None
    if args.asked_movies:  # R ratings of each most asked movie, each one example; only those movies' questions
        movies = most_asked(views, args.asked_movies)
        views = about_movies(views, set(movies))
        raters = movie_ratings(training, movies, args.per_movie, cfg.seed)
    base, tokenizer = load_model(args, args.dtype)
    start = time.perf_counter()
    if raters is None:
        examples: list[Example] = [e for user in training for e in task_examples(user, task, tokenizer, cfg, 1)]
    else:
        one = dataclasses.replace(cfg, task_history=1)
        examples = [e for user in raters for e in task_examples(user, task, tokenizer, one, 1)]
    build_seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "command": argv if argv is not None else sys.argv[1:], "settings": {**vars(args), "out": str(args.out)},
        "test_users": len(views), "questions": sum(len(v.queries) for v in views),
        "training": {"users": len({u.user_id for u in raters}) if raters is not None else len(training),
                     "examples": len(examples),
                     "tokens_per_epoch": sum(len(e.prompt) + len(e.answer) for e in examples),
                     "build_seconds": build_seconds},
        "references": reference_rows(task, views, outside, None if raters is not None else training,
                                     args.items_per_user),
        "item_table": table_references, "curve": [],
    }
    print(f"{len(examples)} examples from {len(training)} training users ({results['training']['tokens_per_epoch']} "
          f"tokens an epoch) built in {build_seconds:.1f} s; {results['questions']} validation questions of "
          f"{len(views)} test users", flush=True)
    about = machine()
    model = attach_fresh(base, task_lora(cfg), TASK_ADAPTER, derived_seed(cfg.seed, "task"))
    seen = Progress()

    def evaluate() -> None:
        """One point of the curve: score, print, and rewrite the partial JSON."""
        began = time.perf_counter()
        model.eval()
        point = {"step": seen.steps, "examples": seen.examples, "tokens": seen.tokens,
                 "seconds": began - seen.start - seen.eval_seconds,
                 "loss": stats.fmean(seen.losses) if seen.losses else None,
                 **base_scores(model, tokenizer, task, views, cfg)}
        model.train()
        seen.losses = []
        seen.eval_seconds += time.perf_counter() - began
        results["curve"].append(point)
        print(f"step {point['step']}: {point['examples']} examples, {point['tokens']} tokens, {point['seconds']:.1f} s "
              f"({point['tokens'] / max(point['seconds'], 1e-9):.0f} tokens/s), loss {fmt(point['loss'])}, "
              f"MAE {point['mae']:.3f} (rounded mean {point['mae_rounded_mean']:.3f}), sd {point['sd']:.3f}, "
              f"corr {fmt(point['corr'])}, "
              f"level + LLM offset {point['mae_level_offset']:.3f} "
              f"(vs {RECENT_MEAN} {ci(point['level_offset_vs_recent_mean'])})", flush=True)
        if args.out:
            atomic_write_json(args.out, {"machine": about, **results})

    def after_step(batch: list[int], loss: float) -> None:
        """Count what the step saw; evaluate every --eval-every steps."""
        seen.steps += 1
        seen.examples += len(batch)
        seen.tokens += sum(len(examples[i].prompt) + len(examples[i].answer) for i in batch)
        seen.losses.append(loss)
        if seen.steps % args.eval_every == 0:
            evaluate()

    settings = dataclasses.replace(cfg.task_training(), max_steps=args.max_steps or None)  # a run's, with a cap
    try:
        evaluate()
        train_adapter(model, examples, tokenizer.pad_token_id, settings, seed=derived_seed(cfg.seed, "central"),
                      desc="central task adapter", after_step=after_step)
        if seen.losses:  # steps since the last evaluation
            evaluate()
        trained = adapter_state(model, TASK_ADAPTER)
    finally:
        model.eval()  # the shared base goes back as load_base made it
        remove_adapters(model)
    last = results["curve"][-1]
    results["tokens_per_second"] = last["tokens"] / max(last["seconds"], 1e-9)
    if args.personalize:
        results["personal"] = personal_rows(base, tokenizer, task, views, cfg, trained)
        if args.out:
            atomic_write_json(args.out, {"machine": about, **results})
    return finish(args, results, table(results))


def fmt(value: float | None) -> str:
    """A figure, or n/a where there is none yet (no loss before step 1, no correlation of a constant)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def ci(found: list[float]) -> str:
    """A difference with its 95% CI: +0.012 [-0.030, +0.055]."""
    return f"{found[0]:+.3f} [{found[1]:+.3f}, {found[2]:+.3f}]"


def table(results: dict[str, Any]) -> list[str]:
    """The curve as markdown, then the no-LLM rows on the same questions."""
    refs = results["references"]
    lines = ["| step | examples | tokens | seconds | train loss | MAE | MAE, rounded mean | sd | corr | "
             f"level + LLM offset | its difference to {RECENT_MEAN} |", "|---" * 11 + "|"]
    lines += [f"| {p['step']} | {p['examples']} | {p['tokens']} | {p['seconds']:.1f} | {fmt(p['loss'])} | "
              f"{p['mae']:.3f} | {p['mae_rounded_mean']:.3f} | {p['sd']:.3f} | {fmt(p['corr'])} | "
              f"{p['mae_level_offset']:.3f} | "
              f"{ci(p['level_offset_vs_recent_mean'])} |" for p in results["curve"]]
    lines += ["", "| no-LLM row (same questions) | MAE |", "|---|---|", f"| {RECENT_MEAN} | {refs[RECENT_MEAN]:.3f} |"]
    lines += [f"| {row} ({source}) | {refs[source][row]:.3f} |" for source in ("all outside", "training data")
              if refs[source] is not None for row in ("population", "level+item")]
    if results["item_table"] is not None:
        lines += [f"| {row} (the training users' item table) | {mae:.3f} |" for row, mae in results["item_table"].items()]
    lines.append(f"tokens/s of training: {results['tokens_per_second']:.0f}")
    if "personal" in results:
        rows = results["personal"]["rows"]
        lines += ["", f"| as a run scores them (last point's base + personal adapters) | MAE | vs {RECENT_MEAN} |",
                  "|---|---|---|"]
        lines += [f"| {name} | {row['mae']:.3f} | {ci(row['vs_recent_mean']) if 'vs_recent_mean' in row else ''} |"
                  for name, row in rows.items()]
        lines.append(f"seconds per user: {results['personal']['seconds_per_user']:.1f}")
    return lines


if __name__ == "__main__":
    main()
