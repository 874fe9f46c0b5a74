"""Users of a dataset -> Flower nodes: test users (longest histories) and training users, one per node.

Each node gets a node-local store holding only its own user's data:
    <run_dir>/clients/<user>/data.json   (OPPU per-user format + the node's role)
    <run_dir>/nodes.json                 partition-id -> user and role (what a simulated node looks up)
    <run_dir>/audit/canaries.json        user -> canary planted in its history (for the privacy audit)
"""

from __future__ import annotations

import dataclasses
import random
import re
import secrets
from functools import cache
from pathlib import Path
from typing import Any

from client.config import RunConfig
from client.data import User, load_lamp, load_movielens, load_oppu, synthetic_users
from client.store import UserStore, atomic_write_json
from client.tasks import get_task


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


def write_partitions(
    run_dir: Path, test: list[User], train: list[User], canaries: dict[str, str]
) -> list[dict[str, str]]:
    """Write each node's store, nodes.json and audit/canaries.json (the planted canaries, {} if none: the audit
    takes a missing file for a deleted one); returns the node table (index = partition-id)."""
    atomic_write_json(run_dir / "audit" / "canaries.json", canaries)
    nodes = []
    for role, users in (("test", test), ("train", train)):
        for user in users:
            atomic_write_json(UserStore(run_dir, user.user_id).data, {**user.to_json(), "role": role})
            nodes.append({"user": user.user_id, "role": role})
    atomic_write_json(run_dir / "nodes.json", nodes)
    return nodes


CANARY = re.compile(r"canary[0-9a-f]{16}")  # what plant_canaries appends; the audit finds it in node stores


def plant_canaries(users: list[User]) -> dict[str, str]:
    """Append a unique random marker to each user's latest history item (first field), for the privacy audit.

    The latest item is inside every training window, so the canary reaches prompts, profiles and adapters;
    the audit then proves it never reaches a message.
    """
    canaries = {}
    for user in users:
        canary = f"canary{secrets.token_hex(8)}"
        field = get_task(user.task).item_fields[0]
        latest = user.history[-1]
        user.history[-1] = dataclasses.replace(latest, fields={**latest.fields, field: f"{latest.fields[field]} {canary}"})
        canaries[user.user_id] = canary
    return canaries


RUN_KEYS = ("num-clients", "train-clients", "run-dir")  # run settings in a `flwr run` config beside RunConfig's


def split_run_config(record: dict[str, Any]) -> tuple[RunConfig, int, int, Path]:
    """A `flwr run` config -> (RunConfig, test users, training users, run directory)."""
    record = dict(record)
    num_test, num_train = int(record.pop("num-clients", 100)), int(record.pop("train-clients", 20))
    run_dir = Path(str(record.pop("run-dir", "runs/flwr-run"))).resolve()
    return RunConfig.from_record(record), num_test, num_train, run_dir


@cache
def own_partition(run_config: tuple[tuple[str, Any], ...], partition_id: int) -> Path:
    """Under `flwr run`: compute the same split every node computes and write only this node's store."""
    cfg, num_test, num_train, run_dir = split_run_config(dict(run_config))
    test, train = split_users(load_users(cfg, num_test + num_train), num_test, num_train if cfg.rounds else 0, cfg.seed)
    role, user = ("test", test[partition_id]) if partition_id < len(test) else ("train", train[partition_id - len(test)])
    store = UserStore(run_dir, user.user_id)
    atomic_write_json(store.data, {**user.to_json(), "role": role})
    return store.root
