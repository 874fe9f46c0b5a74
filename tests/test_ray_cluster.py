"""`flower-simulation --ray-address`: the run joins a Ray cluster that the test starts (`ray start --head` on
127.0.0.1, it and the driver in Ray's local-only mode, which keeps every Ray process on loopback; without it Ray
replaces 127.0.0.1 by the machine's network address) and stops; the driver starts no Ray of its own."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from run_traces import command_lines, is_loopback, listening_addresses, logged_addresses, still_running

from simulation.deploy.processes import free_ports, stop_trees
from simulation.engine import RAY_LOCAL_ONLY

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--num-clients", "1", "--train-clients", "1", "--rounds", "1", "--methods", "base,oppu", "--task", "LaMP-2M",
        "--data", "synthetic", "--model", "tiny-random", "--batch-tokens", "256", "--personal-epochs", "1",
        "--max-history", "8", "--task-history", "4"]
HOST = "127.0.0.1"  # loopback
ENV = {**os.environ, "PYTHONPATH": str(REPO), RAY_LOCAL_ONLY: "0"}  # the head's and the driver's


def _worker_port_block(count: int) -> int:
    """The first of `count` consecutive free ports below the kernel's ephemeral range: `bind(HOST, 0)` (the other
    ports here) and outgoing connections never take one of them, so Ray's workers cannot collide with its own
    components (CI once had the GCS port inside a block chosen from the ephemeral range)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(50):
        low = rng.randrange(20000, ephemeral_low - count)
        try:
            with contextlib.ExitStack() as held:
                for port in range(low, low + count):
                    held.enter_context(socket.socket()).bind((HOST, port))
            return low
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports below {ephemeral_low} on {HOST}")


def _ray_head(temp_dir: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """A one-machine Ray cluster in the foreground (--block), every port of its own chosen free and distinct, and
    the port of its GCS (the address to join)."""
    flags = ("--port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
             "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port")
    ports = dict(zip(flags, map(str, free_ports(len(flags), HOST))))
    low = _worker_port_block(41)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", HOST,
             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false",
             "--disable-usage-stats", "--temp-dir", str(temp_dir), "--min-worker-port", str(low),
             "--max-worker-port", str(low + 40), *(x for pair in ports.items() for x in pair)],
            env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ), int(ports["--port"])


def test_simulation_joins_a_ray_cluster(tmp_path: Path) -> None:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head_log = tmp_path / "ray-head.log"
    head, port = _ray_head(temp_dir, head_log)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while not list(temp_dir.glob("session_latest/logs/raylet.out")):
            assert head.poll() is None, head_log.read_text()
            assert time.monotonic() < deadline, head_log.read_text()
            time.sleep(0.5)
        time.sleep(2)  # the raylet registers with the GCS
        run_dir = tmp_path / "run"
        driver = subprocess.run(
            [sys.executable, "-m", "simulation.cli", *ARGS, "--run-dir", str(run_dir), "--ray-address",
             f"{HOST}:{port}"], cwd=REPO, env=ENV, capture_output=True,
            text=True, timeout=240)
        assert driver.returncode == 0, driver.stderr[-4000:]
        report = json.loads((run_dir / "report.json").read_text())
        assert report["users"] == {"test": 1, "evaluated": 1, "failed": 0, "train": 1}
        assert not list(run_dir.glob(".ray-check"))
        # the clients ran as the cluster's workers: its session logged our driver and its workers
        logs = temp_dir / "session_latest" / "logs"
        assert len(list(logs.glob("python-core-driver-*.log"))) == 1
        assert list(logs.glob("python-core-worker-*.log"))
        addresses = logged_addresses(logs)
        assert addresses and all(is_loopback(ip) for ip in addresses), addresses
        listening = listening_addresses(head.pid)
        assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
        assert all(is_loopback(ip) for _, ip in listening), listening  # (on 127.0.0.2: every interface)
        tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    finally:
        stop_trees([psutil.Process(head.pid)] if head.poll() is None else [], grace=15)
        head.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)
    alive = still_running(tree, time.monotonic() + 15)
    assert not alive, command_lines(alive)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]



def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path: Path) -> None:
    """ray.init kept retrying such an address for minutes; the run now exits 2 in seconds, having written nothing."""
    [port] = free_ports(1, HOST)  # nothing listens there
    start = time.monotonic()
    driver = subprocess.run(
        [sys.executable, "-m", "simulation.cli", *ARGS, "--run-dir", str(tmp_path / "run"), "--ray-address",
         f"{HOST}:{port}"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120)
    assert driver.returncode == 2, driver.stderr[-3000:]
    assert driver.stderr.strip().splitlines()[-1] == (
        f"flower-simulation: --ray-address {HOST}:{port}: no Ray cluster answers there (Connection refused); expected "
        "the address that `ray start --head` printed (HOST:PORT)")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists()
