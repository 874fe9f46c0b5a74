"""One `flwr run` of this project on Flower's local simulation connection, Flower's supported path: wall time, the
run's phases, and the CPU seconds of Flower's flwr-simulation process (engine, Ray driver, our ServerApp) and of
the Ray workers that run the ClientApps, sampled every second.

    python -m bench.flwr_run --run-config "num-clients=4 train-clients=200 rounds=2"
    python -m bench.flwr_run --run-config "num-clients=4 train-clients=200 rounds=2" \
        --federation-config "client-resources-num-cpus=1"
    python -m bench.flwr_run --app-dir /tmp/older-clone ...        # the same run of another checkout

It starts its own local SuperLink under a fresh FLWR_HOME (on ports of its own, Ray on loopback only) and stops
it at the end; `num-supernodes` is the run's test plus training users.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from flwr.common.config import parse_config_args

from bench.common import finish
from common.config import flwr_run_settings
from common.store import read_json
from simulation.deploy.commands import flwr_run_command, local_simulation_env
from simulation.engine import RAY_LOCAL_ONLY

REPO = Path(__file__).resolve().parents[1]


def cpu_by_kind(seconds: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds summed by process kind from {pid: (kind, CPU seconds)}."""
    totals: dict[str, float] = {}
    for kind, cpu in seconds.values():
        totals[kind] = totals.get(kind, 0.0) + cpu
    return totals


def sample_cpu(seconds: dict[int, tuple[str, float]], stop: threading.Event) -> None:
    """Every second until `stop`: the CPU seconds of each flwr-simulation process and Ray ClientApp worker."""
    while not stop.is_set():
        for process in psutil.process_iter(["cmdline", "name"]):
            try:
                line = " ".join(process.info["cmdline"] or [])
                kind = ("flwr-simulation" if "flwr-simulation" in line
                        else "workers" if "ClientAppActor" in (process.info["name"] or "") else None)
                if kind:
                    seconds[process.pid] = (kind, sum(process.cpu_times()[:2]))
            except psutil.Error:
                pass
        stop.wait(1.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.flwr_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", help="the run config's keys, as `flwr run --run-config` takes them")
    parser.add_argument("--federation-config", default="",
                        help="more of the simulation federation's config (num-supernodes is the run's node count)")
    parser.add_argument("--app-dir", type=Path, default=REPO, help="the checkout to run (default: this one)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/bench-flwr-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    run_dir = (args.run_dir or Path("runs") / f"bench-flwr-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    cfg, counts, _ = flwr_run_settings({**parse_config_args([args.run_config]), "run-dir": str(run_dir)})
    federation = f"num-supernodes={counts.nodes(cfg)} {args.federation_config}".strip()
    command = [*flwr_run_command(cfg, counts, run_dir), "--federation-config", federation]
    command[2] = str(args.app_dir.resolve())  # `flwr run <app dir> ...`
    with tempfile.TemporaryDirectory(prefix="bench-flwr-home-") as home:
        env = {**local_simulation_env(Path(home)), RAY_LOCAL_ONLY: "0"}  # (Ray on loopback only)
        seconds: dict[int, tuple[str, float]] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_cpu, args=(seconds, stop))
        sampler.start()
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=args.app_dir, env=env, capture_output=True, text=True)
        finally:
            wall = time.monotonic() - start
            stop.set()
            sampler.join()
            left = [process for process in psutil.process_iter(["cmdline"])  # the SuperLink `flwr run` left running
                    if any(home in part for part in process.info["cmdline"] or [])]
            for process in left:
                process.terminate()
            psutil.wait_procs(left, timeout=30)
    report = read_json(run_dir / "report.json") or {}
    if done.returncode or not report:
        raise SystemExit(f"bench.flwr_run: {' '.join(command)} exited {done.returncode}, report "
                         f"{'found' if report else 'missing'} in {run_dir}:\n{done.stderr[-2000:]}")
    cpu = cpu_by_kind(seconds)
    timings = report.get("timings", {})
    results = {"command": command, "run_dir": str(run_dir), "wall_seconds": wall, "timings": timings,
               "cpu_seconds": cpu}
    lines = [f"flwr run of {args.app_dir} ({counts.nodes(cfg)} nodes, {federation}): {wall:.0f} s",
             "phases (s): " + ", ".join(f"{k.removesuffix('-seconds')} {v:.0f}" for k, v in timings.items()),
             "CPU seconds: " + ", ".join(f"{kind} {value:.0f}" for kind, value in sorted(cpu.items()))]
    return finish(args, results, lines)


if __name__ == "__main__":
    main()
