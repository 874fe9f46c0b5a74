"""Faults are contained and reported, on real runs with the tiny model: a killed Ray worker is replaced and its
user run again."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import cloudpickle
from flwr.clientapp import ClientApp

import faulty_client
from client.config import RunConfig
from simulation.audit import main as audit_main
from simulation.cli import build_parser, simulate

cloudpickle.register_pickle_by_value(faulty_client)  # Ray workers cannot import from tests/

TINY_ARGS = ["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--methods", "base,oppu",
             "--batch-tokens", "256", "--personal-epochs", "1", "--max-history", "8", "--task-history", "4"]


def _simulate(argv: list[str], client_app: ClientApp) -> tuple[argparse.Namespace, Path, dict]:
    args = build_parser().parse_args([*argv, *TINY_ARGS])
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    return args, *simulate(args, cfg, client_app)


def test_a_killed_worker_is_replaced_and_its_user_evaluated(tmp_path: Path) -> None:
    """One worker for three users (2 cores, 2 per client): the worker dies in the first user's personalization,
    Ray starts a new one and runs that message there again, which reuses the result the first worker stored."""
    marker = tmp_path / "killed.json"
    _, run_dir, outcome = _simulate(
        ["--num-clients", "3", "--rounds", "0", "--cpus-per-client", "2", "--run-dir", str(tmp_path / "run")],
        faulty_client.dying_worker_app(0, marker),
    )
    killed = json.loads(marker.read_text())
    report = outcome["report"]
    assert report["users"] == {"test": 3, "evaluated": 3, "failed": 0, "train": 0}
    assert Path(killed["adapter"]).stat().st_mtime_ns == killed["mtime_ns"], "the stored result was not reused"
    lines = [json.loads(line) for line in (run_dir / "audit" / "client.jsonl").read_text().splitlines()]
    received = Counter(e["message_id"] for e in lines if (e["direction"], e["message_type"]) == ("in", "evaluate"))
    assert sorted(received.values()) == [1, 1, 2]
    (twice,) = [m for m, n in received.items() if n == 2]
    pids = [e["pid"] for e in lines if e["message_id"] == twice]
    assert pids[0] == killed["pid"] and pids[1:] == [pids[1]] * 2 and pids[1] != killed["pid"]  # in; in, out
    assert audit_main([str(run_dir)]) == 0
    assert json.loads((run_dir / "audit" / "summary.json").read_text())["redelivered_after_worker_death"] == 1

