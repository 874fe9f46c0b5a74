"""Which user a node holds: the dataset's users split into test and training users, and the node's own store.

A node finds its data through its node config only: `user-dir` (and `audit-dir`), as a SuperNode is started
with them (oppu-deploy, or by hand). A simulated node has only `partition-id`; `node_config_mod` fills the two in
before any handler runs: from the partition table `nodes.json` that flower-simulation wrote into its run directory,
or, under `flwr run`, by computing the same split every node computes and writing only its own store.
"""

from __future__ import annotations

import json
import random
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.data import User, load_lamp, load_movielens, load_oppu, synthetic_users
from common.config import RunConfig, UserCounts, flwr_run_settings
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


def split_users(users: list[User], counts: UserCounts, cfg: RunConfig) -> tuple[list[User], list[User]]:
    """Test users = the `counts.test` longest histories (as in the paper); training users = a seeded sample of the
    rest (all of it by default, as in the paper)."""
    if counts.test > len(users):
        raise ValueError(f"--num-clients {counts.test} exceeds the {len(users)} users in the data")
    ranked = sorted(users, key=lambda u: (-len(u.history), u.user_id))
    test, rest = ranked[:counts.test], ranked[counts.test:]
    train = random.Random(cfg.seed).sample(rest, counts.training(cfg, len(rest)) or 0)
    if cfg.rounds and counts.train != 0 and not rest:  # (the server would find no training node, after starting all)
        raise ValueError(f"--rounds {cfg.rounds}: task adaptation needs training users, but --num-clients "
                         f"{counts.test} takes all {len(users)} users of the data as test users; lower --num-clients, "
                         "or skip task adaptation with --rounds 0")
    return test, train


@lru_cache(maxsize=1)
def _run_split(run_config: tuple[tuple[str, Any], ...]) -> tuple[list[User], list[User], Path]:
    """(test users, training users, run directory) of a `flwr run` config: read and split once per process, not
    once per node (a worker runs many nodes; MovieLens-100K takes 0.7 s to read, so 943 nodes had spent 11 minutes
    of one worker reading it before the first phase ended)."""
    cfg, counts, run_dir = flwr_run_settings(dict(run_config))
    return *split_users(load_users(cfg, counts.users_hint()), counts, cfg), run_dir


@cache
def own_partition(run_config: tuple[tuple[str, Any], ...], partition_id: int) -> tuple[Path, Path]:
    """Under `flwr run`: compute the same split every node computes and write only this node's store;
    (the store's directory, the run directory)."""
    test, train, run_dir = _run_split(run_config)
    if not 0 <= partition_id < len(test) + len(train):
        raise ValueError(f"partition-id {partition_id}: the run config names {len(test)} test and {len(train)} "
                         f"training users, one node each; start the federation with num-supernodes="
                         f"{len(test) + len(train)}")
    role, user = ("test", test[partition_id]) if partition_id < len(test) else ("train", train[partition_id - len(test)])
    store = UserStore(run_dir, user.user_id)
    atomic_write_json(store.data, {**user.to_json(), "role": role})
    # no canaries under `flwr run`; the privacy audit takes a missing list for a deleted one
    atomic_write_json(run_dir / "audit" / "canaries.json", {})
    return store.root, run_dir


@cache
def _partition_table(run_dir: Path) -> list[dict[str, str]]:
    return json.loads((run_dir / "nodes.json").read_text())


def node_config_mod(run_dir: Path | None = None) -> Mod:
    """A ClientApp mod that gives a node without `user-dir` in its node config the `user-dir` and `audit-dir` a
    SuperNode is started with, from its `partition-id`: looked up in the partition table (`nodes.json`) of the run
    directory (`run_dir`, else the run config's `run-dir`), or, where there is none (a plain `flwr run`), the node's
    own partition of the configured data."""

    def fill_node_config(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        node = context.node_config
        if "user-dir" not in node:
            if "partition-id" not in node:
                raise RuntimeError("node config has neither 'user-dir' nor 'partition-id': start the SuperNode "
                                   "with --node-config \"user-dir='<its user store>'\"")
            partition = int(node["partition-id"])
            root = run_dir or flwr_run_settings(context.run_config)[2]
            if (root / "nodes.json").exists():
                store = root / "clients" / _partition_table(root)[partition]["user"]
            else:
                store, root = own_partition(tuple(sorted(context.run_config.items())), partition)
            node["user-dir"] = str(store)
            node.setdefault("audit-dir", str(root / "audit"))
        return call_next(msg, context)

    return fill_node_config
