"""A simulation repeated with the same flags is the same run: the same users trained in each round, the same task
adapter, the same report (simulation/node_ids.py draws node ids from the seed; server/exchange.py reads replies in
node-id order; common/secure_update.py rounds SecAgg+ vectors repeatably). On Flower's real engine, with the tiny
model and MovieLens users."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.view import read_server_view
from simulation.cli import main
from simulation.node_ids import flower_simulation_order, seeded_node_ids

FLAGS = [
    "--task", "MovieLens", "--data", "default", "--model", "tiny-random", "--num-clients", "2", "--train-clients",
    "8", "--train-per-round", "3", "--rounds", "2", "--methods", "base,oppu", "--task-history", "4",
    "--record-server-view",
]


def _run(run_dir: Path, seed: int) -> tuple[dict, dict[int, list[int]], str]:
    """(report with the item table the SecAgg+ round summed, each round's updating node ids, the task adapter's
    sha256) of a run with `seed`."""
    assert main([*FLAGS, "--seed", str(seed), "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    report["item_table"] = json.loads((run_dir / "server" / "item_table.json").read_text())
    rounds = {r: sorted(held.updates) for r, held in read_server_view(run_dir).items()}
    adapter = json.loads((run_dir / "server" / "task_adapter.json").read_text())["sha256"]
    return report, rounds, adapter


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict, dict[int, list[int]], str]]:
    """Seed 0 twice, then seed 1."""
    root = tmp_path_factory.mktemp("repeat")
    return [_run(root / "first", 0), _run(root / "again", 0), _run(root / "other-seed", 1)]


def test_the_same_flags_train_the_same_users_into_the_same_adapter(three_runs: list) -> None:
    (_, rounds, adapter), (_, rounds_again, adapter_again), _ = three_runs
    assert sorted(rounds) == [1, 2] and all(len(nodes) == 3 for nodes in rounds.values())
    assert set().union(*rounds.values()) <= set(seeded_node_ids(0, 10)[2:])  # training partitions follow the test users
    assert rounds_again == rounds
    assert adapter_again == adapter


def test_the_same_flags_write_the_same_results(three_runs: list) -> None:
    (report, _, _), (report_again, _, _), _ = three_runs
    assert report["users"]["evaluated"] == 2
    assert report["item_table"]["item-buckets"]
    for part in ("item_table", "methods", "per_user", "comparisons", "item_statistics", "calibration",
                 "task_adaptation"):
        assert report_again[part] == report[part], part


def test_another_seed_samples_other_nodes(three_runs: list) -> None:
    (_, rounds, adapter), _, (_, rounds_other, adapter_other) = three_runs
    assert set().union(*rounds_other.values()) <= set(seeded_node_ids(1, 10)[2:])
    assert not set().union(*rounds_other.values()) & set(seeded_node_ids(0, 10))
    assert adapter_other != adapter


def test_seeded_node_ids_are_distinct_valid_and_fixed_by_the_seed() -> None:
    ids = seeded_node_ids(7, 2000)
    assert len(set(ids)) == 2000
    assert all(0 < node_id < 2**64 for node_id in ids)
    assert seeded_node_ids(7, 5) == ids[:5]  # a bigger population keeps the smaller one's ids
    assert seeded_node_ids(8, 5) != ids[:5]


def test_under_flwr_run_nodes_are_ordered_by_the_ids_flower_simulation_draws() -> None:
    """Flower's engine under `flwr run` drew its own ids (here: the reverse of the seeded order); the server's order
    is the seeded ids' of their partitions, and a node the engine did not map keeps its own id."""
    seeded = seeded_node_ids(3, 4)
    flower_ids = sorted(seeded, reverse=True)  # any other ids: these make the two orders differ
    engine_nodes = {node: partition for partition, node in enumerate(flower_ids)}
    key = flower_simulation_order(3, engine_nodes)
    assert [key(node) for node in flower_ids] == seeded
    assert sorted(flower_ids, key=key) != sorted(flower_ids)
    assert key(12345) == 12345
