"""Which user a node holds: the dataset's users split into test and training users, and the node's own store.

A node finds its data through its node config only: `user-dir` (a SuperNode started by oppu-deploy or by hand),
else `partition-id`, looked up in the run directory's partition table (`nodes.json`, written by flower-simulation);
under `flwr run`, where no table exists, the node computes the same split every node computes and writes only its
own store. The run directory is the run config's `run-dir`.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Any

from client.data import User, load_lamp, load_movielens, load_oppu, synthetic_users
from common.config import RunConfig, split_run_config
from common.store import UserStore, atomic_write_json


def load_users(cfg: RunConfig, num_users_hint: int) -> list[User]:
    """The users named by `cfg.data` (see RunConfig.data), checked within the run's data limits."""
    limits = cfg.data_limits()
    if cfg.data == "default":
        if cfg.task != "MovieLens":
            raise ValueError(f"--data default is MovieLens-100K (task MovieLens); for {cfg.task} give --data files")
        return load_movielens(num_queries=cfg.num_queries, limits=limits)
    if cfg.data == "synthetic":
        if cfg.task != "LaMP-2M":
            raise ValueError("--data synthetic makes movie-tagging users: use it with --task LaMP-2M")
        return synthetic_users(num_users_hint, seed=cfg.seed, limits=limits)
    if ":" in cfg.data:
        questions, outputs = cfg.data.split(":", 1)
        return load_lamp(questions, outputs, cfg.task, limits)
    return load_oppu(cfg.data, cfg.task, limits)


def split_users(users: list[User], num_test: int, num_train: int, seed: int) -> tuple[list[User], list[User]]:
    """Test users = the `num_test` longest histories (as in the paper); training users = a seeded sample of the rest."""
    if num_test < 1:
        raise ValueError(f"--num-clients must be >= 1, got {num_test}")
    if num_test > len(users):
        raise ValueError(f"--num-clients {num_test} exceeds the {len(users)} users in the data")
    ranked = sorted(users, key=lambda u: (-len(u.history), u.user_id))
    test, rest = ranked[:num_test], ranked[num_test:]
    train = random.Random(seed).sample(rest, min(num_train, len(rest)))
    return test, train


@cache
def own_partition(run_config: tuple[tuple[str, Any], ...], partition_id: int) -> Path:
    """Under `flwr run`: compute the same split every node computes and write only this node's store."""
    cfg, num_test, num_train, run_dir = split_run_config(dict(run_config))
    test, train = split_users(load_users(cfg, num_test + num_train), num_test, num_train if cfg.rounds else 0, cfg.seed)
    role, user = ("test", test[partition_id]) if partition_id < len(test) else ("train", train[partition_id - len(test)])
    store = UserStore(run_dir, user.user_id)
    atomic_write_json(store.data, {**user.to_json(), "role": role})
    return store.root
