"""The FedAvg gap of the shared task adapter: the same ratings trained pooled (central) and federated (FedAvg).

    python -m bench.task_fedavg --threads 2 --asked-movies 80 --raters 60 --rounds 6 --out fedavg.json
    python -m bench.task_fedavg --asked-movies 80 --raters 60 --rounds 6 --local-epochs 2 --fraction-train 0.5

bench.task_ceiling shows a task LoRA learns the movies from pooled 20-example steps and nothing from a run's
2-example steps. A run's task adaptation is federated: each training user takes a few small steps on their own
ratings, and FedAvg averages the users' LoRAs, so each round is one large averaged move. This measures how far that
gets on the same data: the `--raters` outside users who rated most of the `--asked-movies` movies the validation
questions ask about most, each of their ratings of those movies the example a run builds for it. *central* trains
one LoRA on all of them pooled (`--central-batch-tokens`, one epoch between evaluations); *federated* gives each
rater a client: every round a seeded `--fraction-train` of them trains the global LoRA locally with a run's own code
(client.training.train_adapter: `--local-epochs` at `--batch-tokens`, a fresh optimiser each round, as
task_adaptation_step does) and Flower's aggregation averages them, weighted by examples as the server's strategy:
FedAvg, or with `--server-lr` / `--server-momentum` Flower's FedAvgM, which scales the averaged update (many
averaged small steps are one large, low-noise step, which a server learning rate may take further). Both start from the run's seeded initial task LoRA and are scored after every
epoch / round on the questions about those movies as bench.task_ceiling scores them (base MAE, spread and gold
correlation of the expected rating, level + LLM offset with its paired CI against ref-recent-mean), so the two
curves sit side by side over the tokens they trained on. The JSON (--out) is rewritten after every point.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections import Counter
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from bench.common import finish, load_model, machine
from bench.item_knowledge import level_profile
from bench.task_ceiling import (
    about_movies,
    base_scores,
    check_counts,
    ci,
    fmt,
    most_asked,
    reference_rows,
    task_lora_flags,
)
from client.adapters import adapter_state, attach_fresh, derived_seed, load_adapter_state
from client.data import User, load_movielens
from client.history import validation_view
from client.partition import split_users
from client.references import RECENT_MEAN
from client.task_adapter import TASK_ADAPTER, remove_adapters, task_examples, task_lora
from client.training import Example, train_adapter
from common import protocol as p
from common.config import RunConfig, UserCounts
from common.store import atomic_write_json
from common.tasks import get_task


def heaviest_raters(users: list[User], movies: set[str], count: int) -> list[User]:
    """The `count` users with the most ratings of `movies` (ties: by user id)."""
    rated = {user.user_id: sum(item.id in movies for item in user.history) for user in users}
    return sorted(users, key=lambda user: (-rated[user.user_id], user.user_id))[:count]


def rater_examples(user: User, movies: set[str], tokenizer: Any, cfg: RunConfig,
                   level_prompt: bool = False) -> list[Example]:
    """One example per rating of `movies` by `user`: the example a run builds for that item (its history up to the
    rating, task_history=1; the retrieval depth drawn per rating). With `level_prompt` its prompt also carries the
    user's level before that rating as the profile (item_knowledge.level_profile)."""
    one = dataclasses.replace(cfg, task_history=1)
    task = get_task("MovieLens")
    return [e for i, item in enumerate(user.history) if item.id in movies
            for e in task_examples(dataclasses.replace(user, history=user.history[: i + 1], queries=[]), task,
                                   tokenizer, one, i,
                                   level_profile(dataclasses.replace(user, history=user.history[:i]))
                                   if level_prompt else None)]


def server_strategy(initial: dict[str, Any], server_lr: float, momentum: float) -> FedAvgM:
    """Flower's FedAvgM holding the global LoRA: plain FedAvg (the run's) at server lr 1 and momentum 0, else
    the averaged update scaled by the server's learning rate, with momentum (Hsu et al. 2019)."""
    strategy = FedAvgM(server_learning_rate=server_lr, server_momentum=momentum, weighted_by_key=p.NUM_EXAMPLES,
                       arrayrecord_key=p.ARRAYS)
    strategy.current_arrays = ArrayRecord(initial)  # what its configure_train records as the arrays it sends
    return strategy


def aggregate(strategy: FedAvgM, server_round: int, states: list[dict[str, Any]], weights: list[int]) -> dict[str, Any]:
    """The strategy's aggregation of the clients' LoRA states as replies weighted by their examples (as a run's)."""
    replies = [Message(RecordDict({p.ARRAYS: ArrayRecord(state), p.METRICS: MetricRecord({p.NUM_EXAMPLES: weight})}),
                       metadata=Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0,
                                         reply_to_message_id="", group_id=str(server_round), created_at=0.0, ttl=0.0,
                                         message_type=MessageType.TRAIN))
               for node, (state, weight) in enumerate(zip(states, weights), 1)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None  # every reply carries arrays
    return arrays.to_torch_state_dict()


