"""Users of a dataset -> Flower nodes: test users (longest histories) and training users, one per node.

Each node gets a node-local store holding only its own user's data:
    <run_dir>/clients/<user>/data.json   (OPPU per-user format + the node's role)
    <run_dir>/nodes.json                 partition-id -> user and role (what a simulated node looks up)
    <run_dir>/audit/canaries.json        user -> canary planted in its history (for the privacy audit)
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from pathlib import Path

from client.data import DataError, User
from client.partition import load_users, split_users
from common.config import RunConfig, UserCounts
from common.store import UserStore, atomic_write_json
from common.tasks import get_task
from simulation.errors import SetupError


def partition_users(cfg: RunConfig, counts: UserCounts) -> tuple[list[User], list[User]]:
    """(test users, training users) of the configured data; bad data, or too few users, is a SetupError."""
    try:
        return split_users(load_users(cfg, counts.users_hint()), counts, cfg)
    except DataError as e:
        raise SetupError(f"--data: {e}") from e
    except ValueError as e:
        raise SetupError(str(e)) from e


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
