"""Faults are contained and reported, on real runs with the tiny model: a killed Ray worker is replaced and its
user run again; a failed training-user update is counted, shown and fails the run unless allowed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import faulty_client
import numpy as np
import psutil
import pytest
from run_traces import command_lines, still_running
from safetensors.numpy import load_file

from common import protocol as p
from common.config import UserCounts
from server.view import read_server_view
from simulation.engine import FLOWER_ENGINE_ERROR, ClientAppFactory, SimulationOptions, simulate, why_stopped
from simulation.flags import build_parser, run_config_of, user_counts
from simulation.outcome import exit_status
from simulation.privacy_audit import main as audit_main

cloudpickle.register_pickle_by_value(faulty_client)  # Ray workers cannot import from tests/

TINY_ARGS = ["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--methods", "base,oppu",
             "--batch-tokens", "256", "--personal-epochs", "1", "--max-history", "8", "--task-history", "4"]


REPO = Path(__file__).resolve().parents[1]


def _simulate(argv: list[str], client_app: ClientAppFactory | None) -> tuple[UserCounts, Path, dict | None]:
    parser = build_parser()
    args = parser.parse_args([*argv, *TINY_ARGS])
    cfg = run_config_of(args, parser)
    counts = user_counts(args)
    return counts, *simulate(cfg, counts, SimulationOptions.from_args(args), client_app)


def test_a_killed_worker_is_replaced_and_its_user_evaluated(tmp_path: Path) -> None:
    """One worker for three users (2 cores, 2 per client): the worker dies in the first user's personalization,
    Ray starts a new one and runs that message there again, which reuses the result the first worker stored."""
    marker = tmp_path / "killed.json"
    counts, run_dir, report = _simulate(
        ["--num-clients", "3", "--rounds", "0", "--cpus-per-client", "2", "--run-dir", str(tmp_path / "run")],
        faulty_client.dying_worker_app(0, marker),
    )
    killed = json.loads(marker.read_text())
    assert report["users"] == {"test": 3, "evaluated": 3, "failed": 0, "train": 0}
    assert exit_status("flower-simulation", report, counts, False) == 0
    assert Path(killed["adapter"]).stat().st_mtime_ns == killed["mtime_ns"], "the stored result was not reused"
    lines = [json.loads(line) for line in (run_dir / "audit" / "client.jsonl").read_text().splitlines()]
    received = Counter(e["message_id"] for e in lines if (e["direction"], e["message_type"]) == ("in", p.PERSONALIZE))
    assert sorted(received.values()) == [1, 1, 2]
    (twice,) = [m for m, n in received.items() if n == 2]
    pids = [e["pid"] for e in lines if e["message_id"] == twice]
    assert pids[0] == killed["pid"] and pids[1:] == [pids[1]] * 2 and pids[1] != killed["pid"]  # in; in, out
    assert audit_main([str(run_dir)]) == 0
    assert json.loads((run_dir / "audit" / "summary.json").read_text())["redelivered_after_worker_death"] == 1


def test_a_failed_training_update_is_reported_and_fails_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--num-clients", "1", "--train-clients", "2", "--rounds", "1", "--run-dir", str(tmp_path / "run"),
            "--record-server-view"]
    counts, run_dir, _ = _simulate(argv, faulty_client.failing_update_app(1))  # the first training user
    report = json.loads((run_dir / "report.json").read_text())
    adaptation = report["task_adaptation"]
    assert adaptation["sampled_updates"] == {"1": 2} and adaptation["failed_updates"] == {"1": 1}
    assert report["users"] == {"test": 1, "evaluated": 1, "failed": 0, "train": 2}
    # the task adapter is the one update that arrived (FedAvg of one)
    (update,) = read_server_view(run_dir)[1].updates.values()
    saved = load_file(str(run_dir / "server" / "task_adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(update[1])
    for name, value in saved.items():
        np.testing.assert_allclose(value, update[1][name], rtol=1e-6)
    assert ("**1 of 2 training-user updates failed** (round 1: 1); the task adapter lacks them."
            in (run_dir / "report.md").read_text())
    assert json.loads((run_dir / "server" / "task_adapter.json").read_text())["failed_updates"] == {"1": 1}
    capsys.readouterr()
    assert exit_status("flower-simulation", report, counts, False) == 1
    assert ("flower-simulation: 1 training-user update(s) failed, so the task adapter lacks them"
            in capsys.readouterr().err)
    assert exit_status("flower-simulation", report, counts, True) == 0
    # a resumed run (our own client now) keeps this task adapter, so it reports the failed update again
    counts, _, resumed = _simulate([*argv, "--resume"], None)
    assert resumed["task_adaptation"]["failed_updates"] == {"1": 1}
    assert exit_status("flower-simulation", resumed, counts, False) == 1


def test_a_worker_killed_before_it_stores_a_result_is_replaced_and_its_user_evaluated_once(tmp_path: Path) -> None:
    marker = tmp_path / "killed.json"
    counts, run_dir, report = _simulate(
        ["--num-clients", "3", "--rounds", "0", "--cpus-per-client", "2", "--run-dir", str(tmp_path / "run")],
        faulty_client.dying_before_storing_app(1, marker),
    )
    assert report["users"] == {"test": 3, "evaluated": 3, "failed": 0, "train": 0}
    lines = [json.loads(line) for line in (run_dir / "audit" / "client.jsonl").read_text().splitlines()]
    received = Counter(e["message_id"] for e in lines if (e["direction"], e["message_type"]) == ("in", p.PERSONALIZE))
    assert sorted(received.values()) == [1, 1, 2]
    (twice,) = [m for m, n in received.items() if n == 2]
    seen = [(e["direction"], e["pid"]) for e in lines if e["message_id"] == twice]
    killed = json.loads(marker.read_text())["pid"]
    assert seen[0] == ("in", killed) and seen[1:] == [("in", seen[1][1]), ("out", seen[1][1])] and seen[1][1] != killed
    replies = [e for e in lines if (e["direction"], e["message_type"]) == ("out", p.PERSONALIZE)]
    assert len(replies) == 3  # one per user: the killed attempt sent nothing
    assert audit_main([str(run_dir)]) == 0


def test_a_message_that_kills_every_worker_fails_its_user_alone(tmp_path: Path) -> None:
    victims = tmp_path / "victims"
    victims.mkdir()
    counts, run_dir, report = _simulate(
        ["--num-clients", "3", "--rounds", "0", "--run-dir", str(tmp_path / "run")],
        faulty_client.deadly_message_app(0, victims),
    )
    assert report["users"] == {"test": 3, "evaluated": 2, "failed": 1, "train": 0}
    assert len(list(victims.iterdir())) == 2  # the first worker and its one retry (max_task_retries=1)
    assert len(report["errors"]) == 1
    assert exit_status("flower-simulation", report, counts, False) == 1


def test_an_engine_that_cannot_place_a_client_ends_the_run_at_once_saying_why(tmp_path: Path) -> None:
    """Clients that ask Ray for more cores than any machine has: Flower's engine stops at once, and its ServerApp
    thread would then wait out the 6-hour reply timeout (the process hung). The run ends with 1, one line naming
    the cause and the flag, every process of it gone."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr_file:  # a file, not a pipe nobody reads while the run goes on
        run = subprocess.Popen([sys.executable, "-m", "simulation.cli", "--num-clients", "1", "--train-clients", "2",
                                "--rounds", "1", "--cpus-per-client", "1000", *TINY_ARGS, "--run-dir",
                                str(tmp_path / "r")], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr_file)
    tree: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        for child in psutil.Process(run.pid).children(recursive=True):  # Ray's processes, while they run
            tree.setdefault(child.pid, child)
        time.sleep(0.2)
    if run.poll() is None:
        run.kill()
    run.wait()
    stderr = err.read_text()
    assert run.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("flower-simulation: Flower's simulation engine stopped (ActorPool is empty"), last
    assert "1000 CPU(s) (--cpus-per-client)" in last and f"--resume --run-dir {tmp_path / 'r'}" in last, last
    assert tree, "Ray was started"
    alive = still_running(list(tree.values()), time.monotonic() + 15)
    assert not alive, command_lines(alive)


def test_what_stopped_the_run_is_told_apart() -> None:
    """Flower wraps its engine's error (Ray's) in one message; the ServerApp's own error comes as it was raised."""
    resources, log_file = {"num_cpus": 4.0, "num_gpus": 0.0}, Path("run/logs/console.log")
    middle, engine = RuntimeError("Simulation Runtime crashed."), RuntimeError(FLOWER_ENGINE_ERROR)
    middle.__cause__, engine.__cause__ = ValueError("ActorPool is empty."), middle
    assert why_stopped(engine, resources, log_file) == (
        "Flower's simulation engine stopped (ActorPool is empty.); each client asked Ray for 4 CPU(s) "
        "(--cpus-per-client) and 0 GPU(s) (--gpus-per-client); log: run/logs/console.log")
    assert why_stopped(KeyError("phase"), resources, log_file) == (
        "the ServerApp stopped (KeyError: 'phase'); log: run/logs/console.log")