def freeze_lora_a(model: Any) -> None:
    """Leave only the LoRA B matrices trainable (train_adapter optimises what requires grad)."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)


def tokens(examples: list[Example]) -> int:
    return sum(len(e.prompt) + len(e.answer) for e in examples)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """The flags, and the run settings they share with a run (checked by RunConfig, as a run checks them)."""
    parser = argparse.ArgumentParser(prog="bench.task_fedavg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asked-movies", type=int, default=80, help="the N movies the validation questions ask most")
    parser.add_argument("--raters", type=int, default=60, help="outside users who rated most of them: the clients")
    parser.add_argument("--rounds", type=int, default=6, help="FedAvg rounds, and central epochs")
    parser.add_argument("--score-every", type=int, default=1,
                        help="score the federated LoRA every N rounds (and after the last): many short rounds")
    parser.add_argument("--fraction-train", type=float, default=1.0, help="share of the raters sampled per round")
    parser.add_argument("--local-epochs", type=float, default=1.0, help="a client's epochs per round (--local-epochs)")
    parser.add_argument("--batch-tokens", type=int, default=128, help="a client's tokens per step (a run's default)")
    parser.add_argument("--server-lr", type=float, default=1.0,
                        help="server learning rate on the averaged update (Flower's FedAvgM; 1 with momentum 0: FedAvg)")
    parser.add_argument("--server-momentum", type=float, default=0.0, help="server momentum (FedAvgM)")
    parser.add_argument("--central-batch-tokens", type=int, default=1024, help="tokens per step of the pooled LoRA")
    parser.add_argument("--modes", default="central,federated", help="which curves: central, federated or both")
    parser.add_argument("--freeze-lora-a", action="store_true",
                        help="train only LoRA's B matrices, A kept at the seeded initial values (FFA-LoRA, Sun et al. "
                        "2024): every client shares A, so FedAvg of the Bs is exactly the average of the clients' "
                        "weight updates B·A, which averaging both factors is not")
    parser.add_argument("--level-prompt", action="store_true",
                        help="every prompt carries the user's recent level as a one-line profile (the mean of the 32 "
                        "ratings before it, what ref-recent-mean reads), in training and scoring: each client's data "
                        "is one user's ratings, so without it a client's local optimum is mostly that user's level; "
                        "with it, every client's optimum is the same function of the level and the movie")
    task_lora_flags(parser)
    args = parser.parse_args(argv)
    check_counts(parser, args, ("num_clients", "asked_movies", "raters", "rounds", "score_every", "batch_tokens",
                                "central_batch_tokens", "lora_r"))
    if not 0 < args.fraction_train <= 1:
        parser.error(f"--fraction-train {args.fraction_train}: expected a share in (0, 1]")
    try:  # the run's own checks of the settings it shares with a run
        cfg = RunConfig(lora_r=args.lora_r, lora_targets=args.lora_targets, task_lr=args.lr, dtype=args.dtype,
                        local_epochs=args.local_epochs,
                        server_lr=args.server_lr, server_momentum=args.server_momentum)
    except ValueError as problem:
        parser.error(str(problem))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"central", "federated"}:
        parser.error(f"--modes {args.modes!r}: expected central, federated or both, comma-separated")
    args.modes = modes
    return args, cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = parse(argv)
    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(test=args.num_clients, train=0), RunConfig())
    views = [validation_view(user, task, RunConfig().validation_items) for user in tests]
    test_ids = {user.user_id for user in tests}
    outside = [user for user in users if user.user_id not in test_ids]
    movies = set(most_asked(views, args.asked_movies))
    views = about_movies(views, movies)
    raters = heaviest_raters(outside, movies, args.raters)
    base, tokenizer = load_model(args, args.dtype)
    clients = {user.user_id: rater_examples(user, movies, tokenizer, cfg, args.level_prompt) for user in raters}
    pooled = [e for examples in clients.values() for e in examples]
    per_movie = Counter(item.id for user in raters for item in user.history if item.id in movies)
    results: dict[str, Any] = {
        "command": argv if argv is not None else sys.argv[1:], "settings": {**vars(args), "out": str(args.out)},
        "test_users": len(views), "questions": sum(len(v.queries) for v in views),
        "training": {"clients": len(clients), "examples": len(pooled), "tokens_per_epoch": tokens(pooled),
                     "ratings_per_movie": {"min": min(per_movie.values(), default=0),
                                           "median": sorted(per_movie.values())[len(per_movie) // 2] if per_movie else 0,
                                           "movies": len(per_movie)}},
        "references": reference_rows(task, views, outside, None, 0), "curves": {mode: [] for mode in args.modes},
    }
    print(f"{len(pooled)} examples ({results['training']['tokens_per_epoch']} tokens) from {len(clients)} raters of "
          f"{len(per_movie)} of the {len(movies)} movies; {results['questions']} validation questions of "
          f"{len(views)} test users", flush=True)
    about = machine()
    model = attach_fresh(base, task_lora(cfg), TASK_ADAPTER, derived_seed(cfg.seed, "task"))
    initial = adapter_state(model, TASK_ADAPTER)  # the run's seeded initial task LoRA
    if args.freeze_lora_a:
        freeze_lora_a(model)

    def point(mode: str, step: int, seen: int, seconds: float, loss: float | None) -> None:
        """Score the LoRA as it is now, print and keep the point, rewrite the JSON."""
        model.eval()
        found = {"round" if mode == "federated" else "epoch": step, "tokens": seen, "seconds": seconds,
                 "loss": loss, **base_scores(model, tokenizer, task, views, cfg, args.level_prompt)}
        results["curves"][mode].append(found)
        print(f"{mode} {step}: {seen} tokens, {seconds:.0f} s, loss {fmt(loss)}, MAE {found['mae']:.3f} "
              f"({ci(found['mae_vs_recent_mean'])}), "
              f"sd {found['sd']:.3f}, corr {fmt(found['corr'])}, level + LLM offset {found['mae_level_offset']:.3f} "
              f"(vs {RECENT_MEAN} {ci(found['level_offset_vs_recent_mean'])})", flush=True)
        if args.out:
            atomic_write_json(args.out, {"machine": about, **results})

    try:
        if "central" in args.modes:
            load_adapter_state(model, TASK_ADAPTER, initial)
            point("central", 0, 0, 0.0, None)
            settings = dataclasses.replace(cfg.task_training(), epochs=float(args.rounds),
                                           max_batch_tokens=args.central_batch_tokens)
            count = {"examples": 0, "tokens": 0, "epoch": 0, "began": time.perf_counter(), "scoring": 0.0}
            losses: list[float] = []

            def after_step(batch: list[int], loss: float) -> None:
                """One optimiser for all epochs (as bench.task_ceiling); a point at each epoch's end."""
                count["examples"] += len(batch)
                count["tokens"] += tokens([pooled[i] for i in batch])
                losses.append(loss)
                if count["examples"] >= (count["epoch"] + 1) * len(pooled):
                    count["epoch"] += 1
                    scoring = time.perf_counter()
                    point("central", count["epoch"], count["tokens"],
                          scoring - count["began"] - count["scoring"], sum(losses) / len(losses))
                    model.train()
                    losses.clear()
                    count["scoring"] += time.perf_counter() - scoring

            train_adapter(model, pooled, tokenizer.pad_token_id, settings, seed=derived_seed(cfg.seed, "central"),
                          desc="central task adapter", after_step=after_step)
        if "federated" in args.modes:
            state = initial
            strategy = server_strategy(initial, cfg.server_lr, cfg.server_momentum)
            load_adapter_state(model, TASK_ADAPTER, state)
            point("federated", 0, 0, 0.0, None)
            local = dataclasses.replace(cfg.task_training(), max_batch_tokens=args.batch_tokens)
            names = sorted(clients)
            sample = max(1, round(len(names) * args.fraction_train))
            seen, seconds, round_losses = 0, 0.0, []
            for server_round in range(1, args.rounds + 1):
                chosen = sorted(random.Random(derived_seed(cfg.seed, "fedavg", server_round)).sample(names, sample))
                states, weights, losses = [], [], []
                for name in chosen:
                    load_adapter_state(model, TASK_ADAPTER, state)
                    found = train_adapter(model, clients[name], tokenizer.pad_token_id, local,
                                          seed=derived_seed(cfg.seed, name, server_round), desc=f"client {name}")
                    states.append(adapter_state(model, TASK_ADAPTER))
                    weights.append(len(clients[name]))
                    losses.append(found["loss"])
                    seen += int(found["tokens"])
                    seconds += found["seconds"]
                state = aggregate(strategy, server_round, states, weights)
                load_adapter_state(model, TASK_ADAPTER, state)
                round_losses.append(sum(losses) / len(losses))
                if server_round % args.score_every == 0 or server_round == args.rounds:
                    point("federated", server_round, seen, seconds, sum(round_losses) / len(round_losses))
                    round_losses.clear()
    finally:
        model.eval()
        remove_adapters(model)  # the shared base goes back as load_base made it
    return finish(args, results, table(results))


def table(results: dict[str, Any]) -> list[str]:
    """Both curves as one markdown table, then the no-LLM rows on the same questions."""
    refs = results["references"]
    lines = [f"| curve | epoch / round | tokens | seconds | train loss | MAE | its difference to {RECENT_MEAN} | sd | "
             f"corr | level + LLM offset | its difference to {RECENT_MEAN} |", "|---" * 11 + "|"]
    for mode, curve in results["curves"].items():
        lines += [f"| {mode} | {p.get('epoch', p.get('round'))} | {p['tokens']} | {p['seconds']:.0f} | "
                  f"{fmt(p['loss'])} | {p['mae']:.3f} | {ci(p['mae_vs_recent_mean'])} | {p['sd']:.3f} | "
                  f"{fmt(p['corr'])} | "
                  f"{p['mae_level_offset']:.3f} | {ci(p['level_offset_vs_recent_mean'])} |" for p in curve]
    lines += ["", "| no-LLM row (same questions) | MAE |", "|---|---|", f"| {RECENT_MEAN} | {refs[RECENT_MEAN]:.3f} |"]
    lines += [f"| {row} (all outside) | {refs['all outside'][row]:.3f} |" for row in ("population", "level+item")]
    return lines


if __name__ == "__main__":
    main()
