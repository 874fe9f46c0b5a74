"""Runs interrupted as users interrupt them, then resumed: Ctrl-C (SIGINT to the process group, as a terminal sends
it) during task adaptation, and a crash (SIGKILL of every process of the run) during personalization. The resumed
run evaluates every user once, keeps what finished before the crash as it was, ends with the uninterrupted run's
statistics (CPU runs are deterministic) and passes the privacy audit. A crash right after the item table was summed
(a rating task) resumes with that table: no second SecAgg+ round of the training users' tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from run_traces import command_lines, still_running

from common import protocol as p
from simulation.privacy_audit import main as audit_main

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--num-clients", "6", "--train-clients", "2", "--rounds", "2", "--task", "LaMP-2M", "--data", "synthetic",
        "--model", "tiny-random", "--methods", "base,oppu", "--batch-tokens", "256", "--personal-epochs", "6",
        "--max-history", "8", "--task-history", "4", "--dtype", "float32"]
STOP_WITHIN = 30  # seconds for every process of an interrupted run to be gone


RATING_ARGS = ["--num-clients", "2", "--train-clients", "3", "--rounds", "2", "--model", "tiny-random", "--methods",
               "base,oppu", "--batch-tokens", "256", "--personal-epochs", "1", "--max-history", "8", "--task-history",
               "4", "--dtype", "float32"]  # MovieLens: the item table is on


def _start(run_dir: Path, *extra: str, args: list[str] = ARGS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulation.cli", *args, "--run-dir", str(run_dir), *extra],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a process group of its own, like a terminal's job


def _wait_for(condition: Callable[[], bool], run: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended before {what}: {run.stderr.read() if run.stderr else ''}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _audit_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "audit" / "client.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _results(run_dir: Path) -> dict[str, bytes]:
    return {path.parent.name: path.read_bytes() for path in run_dir.glob("clients/*/result.json")}


def _interrupt(run: subprocess.Popen, how: signal.Signals) -> None:
    """Send `how` to the run's whole process group; every process of the run must be gone within STOP_WITHIN."""
    tree = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
    os.killpg(run.pid, how)
    run.wait(timeout=STOP_WITHIN)
    alive = still_running(tree, time.monotonic() + STOP_WITHIN)
    assert not alive, command_lines(alive)


def _outcome(run_dir: Path) -> dict:
    """What a run found: each user's statistics (keyed by Flower's node ids, drawn anew per run, so as a sorted
    list), each comparison's difference (its bootstrap CI depends on the users' order), users and task loss."""
    report = json.loads((run_dir / "report.json").read_text())
    return {"per_user": sorted(json.dumps(stats, sort_keys=True) for stats in report["per_user"].values()),
            "differences": [(c["method"], c["reference"], c["difference"]) for c in report["comparisons"]],
            "users": report["users"], "errors": report["errors"], "train_loss": report["task_adaptation"]["train_loss"]}


def test_interrupted_twice_then_resumed_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    reference = _start(tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read() if reference.stderr else ""

    run_dir = tmp_path / "run"
    first = _start(run_dir)  # Ctrl-C while the second task-adaptation round trains
    _wait_for(lambda: any(e["message_type"] == p.ADAPT and e["round"] == 2 for e in _audit_lines(run_dir)),
              first, "task-adaptation round 2")
    _interrupt(first, signal.SIGINT)
    assert first.returncode != 0
    assert not _results(run_dir) and not (run_dir / "report.json").exists()

    second = _start(run_dir, "--resume")  # the machine dies while users are being personalized
    _wait_for(lambda: len(_results(run_dir)) >= 2, second, "two stored results")
    _interrupt(second, signal.SIGKILL)
    finished = _results(run_dir)
    assert 2 <= len(finished) < 6, "the crash came too late to leave users unfinished"
    adapters = {path: path.stat().st_mtime_ns for user in finished  # an unfinished user's adapter may be redone
                for path in run_dir.glob(f"clients/{user}/adapters/*/*.safetensors")}
    assert len(adapters) == len(finished)  # one adapter (oppu's k0) per finished user

    third = _start(run_dir, "--resume")
    assert third.wait(timeout=600) == 0, third.stderr.read() if third.stderr else ""
    assert {user: _results(run_dir)[user] for user in finished} == finished  # kept as they were, not redone
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in adapters.items())
    assert _outcome(run_dir) == _outcome(tmp_path / "reference")
    assert _outcome(run_dir)["users"] == {"test": 6, "evaluated": 6, "failed": 0, "train": 2}
    replies = [e for e in _audit_lines(run_dir) if (e["direction"], e["message_type"]) == ("out", p.PERSONALIZE)]
    assert len({e["message_id"] for e in replies}) >= 6
    assert audit_main([str(run_dir)]) == 0


def _item_round_setups(run_dir: Path) -> int:
    """The SecAgg+ setup messages the server sent for the item table (one per training node and summing round)."""
    path = run_dir / "audit" / "server.jsonl"
    return sum('"stage": "setup"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def _calibrate_messages(run_dir: Path) -> int:
    """The calibrate messages the server sent (one per test node and calibration)."""
    path = run_dir / "audit" / "server.jsonl"
    return sum(f'"message_type": "{p.CALIBRATE}"' in line and '"direction": "out"' in line
               for line in path.read_text().splitlines())


def test_a_crash_after_the_item_table_resumes_with_that_table(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    table = run_dir / "server" / "item_table.json"
    first = _start(run_dir, args=RATING_ARGS)
    _wait_for(table.exists, first, "the item table")
    _interrupt(first, signal.SIGKILL)  # the machine dies between the item-table round and task adaptation
    summed, written = table.read_bytes(), table.stat().st_mtime_ns
    setups = _item_round_setups(run_dir)
    assert setups == 3  # one item-table round, the 3 training nodes

    second = _start(run_dir, "--resume", args=RATING_ARGS)
    assert second.wait(timeout=600) == 0, second.stderr.read() if second.stderr else ""
    assert (table.read_bytes(), table.stat().st_mtime_ns) == (summed, written)  # reused, not summed again
    assert _item_round_setups(run_dir) == setups  # no second SecAgg+ round of the tables
    report = json.loads((run_dir / "report.json").read_text())
    assert report["users"] == {"test": 2, "evaluated": 2, "failed": 0, "train": 3}
    assert report["item_statistics"]["nodes"] == 3 and report["calibration"]["users"] == 2
    assert audit_main([str(run_dir)]) == 0

    calibrations = _calibrate_messages(run_dir)
    assert calibrations == 2  # one to each test user's node
    third = _start(run_dir, "--resume", args=RATING_ARGS)  # a finished run resumed: the saved answer quantile
    assert third.wait(timeout=600) == 0, third.stderr.read() if third.stderr else ""
    assert _calibrate_messages(run_dir) == calibrations  # not asked again
    assert json.loads((run_dir / "report.json").read_text())["calibration"] == report["calibration"]
