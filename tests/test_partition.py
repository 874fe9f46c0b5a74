"""How a node finds its data: only through its node config, which node_config_mod fills in for a simulated node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.partition import load_users, node_config_mod, split_users
from common.config import RunConfig, UserCounts
from simulation.node_stores import write_partitions

CFG = {"task": "LaMP-2M", "data": "synthetic", "model": "tiny-random", "rounds": 1}


def _node_config(mod, node_config: dict, run_config: dict | None = None) -> dict:
    context = Context(run_id=1, node_id=7, node_config=dict(node_config), state=RecordDict(),
                      run_config=dict(run_config or {}))
    seen = {}
    mod(None, context, lambda msg, ctx: seen.update(ctx.node_config) or "reply")
    return seen


def test_a_supernode_started_with_user_dir_keeps_its_config(tmp_path: Path) -> None:
    given = {"user-dir": str(tmp_path / "u"), "audit-dir": str(tmp_path / "a")}
    assert _node_config(node_config_mod(tmp_path), given) == given


def test_a_simulated_node_gets_its_store_from_the_partition_table(tmp_path: Path) -> None:
    cfg = RunConfig.from_record(CFG)
    test, train = split_users(load_users(cfg, 5), UserCounts(3, 2), cfg)
    nodes = write_partitions(tmp_path, test, train, {})
    for partition, node in enumerate(nodes):
        config = _node_config(node_config_mod(tmp_path), {"partition-id": partition})
        assert config["user-dir"] == str(tmp_path / "clients" / node["user"])
        assert config["audit-dir"] == str(tmp_path / "audit")
    # the same table is found through the run config's run-dir (`flwr run` against prepared stores)
    config = _node_config(node_config_mod(), {"partition-id": 4}, {"run-dir": str(tmp_path)})
    assert config["user-dir"] == str(tmp_path / "clients" / nodes[4]["user"])


def test_under_flwr_run_a_node_writes_only_its_own_partition(tmp_path: Path) -> None:
    run_config = {**CFG, "num-clients": 2, "train-clients": 1, "run-dir": str(tmp_path / "run")}
    config = _node_config(node_config_mod(), {"partition-id": 2}, run_config)  # the training user
    store = Path(config["user-dir"])
    assert json.loads((store / "data.json").read_text())["role"] == "train"
    assert [p.name for p in (tmp_path / "run" / "clients").iterdir()] == [store.name]
    assert config["audit-dir"] == str(tmp_path / "run" / "audit")


def test_under_flwr_run_the_nodes_of_a_worker_read_and_split_the_data_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read for every node a worker process runs, not one each (MovieLens-100K: 0.7 s a read, 943 nodes)."""
    reads = []
    monkeypatch.setattr("client.partition.load_users", lambda *args: reads.append(args) or load_users(*args))
    run_config = {**CFG, "num-clients": 2, "train-clients": 2, "run-dir": str(tmp_path / "run")}
    stores = [Path(_node_config(node_config_mod(), {"partition-id": i}, run_config)["user-dir"]) for i in range(4)]
    assert len(reads) == 1
    assert [json.loads((s / "data.json").read_text())["role"] for s in stores] == ["test", "test", "train", "train"]
    assert len({s.name for s in stores}) == 4


def test_under_flwr_run_a_node_beyond_the_users_is_told_how_many_nodes_to_start(tmp_path: Path) -> None:
    run_config = {**CFG, "num-clients": 2, "train-clients": 1, "run-dir": str(tmp_path / "run")}
    with pytest.raises(ValueError, match=r"^partition-id 3: the run config names 2 test and 1 training users, one "
                                         r"node each; start the federation with num-supernodes=3$"):
        _node_config(node_config_mod(), {"partition-id": 3}, run_config)  # (before: an IndexError)


def test_a_node_with_neither_user_dir_nor_partition_is_told_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="neither 'user-dir' nor 'partition-id'"):
        _node_config(node_config_mod(tmp_path), {})


def test_task_adaptation_without_a_training_user_is_refused_before_any_node_starts() -> None:
    """It was found only by the ServerApp, after every node had started."""
    cfg = RunConfig.from_record(CFG)
    users = load_users(cfg, 5)
    with pytest.raises(ValueError, match=r"^--rounds 1: task adaptation needs training users, but --num-clients 5 "
                                         r"takes all 5 users of the data as test users; lower --num-clients, or skip"):
        split_users(users, UserCounts(5, None), cfg)
    no_rounds = RunConfig.from_record({**CFG, "rounds": 0})
    assert [len(part) for part in split_users(users, UserCounts(5, None), no_rounds)] == [5, 0]
    assert [len(part) for part in split_users(users, UserCounts(4, None), cfg)] == [4, 1]
    assert [len(part) for part in split_users(users, UserCounts(3, 0), cfg)] == [3, 0]  # none asked for (benches)
