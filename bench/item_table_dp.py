"""The price of user-level DP on the item table (`--item-dp-epsilon`): the no-LLM rows a run reads from the table.

    python -m bench.item_table_dp                                   # the default run's 100 test users, validation
    python -m bench.item_table_dp --epsilons 2,5,10 --clips 2,3,5 --repeats 4

No LLM, no Flower: every training user outside the test users (as a run's item-table round) sends what its node
would (client/item_statistics.py `sent_vector`: its table clipped, ratings centred, with its share of the noise);
the vectors are summed as SecAgg+ would, the server's `ItemTable.from_vector` keeps the buckets above the noise,
and each test user's validation questions are read as a run reads them (`others_table`, `query_readings`,
`reference_predictions`). Printed per epsilon and clip: ref-population and ref-level-item (mean and spread over
`--repeats` noise draws) beside the exact table and ref-recent-mean, the rows every report carries. If
ref-level-item does not beat ref-recent-mean at an epsilon, the table brings no item knowledge there.
"""

from __future__ import annotations

import argparse
import statistics as stats
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import finish
from client.data import User, load_movielens
from client.history import validation_view
from client.item_statistics import others_table, query_readings, sent_vector
from client.partition import split_users
from client.references import LEVEL_ITEM, POPULATION, RECENT_MEAN, reference_predictions
from common.config import RunConfig, UserCounts
from common.item_table import ItemTable
from common.tasks import get_task


def summed_table(training: list[User], cfg: RunConfig) -> ItemTable:
    """The table a run's item-table round gives the server under `cfg` (every node answers)."""
    vectors = [sent_vector(user, cfg, len(training)) for user in training]
    total = [np.sum(parts, axis=0) for parts in zip(*vectors)]
    return ItemTable.from_vector(total, noise_std=cfg.item_noise_std())


def row_errors(views: list[User], table: ItemTable) -> dict[str, float]:
    """MAE of the reference rows a report shows, on the test users' validation questions, read from `table`."""
    task = get_task("MovieLens")
    errors: dict[str, list[float]] = {RECENT_MEAN: [], POPULATION: [], LEVEL_ITEM: []}
    for view in views:
        readings = query_readings(view, task, others_table(view, "test", task, table))
        rows = reference_predictions(task, view, readings=readings)
        for name, answers in errors.items():
            answers += [abs(float(a) - float(q.gold)) for a, q in zip(rows[name], view.queries)]
    return {name: stats.fmean(values) for name, values in errors.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.item_table_dp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=100, help="test users: the longest histories")
    parser.add_argument("--epsilons", default="1,2,5,10,20", help="comma-separated --item-dp-epsilon values")
    parser.add_argument("--clips", default="3", help="comma-separated --item-dp-clip values")
    parser.add_argument("--delta", type=float, default=RunConfig.dp_delta, help="--dp-delta")
    parser.add_argument("--repeats", type=int, default=3, help="noise draws per setting")
    parser.add_argument("--validation-items", type=int, default=5, help="validation questions per test user")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    task = get_task("MovieLens")
    tests, training = split_users(load_movielens(), UserCounts(test=args.num_clients, train=None), RunConfig())
    views = [validation_view(user, task, args.validation_items) for user in tests]
    exact = row_errors(views, summed_table(training, RunConfig()))
    rows: list[dict[str, Any]] = []
    for clip in (float(c) for c in args.clips.split(",")):
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            cfg = RunConfig(item_dp_epsilon=epsilon, item_dp_clip=clip, dp_delta=args.delta)
            draws = [row_errors(views, summed_table(training, cfg)) for _ in range(args.repeats)]
            rows.append({"epsilon": epsilon, "clip": clip, "noise_std": cfg.item_noise_std(),
                         **{name: [d[name] for d in draws] for name in (POPULATION, LEVEL_ITEM)}})
    lines = [f"{len(views)} test users, {sum(len(v.queries) for v in views)} validation questions, {len(training)} "
             f"training users' tables; {args.repeats} noise draws per row (mean, min-max); delta {args.delta:g}",
             f"exact table: {POPULATION} {exact[POPULATION]:.3f}, {LEVEL_ITEM} {exact[LEVEL_ITEM]:.3f}; "
             f"{RECENT_MEAN} {exact[RECENT_MEAN]:.3f}",
             f"| epsilon | clip | noise std | {POPULATION} | {LEVEL_ITEM} | {LEVEL_ITEM} vs {RECENT_MEAN} |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        population, level_item = row[POPULATION], row[LEVEL_ITEM]
        lines.append(f"| {row['epsilon']:g} | {row['clip']:g} | {row['noise_std']:.2f} | "
                     f"{stats.fmean(population):.3f} ({min(population):.3f}-{max(population):.3f}) | "
                     f"{stats.fmean(level_item):.3f} ({min(level_item):.3f}-{max(level_item):.3f}) | "
                     f"{stats.fmean(level_item) - exact[RECENT_MEAN]:+.3f} |")
    return finish(args, {"command": argv, "exact": exact, "rows": rows}, lines)


if __name__ == "__main__":
    main()
