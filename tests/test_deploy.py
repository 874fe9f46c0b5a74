"""Real processes on loopback: a SuperLink and SuperNodes (TLS, node authentication), `flwr run`, the audit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from run_traces import command_lines, processes_naming, still_running

from client.model_cache import find_model_by_hash
from common.model_files import verify_model_dir
from simulation.deploy.cli import main as deploy_main
from simulation.deploy.processes import free_ports
from simulation.outcome import INTERRUPTED
from simulation.privacy_audit import main as audit_main

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--num-clients", "1", "--train-clients", "1", "--rounds", "1", "--methods", "base,oppu", "--task", "LaMP-2M",
        "--data", "synthetic", "--model", "tiny-random", "--batch-tokens", "256", "--personal-epochs", "1",
        "--max-history", "8", "--task-history", "4"]


# MovieLens, so the item-table round runs too (a SecAgg+ round: secaggplus_mod's state kept by the SuperNode between
# its stages, each stage a fresh ClientApp process), and the calibration round
RATING_ARGS = ["--num-clients", "1", "--train-clients", "2", "--rounds", "1", "--methods", "base", "--model",
               "tiny-random", "--split", "validation", "--max-history", "4", "--task-history", "4"]


def test_ports_for_processes_started_together_are_all_different_and_free() -> None:
    """SuperNodes start one after another before any listens: one kernel choice at a time, 200 ports would repeat
    one in 35 of 50 tries here (the kernel gives bind(HOST, 0) one of ~14,000 even ports)."""
    ports = free_ports(200)
    assert len(set(ports)) == 200
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_superlink_and_supernodes_run_the_app_and_pass_the_audit(tmp_path: Path) -> None:
    caches = tmp_path / "node-caches"
    first = tmp_path / "first"
    assert deploy_main([*RATING_ARGS, "--run-dir", str(first), "--node-caches", str(caches)]) == 0
    report = json.loads((first / "report.json").read_text())
    assert report["users"] == {"test": 1, "evaluated": 1, "failed": 0, "train": 2}
    assert report["model"]["sent_to_nodes"] == 3  # every node started with an empty cache
    for node in ("0", "1", "2"):
        installed = find_model_by_hash(report["model"]["sha256"], caches / node)
        assert installed is not None and verify_model_dir(installed) == report["model"]["sha256"]
    # the two training users' item tables were summed; the test user's node sent none (the audit's check)
    assert report["item_statistics"]["nodes"] == 2 and report["item_statistics"]["ratings"] > 40
    assert {"ref-population", "ref-level-item"} <= set(report["references"])
    # the test user's node scored the shared model on its 5 items before the validation questions (calibrate)
    assert (report["calibration"]["users"], report["calibration"]["items"]) == (1, 5)
    assert audit_main([str(first)]) == 0
    summary = json.loads((first / "audit" / "summary.json").read_text())
    assert summary["phases"]["transfer"]["bytes_down"] > 1_000_000
    assert summary["checks"]["test-users-send-metrics-only"]["passed"]
    assert not processes_naming(first), "processes of the deployment are still running"

    # same node caches: the model is verified there and not sent again (only the announce phase matters here, so the
    # rounds that follow it are left out: 33 s instead of 114 s)
    second = tmp_path / "second"
    assert deploy_main([*RATING_ARGS, "--rounds", "0", "--no-item-statistics", "--no-answer-calibration",
                        "--run-dir", str(second), "--node-caches", str(caches)]) == 0
    assert json.loads((second / "report.json").read_text())["model"]["sent_to_nodes"] == 0
    assert not processes_naming(second)


STOP_WITHIN = 15.0  # seconds from the signal until every process of the deployment is gone, busy machine or not


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "Ctrl-C", "SIGTERM"])
def test_a_stopped_oppu_deploy_leaves_no_process_behind_within_seconds(tmp_path: Path, how: signal.Signals) -> None:
    """Stopped while the app runs (a ServerApp and a ClientApp are up), with both cores busy with other work: by
    SIGKILL none of its own clean-up runs, by Ctrl-C or SIGTERM it stops what it started; either way every process
    it started, and every process those started, is gone within STOP_WITHIN."""
    run_dir = tmp_path / "stopped"
    with open(tmp_path / "oppu-deploy.log", "wb") as log:
        deploy = subprocess.Popen([sys.executable, "-m", "simulation.deploy", *ARGS, "--run-dir", str(run_dir)],
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log)
    hogs: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 300
        while not {"flwr-serverapp", "flwr-clientapp"} <= {Path(p).name for c in _cmdlines(deploy.pid) for p in c[:2]}:
            assert deploy.poll() is None, (tmp_path / "oppu-deploy.log").read_text()
            assert time.monotonic() < deadline, "the app did not start within 300 s"
            time.sleep(0.2)
        tree = [psutil.Process(deploy.pid), *psutil.Process(deploy.pid).children(recursive=True)]
        started = dict(zip((p.pid for p in tree), command_lines(tree)))  # named even if one ends before the assert
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
        stopped_at = time.monotonic()
        deploy.send_signal(how)
        alive = still_running(tree, stopped_at + STOP_WITHIN)
    finally:
        for process in [*hogs, *([deploy] if deploy.poll() is None else [])]:
            process.kill()
            process.wait()
    assert not alive, [started[p.pid] for p in alive]
    assert not processes_naming(run_dir)
    if how != signal.SIGKILL:
        assert deploy.returncode == INTERRUPTED, (tmp_path / "oppu-deploy.log").read_text()


def _cmdlines(pid: int) -> list[list[str]]:
    """Command lines of a process's descendants (those that exit meanwhile are left out)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            found.append(child.cmdline())
        except psutil.NoSuchProcess:
            pass
    return found


