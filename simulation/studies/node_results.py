"""Per-user results and history lengths read from the node-local stores of a simulation's run directory.

The server knows nodes, not users, so a study that pairs the same user across runs or groups users by
their history reads the stores directly, on the machine that holds them (as `oppu-audit` and the adapter
similarity do), never through Flower messages. Each store's result.json is checked against what the
server received (report.json "per_user"), so a study never uses numbers the federated run did not produce.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from common.metrics import Statistics
from common.store import UserStore, read_json


def test_users(run_dir: Path) -> list[str]:
    """The run's test users, in partition order."""
    return [node["user"] for node in json.loads((run_dir / "nodes.json").read_text()) if node["role"] == "test"]


def _canonical(stats: Mapping[str, Statistics]) -> str:
    return json.dumps(stats, sort_keys=True)


def stored_statistics(run_dir: Path) -> dict[str, dict[str, Statistics]]:
    """{user: {method: statistics}} from each test user's result.json, checked against the server's report."""
    stored = {}
    for user in test_users(run_dir):
        result = read_json(UserStore(run_dir, user).result)
        if result is not None:
            stored[user] = result["statistics"]
    report = json.loads((run_dir / "report.json").read_text())
    received = Counter(_canonical(stats) for stats in report["per_user"].values())
    if Counter(_canonical(stats) for stats in stored.values()) != received:
        raise ValueError(
            f"{run_dir}: the node stores' result.json files do not hold what the server received (report.json "
            "per_user); the stores changed after the run or the run did not finish: run it again"
        )
    return stored


def history_lengths(run_dir: Path) -> dict[str, int]:
    """{user: number of history items} of the test users (the whole stored history, before any selection)."""
    return {user: len(json.loads(UserStore(run_dir, user).data.read_text())["profile"]) for user in test_users(run_dir)}


def paired_by_user(runs: Mapping[str, Path]) -> list[dict[str, Statistics]]:
    """One mapping per user over all runs, labels "<arm>/<method>" (runs of a study share their users)."""
    units: dict[str, dict[str, Statistics]] = {}
    for arm, run_dir in runs.items():
        for user, by_method in stored_statistics(run_dir).items():
            units.setdefault(user, {}).update({f"{arm}/{method}": stats for method, stats in by_method.items()})
    return list(units.values())
